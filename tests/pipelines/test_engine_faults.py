"""GPU faults in the real engine (tiny models, CPU), provoked through the test-only fault hook.

Out of memory: a batch is retried one request at a time, then a request alone with VAE tiling; a
request that never fits fails with ``gpu_oom`` while its batch-mates succeed. Fatal CUDA errors
escape as ``GpuFatalError`` (the server restarts the process). Reliability cases R8, R9.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import pytest
import torch

from pipelines.engine import Engine
from pipelines.errors import ConfigError, GpuFatalError, GpuOutOfMemory
from pipelines.fault_injection import ENV_VAR, FaultInjector, FaultPoint, hook_from_env
from pipelines.gpu_faults import classify_gpu_error
from pipelines.types import InpaintRequest
from tests.helpers import box_mask, noise_image

APP = "fal-ai/fast-lightning-sdxl/inpainting"
STEPS = 1


def _request(request_id: str, seed: int, prompt: str = "a boat", size: tuple[int, int] = (64, 48)) -> InpaintRequest:
    w, h = size
    return InpaintRequest(
        app_id=APP,
        image=noise_image(w, h, seed=seed),
        mask=box_mask(w, h),
        prompt=prompt,
        steps=STEPS,
        seed=seed,
        image_size=size,
        enable_safety_checker=False,
        request_id=request_id,
    )


@pytest.fixture
def vae(engine: Engine) -> Any:
    return engine.pipeline(engine.variants[(APP, STEPS)]).vae


@pytest.fixture
def inject(engine: Engine, vae: Any) -> Iterator[Any]:
    """``inject(rules)`` installs a fault injector on the shared engine; removed (and the VAE checked) after."""
    before = (vae.use_tiling, vae.use_slicing, vae.tile_sample_min_size, vae.tile_latent_min_size)

    def install(rules: Any) -> FaultInjector:
        injector = FaultInjector.from_spec(rules)
        engine.fault_hook = injector
        return injector

    yield install
    engine.fault_hook = None
    assert (vae.use_tiling, vae.use_slicing, vae.tile_sample_min_size, vae.tile_latent_min_size) == before


def _points(injector: FaultInjector, name: str) -> list[tuple[tuple[str, ...], bool]]:
    """(request ids, VAE tiling on) at every ``name`` point the run passed, in order."""
    return [(p.request_ids, p.vae_tiling) for p in injector.seen if p.name == name]


def _same_images(a: Any, b: Any) -> bool:
    return [im.tobytes() for im in a.images] == [im.tobytes() for im in b.images]


@pytest.mark.parametrize(
    ("exc", "kind"),
    [
        (torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"), "oom"),
        (RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB"), "oom"),  # older torch: a RuntimeError
        (RuntimeError("CUDA error: out of memory"), "oom"),
        (RuntimeError("CUDA error: an illegal memory access was encountered"), "fatal"),
        (RuntimeError("CUDA error: device-side assert triggered\nCompile with TORCH_USE_CUDA_DSA"), "fatal"),
        (RuntimeError("CUDA error: unspecified launch failure"), "fatal"),
        (RuntimeError("CUDA error: uncorrectable ECC error encountered"), "fatal"),
        (RuntimeError("mat1 and mat2 shapes cannot be multiplied (2x3 and 4x5)"), None),
        (ValueError("illegal memory access"), None),  # not a RuntimeError: not from CUDA
        (KeyError("decode"), None),
    ],
)
def test_gpu_errors_are_classified(exc: BaseException, kind: str | None) -> None:
    assert classify_gpu_error(exc) == kind


def test_oom_once_in_a_batch_retries_one_request_at_a_time(engine: Engine, inject: Any, vae: Any) -> None:
    """R8: the batch's decode runs out of memory once; each request alone then succeeds, with its own images."""
    a, b = _request("a", 1, "a red boat"), _request("b", 2, "a blue car")
    alone = {r.request_id: engine.run([r])[0] for r in (a, b)}
    pa, pb = engine.prepare(a), engine.prepare(b)
    assert engine.batch_key(pa) == engine.batch_key(pb)

    injector = inject({"at": "decode", "fault": "oom", "times": 1})
    progress: list[tuple[str, int, int]] = []
    results = engine.run([pa, pb], on_progress=lambda *args: progress.append(args))

    assert [r.request_id for r in results] == ["a", "b"]
    assert all(r.error is None for r in results), [r.error for r in results]
    assert _points(injector, "decode") == [(("a", "b"), False), (("a",), False), (("b",), False)]
    assert len(injector.fired) == 1
    for result in results:  # the retry is the same computation as a run of that request alone
        assert _same_images(result, alone[result.request_id])
    assert ("a", STEPS, STEPS) in progress and ("b", STEPS, STEPS) in progress
    assert not vae.use_tiling


