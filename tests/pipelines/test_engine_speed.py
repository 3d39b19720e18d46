"""The engine with every speed lever on (as on CUDA) computes what the plain engine computes.

An engine loaded with fused QKV, channels_last and torch.compile (the eager backend: on CPU the
capture is checked, not Inductor's code) pads UNet batches to the buckets 1/2/4/8, keeps a batch's
shape when one of its requests is cancelled, and serves repeated prompts from the prompt cache,
with images equal to the plain engine's (within rounding).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest

from pipelines.engine import Engine
from pipelines.errors import RequestCancelled
from pipelines.gpu_faults import low_memory_vae
from pipelines.optimize import SpeedOptions
from pipelines.types import InpaintRequest
from tests.helpers import box_mask, noise_image

APP = "fal-ai/fast-lightning-sdxl/inpainting"


@pytest.fixture(scope="module")
def fast_engine(spec: Any, resolver: Any) -> Engine:
    speed = SpeedOptions(fuse_qkv=True, channels_last=True, compile=True, compile_backend="eager")
    return Engine.load(
        spec,
        device="cpu",
        resolver=resolver,
        variants=[(APP, 4)],
        safety_checker=False,
        prompt_expansion=False,
        speed=speed,
        prompt_cache_size=16,
    )


class DenoiseSpy:
    """Wraps ``pipe.denoise``: records each batch's rows and input images, and what ``on_step`` returned."""

    def __init__(self, pipe: Any) -> None:
        self.pipe = pipe
        self.original = pipe.denoise
        self.batches: list[tuple[int, int]] = []
        self.keeps: list[Any] = []

    def __call__(self, batch: Any, on_step: Any = None, unet: Any = None):
        self.batches.append((len(batch.image_of), batch.images.shape[0]))

        def recording(i: int, total: int):
            keep = on_step(i, total)
            self.keeps.append(keep)
            return keep

        return self.original(batch, recording if on_step else None, unet)


@pytest.fixture
def spy(fast_engine: Engine) -> Iterator[DenoiseSpy]:
    pipe = fast_engine.pipeline(fast_engine.variants[(APP, 4)])
    recorder = DenoiseSpy(pipe)
    pipe.denoise = recorder
    yield recorder
    del pipe.denoise  # back to the class's method


def _request(
    seed: int, prompt: str, request_id: str, num_images: int = 1, size: tuple[int, int] = (64, 48)
) -> InpaintRequest:
    return InpaintRequest(
        app_id=APP,
        image=noise_image(*size, seed=seed),
        mask=box_mask(*size),
        prompt=prompt,
        steps=4,
        seed=seed,
        image_size=size,
        num_images=num_images,
        enable_safety_checker=False,
        request_id=request_id,
    )


def _max_diff(a: Any, b: Any) -> int:
    return int(np.abs(np.asarray(a).astype(int) - np.asarray(b).astype(int)).max())


def test_padded_batch_gives_the_plain_engines_images(fast_engine: Engine, engine: Engine, spy: DenoiseSpy) -> None:
    """Three requests (4 images) -> one UNet batch of 4; two requests of 3 images -> 6 rows padded to 8.
    The VAE encodes only the real input images (no padding)."""
    requests = [_request(1, "a red door", "a"), _request(2, "a blue car", "b", 2), _request(3, "a boat", "c")]
    fast = fast_engine.run(requests)
    plain = [engine.run([r])[0] for r in requests]
    assert spy.batches == [(4, 3)]  # 4 rows; 3 input images, not padded
    for f, p in zip(fast, plain, strict=True):
        assert f.error is None and len(f.images) == len(p.images)
        assert max(_max_diff(x, y) for x, y in zip(f.images, p.images, strict=True)) <= 2

    spy.batches.clear()
    results = fast_engine.run([_request(4, "x", "d", 3), _request(5, "y", "e", 3)])
    assert spy.batches == [(8, 2)]  # 6 rows padded to 8; 2 input images
    assert [len(r.images) for r in results] == [3, 3]


