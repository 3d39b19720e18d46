"""On CUDA the denoising loop never makes the host wait for the GPU (issue 10, section 4). Skipped without CUDA.

``torch.cuda.set_sync_debug_mode("error")`` turns every synchronising call (``.item()``, a copy from
pageable memory, ``cudaStreamSynchronize``...) into an exception; the loop of every scheduler kind runs
under it, plain and compiled with CUDA graphs. ``tests/pipelines/test_host_syncs.py`` is the CPU twin.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch

from pipelines.engine import Engine
from pipelines.optimize import SpeedOptions
from pipelines.types import InpaintRequest
from pipelines.warmup import WarmUnit, run_unit
from tests.helpers import box_mask, noise_image

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

LIGHTNING, HYPER = "fal-ai/fast-lightning-sdxl/inpainting", "fal-ai/hyper-sdxl/inpainting"
VARIANTS = [(LIGHTNING, 4), (HYPER, 1), (HYPER, 2)]  # Euler, LCM, TCD


def _request(app: str, steps: int, seed: int) -> InpaintRequest:
    return InpaintRequest(
        app_id=app,
        image=noise_image(128, 96, seed=seed),
        mask=box_mask(128, 96),
        prompt=f"p{seed}",
        steps=steps,
        strength=0.9,
        seed=seed,
        num_images=2,
        image_size=(128, 96),
        enable_safety_checker=False,
        request_id=f"r{seed}",
    )


def _strict_denoise(engine: Engine) -> list[Any]:
    """Wrap every variant's ``denoise`` in sync-debug "error" mode; returns the list of pipelines to restore."""
    pipes = []
    for variant in engine.variants.values():
        pipe = engine.pipeline(variant)
        original = pipe.denoise

        def strict(batch, on_step=None, unet=None, _original=original):
            torch.cuda.synchronize()  # what came before may sync; the loop may not
            torch.cuda.set_sync_debug_mode("error")
            try:
                return _original(batch, on_step, unet)
            finally:
                torch.cuda.set_sync_debug_mode("default")

        pipe.denoise = strict
        pipes.append(pipe)
    return pipes


@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
def test_the_denoising_loop_never_syncs(cuda_engine_for, tmp_path, compiled: bool) -> None:
    speed = SpeedOptions.for_device("cuda", compile=compiled, cache_dir=tmp_path / "cache")
    engine = cuda_engine_for(VARIANTS, speed)
    if compiled:
        for app, steps in VARIANTS:
            for rows in (1, 2, 4):
                run_unit(engine, WarmUnit(app, steps, (128, 96), rows))
        assert len(engine.graphs) == 3 * len(VARIANTS)
    pipes = _strict_denoise(engine)
    try:
        for n, (app, steps) in enumerate(VARIANTS):
            results = engine.run([_request(app, steps, 10 * n)])
            assert all(r.error is None for r in results), [r.error for r in results]
    finally:
        for pipe in pipes:
            del pipe.denoise