def test_oom_alone_retries_with_vae_tiling_and_restores_the_vae(engine: Engine, inject: Any, vae: Any) -> None:
    """Every untiled decode runs out of memory: each request alone gets a second try with VAE tiling."""
    size = (128, 64)  # 16x8 latents: wider than the tiny VAE's 8-latent tile, so tiling really tiles
    a, b = _request("a", 1, size=size), _request("b", 2, size=size)
    injector = inject({"at": "decode", "fault": "oom", "tiled": False})
    shapes: list[tuple[int, ...]] = []
    handle = vae.decoder.register_forward_hook(lambda mod, args, out: shapes.append(tuple(args[0].shape)))
    try:
        results = engine.run([a, b])
    finally:
        handle.remove()

    assert all(r.error is None for r in results), [r.error for r in results]
    assert [r.images[0].size for r in results] == [size, size]
    assert _points(injector, "decode") == [
        (("a", "b"), False),
        (("a",), False),
        (("a",), True),
        (("b",), False),
        (("b",), True),
    ]
    assert len(injector.fired) == 3
    # Only the tiled decodes reached the decoder: in tiles smaller than the 16x8 latents (and no
    # full-size decode), proving the retry decoded with tiling on.
    assert shapes and all(shape[-1] <= 8 and shape[-2] <= 8 for shape in shapes), shapes
    assert (vae.use_tiling, vae.use_slicing) == (False, False)  # the fixture checks the tile sizes too

    engine.fault_hook = None  # the next run decodes untiled again: one full-size decode
    shapes.clear()
    handle = vae.decoder.register_forward_hook(lambda mod, args, out: shapes.append(tuple(args[0].shape)))
    try:
        assert engine.run([a])[0].error is None
    finally:
        handle.remove()
    assert [shape[-2:] for shape in shapes] == [(8, 16)]


def test_request_that_never_fits_fails_gpu_oom_and_its_batch_mates_succeed(
    engine: Engine, inject: Any, vae: Any
) -> None:
    """R9: OOM in every retry of one request (in the UNet loop): that request alone fails, ``gpu_oom``."""
    huge, fine = _request("huge", 1, "a huge castle"), _request("fine", 2, "a small boat")
    fine_alone = engine.run([fine])[0]
    injector = inject({"at": "denoise_step", "fault": "oom", "prompt": "huge"})

    results = engine.run([huge, fine])

    by_id = {r.request_id: r for r in results}
    assert isinstance(by_id["huge"].error, GpuOutOfMemory)
    assert by_id["huge"].error.error_type == "gpu_oom"
    assert "smaller image_size" in str(by_id["huge"].error)
    assert by_id["huge"].images == [] and by_id["huge"].seed == 1
    assert by_id["fine"].error is None and _same_images(by_id["fine"], fine_alone)
    # batch, huge alone, huge alone with tiling: three OOMs; then the device self-check for huge.
    assert [p.request_ids for p in injector.seen if p.name == "denoise_step" and p.step == 0] == [
        ("huge", "fine"),
        ("huge",),
        ("huge",),
        ("fine",),
    ]
    assert [p.request_ids for p in injector.seen if p.name == "device_check"] == [("huge",)]
    assert len(injector.fired) == 3 and not vae.use_tiling

    # The engine is fine afterwards: the next requests run, and "huge" itself once the fault is gone.
    assert engine.run([_request("next", 3)])[0].error is None
    engine.fault_hook = None
    assert engine.run([huge])[0].error is None


@pytest.mark.parametrize(
    "rules",
    [
        {"at": "denoise_step", "fault": "fatal"},
        [{"at": "decode", "fault": "oom"}, {"at": "device_check", "fault": "fatal"}],
    ],
    ids=["illegal-memory-access", "self-check-after-oom"],
)
def test_fatal_cuda_error_escapes_as_gpu_fatal_without_retries(engine: Engine, inject: Any, rules: Any) -> None:
    injector = inject(rules)
    with pytest.raises(GpuFatalError) as caught:
        engine.run([_request("a", 1), _request("b", 2)])
    assert caught.value.error_type == "cuda_fatal"
    assert "illegal memory access" in str(caught.value)
    if isinstance(rules, dict):  # no retry of any kind after a fatal error
        assert [p.request_ids for p in injector.seen] == [("a", "b")]
    engine.fault_hook = None
    assert engine.run([_request("a", 1)])[0].error is None  # (on CPU the "device" is of course fine)


def test_fault_spec_comes_from_the_environment_only_when_set(engine: Engine, monkeypatch: Any) -> None:
    assert hook_from_env({}) is None
    assert hook_from_env({ENV_VAR: ""}) is None
    for bad in (
        "{not json",
        '{"at": "encode", "fault": "oom"}',
        '{"at": "decode", "fault": "melt"}',
        '{"at": "decode", "fault": "oom", "times": "1"}',
        '{"x": 1}',
        "[1]",
    ):
        with pytest.raises(ConfigError, match=ENV_VAR):
            hook_from_env({ENV_VAR: bad})

    injector = hook_from_env({ENV_VAR: '[{"at": "decode", "fault": "oom", "times": 2, "min_batch": 2}]'})
    assert isinstance(injector, FaultInjector)
    single = FaultPoint("decode", ("a",), ("x",), vae_tiling=False)
    pair = FaultPoint("decode", ("a", "b"), ("x", "y"), vae_tiling=False)
    injector(single)  # below min_batch: nothing
    for _ in range(2):
        with pytest.raises(torch.cuda.OutOfMemoryError):
            injector(pair)
    injector(pair)  # times spent
    assert len(injector.fired) == 2

    hang = FaultInjector.from_spec({"at": "denoise_step", "fault": "hang", "seconds": 0.2})
    started = time.monotonic()
    hang(FaultPoint("denoise_step", ("a",), ("x",), vae_tiling=False, step=0))
    assert time.monotonic() - started >= 0.2

    # An engine built while the variable is set uses it (how subprocess servers get faults).
    monkeypatch.setenv(ENV_VAR, '{"at": "decode", "fault": "fatal"}')
    built = Engine(engine.spec, engine.store, engine.variants, None, None)
    assert isinstance(built.fault_hook, FaultInjector)
    with pytest.raises(GpuFatalError):
        built.run([_request("a", 1)])
    monkeypatch.delenv(ENV_VAR)
    assert Engine(engine.spec, engine.store, engine.variants, None, None).fault_hook is None