def test_cancel_keeps_a_compiled_batch_at_its_shape(fast_engine: Engine, engine: Engine, spy: DenoiseSpy) -> None:
    """One of two requests is cancelled after the first step: the batch runs on at its shape (no new
    graph), the cancelled one ends cancelled, the other gets the image it gets alone."""
    keep, drop = _request(6, "a red door", "keep"), _request(7, "a blue car", "drop")
    results = fast_engine.run([keep, drop], should_stop=lambda rid: rid == "drop")
    assert spy.keeps[:-1] == [None] * (len(spy.keeps) - 1)  # never shrank
    assert isinstance(results[1].error, RequestCancelled)
    assert results[0].error is None
    assert _max_diff(results[0].images[0], engine.run([keep])[0].images[0]) <= 2


def test_cancelling_every_request_stops_at_once(fast_engine: Engine, spy: DenoiseSpy) -> None:
    steps: list[int] = []
    results = fast_engine.run(
        [_request(8, "a", "x"), _request(9, "b", "y")],
        should_stop=lambda rid: True,
        on_progress=lambda rid, step, total: steps.append(step),
    )
    assert all(isinstance(r.error, RequestCancelled) for r in results)
    assert spy.keeps == [[]]  # nothing left after the first step: the loop ends
    assert set(steps) == {1}


def test_repeated_prompts_come_from_the_cache(fast_engine: Engine) -> None:
    cache = fast_engine.prompt_cache
    first = fast_engine.run([_request(10, "a lighthouse at dusk", "p1")])[0]
    hits = cache.hits
    again = fast_engine.run([_request(10, "a lighthouse at dusk", "p2")])[0]
    assert cache.hits == hits + 1
    assert again.images[0].tobytes() == first.images[0].tobytes()


def test_cpu_defaults_leave_the_engine_plain(engine: Engine) -> None:
    """Engine.load on CPU applies no lever (the suite's shared engine): nothing padded, nothing compiled."""
    assert engine.speed == SpeedOptions()
    pipe = engine.pipeline(engine.variants[(APP, 4)])
    assert not getattr(pipe.unet, "_inpaint_compiled", False)


def _compiled_frames() -> int:
    """How many graphs dynamo has captured in this process so far."""
    from torch._dynamo.utils import counters

    return counters["stats"]["unique_graphs"]


def test_after_sealing_a_new_shape_runs_eagerly_and_matches(fast_engine: Engine, engine: Engine) -> None:
    """Once sealed (after the warm-up), a size the warm-up never ran is not compiled: it runs eagerly,
    with the same image; a warmed shape still uses its graph."""
    import torch

    fast_engine.run([_request(11, "warm", "w1")])  # 64x48 at batch 1: compiled by now
    odd = _request(12, "an odd size", "odd", size=(72, 56))
    fast_engine.seal_compiled_shapes()
    try:
        before = _compiled_frames()
        (result,) = fast_engine.run([odd])
        assert _compiled_frames() == before  # nothing compiled for the new shape
    finally:
        torch.compiler.set_stance("default")
    assert result.error is None
    assert _max_diff(result.images[0], engine.run([odd])[0].images[0]) <= 2


def test_low_memory_retry_runs_eagerly_on_a_compiled_engine(fast_engine: Engine, engine: Engine) -> None:
    """An OOM just before the VAE decode: the retry with VAE tiling and slicing runs with compilation off
    (tiles reuse decoder outputs that CUDA graphs would overwrite): nothing is compiled during it, although
    its decoder shapes are new, and it gives the plain engine's tiled image."""
    from pipelines.fault_injection import FaultPoint, inject

    at_tiled_decode: list[int] = []

    def hook(point: FaultPoint) -> None:
        if point.name == "decode" and not point.vae_tiling:
            inject("oom", "decode")
        if point.name == "decode" and point.vae_tiling:
            at_tiled_decode.append(_compiled_frames())

    request = _request(13, "a red door", "oom", size=(88, 40))  # a size no other test uses: never compiled
    fast_engine.fault_hook = hook
    try:
        (result,) = fast_engine.run([request])
    finally:
        fast_engine.fault_hook = None
    assert result.error is None and len(at_tiled_decode) == 1
    assert _compiled_frames() == at_tiled_decode[0]  # the tiled decode compiled nothing
    with low_memory_vae(engine.pipeline(engine.variants[(APP, 4)]).vae):  # the same tiles, plain engine
        expected = engine.run([request])[0]
    assert _max_diff(result.images[0], expected.images[0]) <= 2


