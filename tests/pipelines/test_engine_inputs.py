"""Masks in every format and EXIF orientation, exact pixels outside the mask, seeds, NaN, cancel."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image, ImageOps

from pipelines import images as imgs
from pipelines.encode import encode_image
from pipelines.errors import NonFiniteOutputError, RequestCancelled
from pipelines.types import InpaintRequest
from tests.helpers import box_mask, noise_image, png

APP = "fal-ai/fast-lightning-sdxl/inpainting"


def mask_variants() -> dict[str, Image.Image]:
    base = box_mask(64, 48)
    rgba_canvas = Image.new("RGBA", (64, 48), (0, 0, 0, 0))
    rgba_canvas.paste((0, 0, 0, 255), (16, 12, 48, 36))  # black opaque strokes on a transparent canvas
    palette = base.convert("P")
    palette_t = Image.new("P", (64, 48), 0)
    palette_t.putpalette([0, 0, 0, 255, 255, 255] + [0] * 762)
    palette_t.paste(1, (16, 12, 48, 36))
    palette_t.info["transparency"] = 0
    sixteen = Image.fromarray(np.asarray(base).astype(np.uint16) * 257).convert("I;16")
    return {
        "L": base,
        "RGB": base.convert("RGB"),
        "RGBA-alpha": rgba_canvas,
        "RGBA-opaque": base.convert("RGBA"),
        "1": base.convert("1"),
        "P": palette,
        "P-transparency": palette_t,
        "I;16": sixteen,
        "LA": Image.merge("LA", (base, base)),
        "soft": Image.fromarray(np.tile(np.linspace(0, 255, 64).astype(np.uint8), (48, 1))),
        "smaller": box_mask(32, 24),
    }


def outside_identical(result_image: Image.Image, reference: Image.Image, mask: Image.Image) -> None:
    outside = ~imgs.binarize(mask)
    assert outside.any()
    out, ref = np.asarray(result_image), np.asarray(reference)
    assert np.array_equal(out[outside], ref[outside])


@pytest.mark.parametrize("kind", list(mask_variants()))
def test_outside_mask_pixels_are_identical_for_every_mask_format(engine, kind):
    image = noise_image(64, 48, seed=2)
    raw_mask = mask_variants()[kind]
    (result,) = engine.run(
        [InpaintRequest(app_id=APP, image=png(image), mask=png(raw_mask), prompt="x", steps=1, seed=0)]
        if kind != "I;16"
        else [InpaintRequest(app_id=APP, image=png(image), mask=raw_mask, prompt="x", steps=1, seed=0)]
    )
    assert result.error is None
    mask = imgs.to_mask(imgs.open_image(png(raw_mask) if kind != "I;16" else raw_mask, "mask_url"))
    mask = mask.resize(image.size, Image.Resampling.NEAREST)
    assert result.images[0].size == image.size
    outside_identical(result.images[0], image, mask)
    inside = imgs.binarize(mask)
    assert inside.any()
    assert not np.array_equal(np.asarray(result.images[0])[inside], np.asarray(image)[inside])
    if kind == "smaller":  # stretched to the image, as fal does, and said
        assert result.warnings == [
            "The mask is 32x24 but the image is 64x48: the mask was resized to 64x48 (stretched, nearest neighbour)"
        ]
    else:
        assert result.warnings == []


@pytest.mark.parametrize("orientation", range(1, 9))
def test_exif_orientation_applies_to_image_and_mask(engine, small_work, orientation):
    upright = noise_image(64, 48, seed=orientation)
    upright_mask = box_mask(64, 48, (0, 0, 24, 48))  # asymmetric, so a wrong rotation shows
    exif = Image.Exif()
    exif[0x0112] = orientation
    # Store the pixels so that applying the orientation gives back the upright picture.
    inverse = {
        1: None,
        2: Image.Transpose.FLIP_LEFT_RIGHT,
        3: Image.Transpose.ROTATE_180,
        4: Image.Transpose.FLIP_TOP_BOTTOM,
        5: Image.Transpose.TRANSPOSE,
        6: Image.Transpose.ROTATE_90,
        7: Image.Transpose.TRANSVERSE,
        8: Image.Transpose.ROTATE_270,
    }[orientation]
    stored = upright.transpose(inverse) if inverse is not None else upright
    stored_mask = upright_mask.transpose(inverse) if inverse is not None else upright_mask
    image_bytes, mask_bytes = png(stored, exif=exif.tobytes()), png(stored_mask, exif=exif.tobytes())
    assert ImageOps.exif_transpose(Image.open(io.BytesIO(image_bytes))).tobytes() == upright.tobytes()
    (result,) = engine.run(
        [InpaintRequest(app_id=APP, image=image_bytes, mask=mask_bytes, prompt="x", steps=1, seed=0)]
    )
    assert result.images[0].size == (64, 48)
    outside_identical(result.images[0], upright, upright_mask)


def test_image_size_composites_onto_the_resized_input(engine):
    image, mask = noise_image(80, 60, seed=9), box_mask(80, 60)
    (result,) = engine.run(
        [InpaintRequest(app_id=APP, image=image, mask=mask, prompt="x", steps=2, seed=1, image_size=(64, 40))]
    )
    fitted = imgs.fit(image, mask, (64, 40), engine.work_pixels)
    assert result.images[0].size == (64, 40)
    outside_identical(result.images[0], fitted.image, fitted.mask)


@pytest.mark.parametrize("mode", ["CMYK", "I;16", "P", "L", "LA", "RGBA"])
def test_input_image_modes_are_converted_to_rgb(engine, mode):
    rgb = noise_image(64, 48, seed=4)
    image = rgb.convert("L").convert("I;16") if mode == "I;16" else rgb.convert(mode)
    (result,) = engine.run(
        [InpaintRequest(app_id=APP, image=image, mask=box_mask(), prompt="x", steps=1, seed=0, image_size=(64, 48))]
    )
    assert result.error is None and result.images[0].mode == "RGB"
    outside_identical(result.images[0], imgs.to_rgb(image), box_mask())


def test_all_black_mask_returns_the_input_without_running_the_unet(engine):
    pipe = engine.pipeline(engine.variants[(APP, 4)])
    calls = []
    handle = pipe.unet.register_forward_hook(lambda *a: calls.append(1))
    try:
        image = noise_image(64, 48, seed=8)
        (result,) = engine.run(
            [InpaintRequest(app_id=APP, image=image, mask=Image.new("L", (64, 48), 0), prompt="x", num_images=2)]
        )
    finally:
        handle.remove()
    assert calls == []
    assert [im.tobytes() for im in result.images] == [image.tobytes()] * 2
    assert result.has_nsfw_concepts == [False, False]


def _request(**kw) -> InpaintRequest:
    defaults = dict(app_id=APP, image=noise_image(), mask=box_mask(), prompt="a boat", steps=2, image_size=(64, 48))
    return InpaintRequest(**{**defaults, **kw})


@pytest.mark.parametrize("fmt", ["jpeg", "png"])
def test_same_seed_gives_the_same_bytes(engine, fmt):
    first = engine.run([_request(seed=42, num_images=2)])[0]
    second = engine.run([_request(seed=42, num_images=2)])[0]
    assert [encode_image(i, fmt) for i in first.images] == [encode_image(i, fmt) for i in second.images]
    other = engine.run([_request(seed=43)])[0]
    assert encode_image(other.images[0], fmt) != encode_image(first.images[0], fmt)


def test_image_k_is_seeded_seed_plus_k_independent_of_its_batch(engine):
    pair = engine.run([_request(seed=100, num_images=2)])[0]
    alone = engine.run([_request(seed=101, num_images=1)])[0]
    a, b = np.asarray(pair.images[1]).astype(int), np.asarray(alone.images[0]).astype(int)
    assert np.abs(a - b).max() <= 2  # same noise; only batch-size float rounding may differ
    assert not np.array_equal(np.asarray(pair.images[0]), np.asarray(pair.images[1]))


def test_requests_batched_together_match_running_alone(engine):
    r1, r2 = _request(seed=7, prompt="a red boat"), _request(seed=8, prompt="a blue car", image=noise_image(seed=3))
    p1, p2 = engine.prepare(r1), engine.prepare(r2)
    assert engine.batch_key(p1) == engine.batch_key(p2)
    pipe = engine.pipeline(p1.variant)
    calls = []
    handle = pipe.unet.register_forward_hook(lambda mod, args, out: calls.append(args[0].shape[0]))
    try:
        together = engine.run([p1, p2])
    finally:
        handle.remove()
    assert calls == [2, 2]  # one UNet batch of two images per step
    for batched, single in zip(together, [engine.run([r1])[0], engine.run([r2])[0]], strict=True):
        diff = np.abs(np.asarray(batched.images[0]).astype(int) - np.asarray(single.images[0]).astype(int))
        assert diff.max() <= 2


def test_random_seed_is_drawn_and_reported(engine):
    a, b = engine.run([_request(seed=None)])[0], engine.run([_request(seed=None)])[0]
    assert isinstance(a.seed, int) and a.seed != b.seed
    again = engine.run([_request(seed=a.seed)])[0]
    assert again.images[0].tobytes() == a.images[0].tobytes()


def _decoder_fault(engine, replace, times: int | None = None):
    """Replace the VAE decoder's output (``replace(out)``) for the first ``times`` calls (all if None)."""
    pipe = engine.pipeline(engine.variants[(APP, 2)])
    calls: list[torch.dtype] = []

    def hook(mod, args, out):
        calls.append(out.dtype)
        return replace(out) if times is None or len(calls) <= times else out

    return pipe.vae.decoder.register_forward_hook(hook), calls


