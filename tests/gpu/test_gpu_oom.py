"""A real CUDA out-of-memory error (not an injected one): the engine frees what the failed attempt held,
retries in low-memory mode, and GPU memory is back to its baseline afterwards (R8). Skipped without CUDA."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch

from pipelines.engine import Engine
from pipelines.fault_injection import FaultPoint
from pipelines.types import InpaintRequest
from tests.helpers import box_mask, noise_image

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

APP = "fal-ai/fast-lightning-sdxl/inpainting"


@pytest.fixture(scope="module")
def cuda_engine(spec: Any, resolver: Any) -> Engine:
    return Engine.load(
        spec, device="cuda", resolver=resolver, variants=[(APP, 1)], safety_checker=False, prompt_expansion=False
    )


def test_real_oom_is_retried_and_memory_returns_to_baseline(cuda_engine: Engine) -> None:
    request = InpaintRequest(
        app_id=APP, image=noise_image(), mask=box_mask(), prompt="a boat", steps=1, seed=1, image_size=(64, 48)
    )
    clean = cuda_engine.run([request])[0]
    torch.cuda.synchronize()
    baseline = torch.cuda.memory_allocated()
    hogged: list[int] = []

    def hog(point: FaultPoint) -> None:
        """Fill the GPU in 1 GiB blocks until CUDA refuses: the blocks live in this frame, which the
        OutOfMemoryError's traceback keeps alive until the engine lets go of it."""
        if point.name == "decode" and not point.vae_tiling:
            blocks = []
            while True:
                blocks.append(torch.empty(2**30, dtype=torch.uint8, device="cuda"))
                hogged.append(len(blocks))

    cuda_engine.fault_hook = hog
    try:
        result = cuda_engine.run([request])[0]
    finally:
        cuda_engine.fault_hook = None
    assert hogged, "the hook never ran"
    assert result.error is None
    # 64x48 is below one VAE tile: the retry computes what the clean run did (up to GPU rounding).
    diff = np.abs(np.asarray(result.images[0]).astype(int) - np.asarray(clean.images[0]).astype(int))
    assert diff.max() <= 2
    torch.cuda.synchronize()
    assert torch.cuda.memory_allocated() == baseline
    assert cuda_engine.run([request])[0].error is None
