"""The denoising loop never reads a device value back to the host (issue 10, section 4).

Every ATen call of ``FewStepInpaintPipeline.denoise`` (image encode, noise, every UNet step, the
sampler's math, the re-noise and blend, a cancellation that drops rows) is watched by a
``TorchDispatchMode``. On CUDA a host read (``.item()``, ``.tolist()``, ``bool(tensor)``, a data-dependent
shape) or a tensor made from host data (``torch.tensor(list)``: a host-to-device copy) is a sync that
stalls the GPU between two UNet calls; here, on the CPU, the same calls are counted and must be zero.
``tests/gpu/test_gpu_syncs.py`` checks the same loop under ``torch.cuda.set_sync_debug_mode("error")``.
"""

from __future__ import annotations

from typing import Any
from unittest import mock

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from pipelines.types import InpaintRequest
from tests.helpers import box_mask, noise_image

aten = torch.ops.aten
# Ops that read a tensor's values on the host, or build a tensor from host data.
HOST_READS = {
    aten.item,  # .item(), float(t), bool(t) (under inference mode; below it, as the next)
    aten._local_scalar_dense,
    aten.is_nonzero,
    aten.equal,
    aten.nonzero,
    aten.masked_select,
    aten._unique2,
    aten.unique_consecutive,
    aten.unique_dim,
    aten.lift_fresh,  # torch.tensor(python data)
    aten.lift_fresh_copy,
}


# Tensor methods that read values without going through the dispatcher.
HOST_METHODS = ("tolist", "numpy", "__array__")


class HostReads(TorchDispatchMode):
    """Records host reads: dispatched ops of HOST_READS, and calls of HOST_METHODS (patched while active)."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[str] = []
        self.calls = 0
        self._patches: list[Any] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.calls += 1
        if func.overloadpacket in HOST_READS:
            self.seen.append(str(func))
        return func(*args, **(kwargs or {}))

    def __enter__(self):
        for name in HOST_METHODS:
            original = getattr(torch.Tensor, name)

            def recording(tensor, *args, _name=name, _original=original, **kwargs):
                self.seen.append(f"Tensor.{_name}")
                return _original(tensor, *args, **kwargs)

            patch = mock.patch.object(torch.Tensor, name, recording)
            patch.start()
            self._patches.append(patch)
        return super().__enter__()

    def __exit__(self, *exc):
        for patch in self._patches:
            patch.stop()
        return super().__exit__(*exc)


def _watch_denoise(engine: Any, app: str, steps: int) -> tuple[list[HostReads], Any]:
    pipe = engine.pipeline(engine.variants[(app, steps)])
    modes: list[HostReads] = []
    original = pipe.denoise

    def watched(batch, on_step=None, unet=None):
        mode = HostReads()
        modes.append(mode)
        with mode:
            return original(batch, on_step, unet)

    pipe.denoise = watched
    return modes, pipe


def _request(app: str, steps: int, seed: int, request_id: str, strength: float = 0.95) -> InpaintRequest:
    return InpaintRequest(
        app_id=app,
        image=noise_image(seed=seed),
        mask=box_mask(),
        prompt=f"prompt {seed}",
        steps=steps,
        strength=strength,
        seed=seed,
        num_images=2,
        image_size=(64, 48),
        enable_safety_checker=False,
        request_id=request_id,
    )


CASES = [
    ("fal-ai/fast-lightning-sdxl/inpainting", 1),
    ("fal-ai/fast-lightning-sdxl/inpainting", 4),
    ("fal-ai/fast-lightning-sdxl/inpainting", 8),
    ("fal-ai/hyper-sdxl/inpainting", 1),
    ("fal-ai/hyper-sdxl/inpainting", 2),
    ("fal-ai/hyper-sdxl/inpainting", 4),
]


@pytest.mark.parametrize(("app", "steps"), CASES)
@pytest.mark.parametrize("strength", [1.0, 0.7])
def test_the_denoising_loop_reads_nothing_back_from_the_device(engine, app, steps, strength) -> None:
    modes, pipe = _watch_denoise(engine, app, steps)
    try:
        results = engine.run([_request(app, steps, 1, "a", strength), _request(app, steps, 2, "b", strength)])
    finally:
        del pipe.denoise
    assert all(r.error is None for r in results)
    assert len(modes) == 1 and modes[0].calls > 100  # the loop really ran under the mode
    assert modes[0].seen == []


def test_a_cancel_between_steps_reads_nothing_back_either(engine) -> None:
    """The plain engine drops a cancelled request's rows between steps: with slices, not index tensors."""
    app, steps = "fal-ai/fast-lightning-sdxl/inpainting", 4
    modes, pipe = _watch_denoise(engine, app, steps)
    try:
        results = engine.run(
            [_request(app, steps, 1, "keep"), _request(app, steps, 2, "drop")], should_stop=lambda rid: rid == "drop"
        )
    finally:
        del pipe.denoise
    assert results[0].error is None and results[1].error is not None
    assert modes[0].seen == []


@pytest.mark.parametrize(
    ("read", "name"),
    [
        (lambda t: t.sum().item(), "item"),
        (lambda t: bool(t.sum() > 0), "is_nonzero"),
        (lambda t: t.tolist(), "Tensor.tolist"),
        (lambda t: torch.tensor([1.0, 2.0]), "lift_fresh"),
    ],
    ids=["item", "bool", "tolist", "tensor-from-list"],
)
def test_the_watch_sees_a_host_read_when_there_is_one(engine, read, name) -> None:
    """The check can fail: a loop step that reads a value (once per step, per request) is caught."""
    app, steps = "fal-ai/fast-lightning-sdxl/inpainting", 4
    modes, pipe = _watch_denoise(engine, app, steps)
    try:
        engine.run([_request(app, steps, 1, "a")], on_progress=lambda *_: read(torch.ones(2)))
    finally:
        del pipe.denoise
    assert len([op for op in modes[0].seen if name in op]) == steps
