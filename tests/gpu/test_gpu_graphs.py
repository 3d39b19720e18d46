"""Real CUDA graphs (issue 10, section 2): recorded in the warm-up, replayed by requests with the images of
the eager engine, one memory pool for all, and no outputs clobbered across variants. Skipped without CUDA.
``tests/pipelines/test_graphs.py`` checks the same plumbing on the CPU with a stand-in backend.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch

from pipelines.optimize import SpeedOptions
from pipelines.types import InpaintRequest
from pipelines.warmup import WarmUnit, run_unit
from tests.helpers import box_mask, noise_image

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

LIGHTNING, HYPER = "fal-ai/fast-lightning-sdxl/inpainting", "fal-ai/hyper-sdxl/inpainting"
VARIANTS = [(LIGHTNING, 4), (HYPER, 4)]


def _request(app: str, seed: int) -> InpaintRequest:
    return InpaintRequest(
        app_id=app,
        image=noise_image(128, 128, seed=seed),
        mask=box_mask(128, 128),
        prompt=f"p{seed}",
        steps=4,
        seed=seed,
        image_size=(128, 128),
        enable_safety_checker=False,
        request_id=f"r{seed}",
    )


def _pixels(result: Any) -> np.ndarray:
    assert result.error is None, result.error
    return np.asarray(result.images[0]).astype(int)


def test_replayed_graphs_give_the_eager_engines_images(cuda_engine_for, tmp_path) -> None:
    graphed = cuda_engine_for(VARIANTS, SpeedOptions.for_device("cuda", cache_dir=tmp_path / "cache"))
    for app, steps in VARIANTS:
        run_unit(graphed, WarmUnit(app, steps, (128, 128), 1))
    assert len(graphed.graphs) == 2
    before = graphed.graphs.replays
    ours = {app: _pixels(graphed.run([_request(app, 7)])[0]) for app, _ in VARIANTS}
    assert graphed.graphs.replays == before + 8  # 4 steps x 2 variants, all replayed
    again = _pixels(graphed.run([_request(LIGHTNING, 7)])[0])  # after the other variant's replays
    assert np.array_equal(again, ours[LIGHTNING])
    eager = cuda_engine_for(VARIANTS, SpeedOptions.for_device("cuda", compile=False))
    for app, _ in VARIANTS:
        assert np.abs(_pixels(eager.run([_request(app, 7)])[0]) - ours[app]).max() <= 3