def _vae_batches(fast_engine: Engine) -> tuple[list[int], list[int], Any]:
    """Record the batch size of every VAE encode and decode of the fast engine's variant."""
    vae = fast_engine.pipeline(fast_engine.variants[(APP, 4)]).vae
    encodes: list[int] = []
    decodes: list[int] = []
    handles = [
        vae.encoder.register_forward_hook(lambda m, args, out: encodes.append(args[0].shape[0])),
        vae.decoder.register_forward_hook(lambda m, args, out: decodes.append(args[0].shape[0])),
    ]
    return encodes, decodes, handles


def test_padding_rows_are_never_vae_encoded_or_decoded(fast_engine: Engine, spy: DenoiseSpy) -> None:
    """Issue 10 §5: 3 rows run as a UNet batch of 4, but the VAE encodes 2 images and decodes 3."""
    encodes, decodes, handles = _vae_batches(fast_engine)
    try:
        results = fast_engine.run([_request(20, "a", "a", 2), _request(21, "b", "b")])
    finally:
        for handle in handles:
            handle.remove()
    assert [len(r.images) for r in results] == [2, 1]
    assert spy.batches == [(4, 2)] and encodes == [2] and decodes == [3]


def test_more_rows_than_the_largest_bucket_run_as_several_batches(
    fast_engine: Engine, engine: Engine, spy: DenoiseSpy
) -> None:
    """Issue 10 §5: 4 requests of 8 images are 32 rows: four batches of 8 (a warmed shape), not one of 32;
    every image equals the one the request gets alone."""
    requests = [_request(30 + k, f"prompt {k}", f"r{k}", 8) for k in range(3)] + [_request(33, "last", "r3", 2)]
    encodes, decodes, handles = _vae_batches(fast_engine)
    try:
        results = fast_engine.run(requests)
    finally:
        for handle in handles:
            handle.remove()
    assert spy.batches == [(8, 1), (8, 1), (8, 1), (2, 1)]
    assert decodes == [8, 8, 8, 2] and encodes == [1, 1, 1, 1]
    assert [len(r.images) for r in results] == [8, 8, 8, 2]
    alone = engine.run([requests[1]])[0]
    assert max(_max_diff(x, y) for x, y in zip(results[1].images, alone.images, strict=True)) <= 2


def test_rows_are_chunked_in_order_without_splitting_a_request() -> None:
    from pipelines.engine import chunk_by_rows

    def members(*counts: int) -> list[tuple[int, Any]]:
        return [(i, type("P", (), {"request": type("R", (), {"num_images": n})()})()) for i, n in enumerate(counts)]

    def shape(chunks: list[list[tuple[int, Any]]]) -> list[list[int]]:
        return [[i for i, _ in chunk] for chunk in chunks]

    assert shape(chunk_by_rows(members(8, 8, 8, 8), 8)) == [[0], [1], [2], [3]]
    assert shape(chunk_by_rows(members(3, 3, 2, 1), 8)) == [[0, 1, 2], [3]]
    assert shape(chunk_by_rows(members(1, 1, 1, 1, 1, 1, 1, 1, 1), 8)) == [[0, 1, 2, 3, 4, 5, 6, 7], [8]]
    assert shape(chunk_by_rows(members(5, 4, 4), 8)) == [[0], [1, 2]]