@pytest.mark.parametrize(
    "fault",
    [lambda out: torch.full_like(out, float("nan")), lambda out: torch.full_like(out, float("-inf"))],
    ids=["nan", "inf"],
)
def test_unusable_decode_is_an_error_not_an_image(engine, fault):
    """M9: a NaN/inf decode is decoded again in fp32; if that is no better, ``nan_output``."""
    handle, calls = _decoder_fault(engine, fault)
    try:
        (result,) = engine.run([_request(seed=1)])
    finally:
        handle.remove()
    assert isinstance(result.error, NonFiniteOutputError) and result.images == []
    assert result.error.error_type == "nan_output"
    assert calls == [torch.float32, torch.float32]  # the first decode, then the fp32 retry
    assert engine.run([_request(seed=1)])[0].error is None  # the engine is fine afterwards


def test_a_black_decode_is_an_image_not_an_overflow(engine):
    """Issue 10 §5: black is a legitimate picture (a night sky): no fp32 re-decode, no error, a black
    repainted region in the output."""
    handle, calls = _decoder_fault(engine, lambda out: torch.full_like(out, -1.5))  # black once clamped
    try:
        (result,) = engine.run([_request(seed=1, enable_safety_checker=False)])
    finally:
        handle.remove()
    assert result.error is None and result.warnings == []
    assert calls == [torch.float32]  # one decode, no retry
    image, mask = np.asarray(result.images[0]), np.asarray(box_mask(64, 48)) >= 128
    assert (image[mask] == 0).all() and image[~mask].any()


