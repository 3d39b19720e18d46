"""Cancelling a running request on CUDA gives its GPU memory back (reliability case R7). Skipped without CUDA."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from pipelines.engine import Engine
from pipelines.errors import RequestCancelled
from pipelines.types import InpaintRequest
from tests.helpers import box_mask, noise_image

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

APP = "fal-ai/fast-lightning-sdxl/inpainting"


@pytest.fixture(scope="module")
def cuda_engine(spec: Any, resolver: Any) -> Engine:
    return Engine.load(
        spec, device="cuda", resolver=resolver, variants=[(APP, 4)], safety_checker=False, prompt_expansion=False
    )


def _request(request_id: str) -> InpaintRequest:
    return InpaintRequest(
        app_id=APP,
        image=noise_image(256, 256),
        mask=box_mask(256, 256),
        prompt="a boat",
        steps=4,
        seed=1,
        image_size=(256, 256),
        num_images=2,
        request_id=request_id,
    )


def test_cancel_while_running_returns_vram_to_baseline(cuda_engine: Engine) -> None:
    assert cuda_engine.run([_request("warm")])[0].error is None
    torch.cuda.synchronize()
    baseline = torch.cuda.memory_allocated()
    steps: list[int] = []

    def progress(request_id: str, step: int, total: int) -> None:
        steps.append(step)

    (result,) = cuda_engine.run([_request("cancel-me")], should_stop=lambda rid: True, on_progress=progress)
    assert isinstance(result.error, RequestCancelled) and result.images == []
    assert steps == [1]  # stopped at the first step callback, not after all four
    torch.cuda.synchronize()
    assert torch.cuda.memory_allocated() == baseline
    assert cuda_engine.run([_request("after")])[0].error is None
    torch.cuda.synchronize()
    assert torch.cuda.memory_allocated() == baseline