def test_a_decode_that_overflows_once_is_saved_by_the_fp32_retry(engine):
    """M9: when only the first (reduced-precision) decode fails, the user gets the image and a warning."""
    (expected,) = engine.run([_request(seed=1)])
    handle, calls = _decoder_fault(engine, lambda out: torch.full_like(out, float("nan")), times=1)
    try:
        (result,) = engine.run([_request(seed=1)])
    finally:
        handle.remove()
    assert result.error is None and len(calls) == 2
    assert result.images[0].tobytes() == expected.images[0].tobytes()
    assert any("decoded in fp32" in w for w in result.warnings)
    assert expected.warnings == []


def test_the_fp32_retry_decodes_only_the_bad_rows_with_a_copy(engine, monkeypatch):
    """In a batch, only the unusable image is decoded again, by a temporary fp32 copy of the VAE: the
    shared (here bf16, as on CUDA) VAE is never cast, so its compiled graphs and fused weights stay."""
    from pipelines import inpaint

    pipe = engine.pipeline(engine.variants[(APP, 2)])
    pipe.vae.to(torch.bfloat16)
    weight = pipe.vae.decoder.conv_in.weight
    sizes: list[tuple[int, torch.dtype]] = []

    def hook(mod, args, out):
        sizes.append((out.shape[0], out.dtype))
        if len(sizes) == 1:
            out = out.clone()
            out[1] = float("nan")
        return out

    make_copy = inpaint._fp32_copy

    def spied_copy(vae):
        copy = make_copy(vae)
        copy.decoder.register_forward_hook(hook)
        return copy

    monkeypatch.setattr(inpaint, "_fp32_copy", spied_copy)
    handle = pipe.vae.decoder.register_forward_hook(hook)
    try:
        results = engine.run([_request(seed=1, request_id="a"), _request(seed=2, request_id="b")])
    finally:
        handle.remove()
        untouched = pipe.vae.dtype == torch.bfloat16 and pipe.vae.decoder.conv_in.weight is weight
        pipe.vae.to(torch.float32)
    assert sizes == [(2, torch.bfloat16), (1, torch.float32)]
    assert untouched
    assert [r.error for r in results] == [None, None]
    assert results[0].warnings == [] and results[1].warnings


def test_cancel_between_steps_stops_one_request_and_not_the_other(engine):
    keep, drop = _request(seed=1, request_id="keep"), _request(seed=2, request_id="drop")
    progress: list[tuple[str, int, int]] = []
    pipe = engine.pipeline(engine.variants[(APP, 2)])
    calls = []
    handle = pipe.unet.register_forward_hook(lambda mod, args, out: calls.append(args[0].shape[0]))
    try:
        results = engine.run(
            [keep, drop],
            should_stop=lambda rid: rid == "drop",
            on_progress=lambda rid, i, n: progress.append((rid, i, n)),
        )
    finally:
        handle.remove()
    assert calls == [2, 1]  # the cancelled request left the batch after step 1
    assert results[0].error is None and len(results[0].images) == 1
    assert isinstance(results[1].error, RequestCancelled) and results[1].images == []
    assert ("keep", 2, 2) in progress and ("drop", 1, 2) in progress and ("drop", 2, 2) not in progress
    alone = engine.run([keep])[0]
    diff = np.abs(np.asarray(alone.images[0]).astype(int) - np.asarray(results[0].images[0]).astype(int))
    assert diff.max() <= 2


def test_expand_prompt_is_seeded_and_returned(engine):
    a = engine.run([_request(seed=5, expand_prompt=True)])[0]
    b = engine.run([_request(seed=5, expand_prompt=True)])[0]
    c = engine.run([_request(seed=6, expand_prompt=True)])[0]
    plain = engine.run([_request(seed=5)])[0]
    assert a.prompt == b.prompt and a.prompt.startswith("a boat") and a.prompt != "a boat"
    assert c.prompt != a.prompt
    assert plain.prompt == "a boat"
    assert a.images[0].tobytes() != plain.images[0].tobytes()  # the expanded prompt was used
