"""pipelines.images: mask/RGB normalisation, decoding, working sizes, fit() and the final composite."""

from __future__ import annotations

import io

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image, ImageOps

from pipelines import images as imgs
from pipelines.errors import InputError
from tests.helpers import png


def arr(image: Image.Image) -> np.ndarray:
    return np.asarray(image)


def gradient_rgb(width: int = 6, height: int = 4) -> Image.Image:
    """An RGB image with every pixel distinct, so any flip or rotation changes it."""
    data = np.arange(width * height * 3, dtype=np.uint8).reshape(height, width, 3)
    return Image.fromarray(data, mode="RGB")


# ---------------------------------------------------------------------------------------------
# to_mask


def test_to_mask_l_passthrough():
    mask = Image.fromarray(np.array([[0, 1, 127, 128, 255]], dtype=np.uint8), mode="L")
    out = imgs.to_mask(mask)
    assert out.mode == "L"
    assert arr(out).tolist() == [[0, 1, 127, 128, 255]]


def test_to_mask_rgb_uses_luminance():
    data = np.array([[[255, 255, 255], [0, 0, 0], [255, 0, 0], [0, 255, 0], [0, 0, 255]]], dtype=np.uint8)
    out = imgs.to_mask(Image.fromarray(data, mode="RGB"))
    assert out.mode == "L"
    # ITU-R 601-2 luma: L = R*299/1000 + G*587/1000 + B*114/1000
    assert arr(out).tolist() == [[255, 0, 76, 150, 29]]


def test_to_mask_rgba_with_transparency_uses_alpha():
    # Opaque white-ish strokes on a fully transparent (black) canvas: the strokes are what to repaint.
    data = np.zeros((2, 3, 4), dtype=np.uint8)
    data[0, 1] = (0, 0, 0, 255)  # opaque *black* stroke: luminance would say "keep"; alpha says repaint
    data[1, 2] = (255, 255, 255, 255)
    data[1, 0] = (255, 255, 255, 0)  # transparent white: luminance would say repaint; alpha says keep
    out = imgs.to_mask(Image.fromarray(data, mode="RGBA"))
    assert out.mode == "L"
    assert arr(out).tolist() == [[0, 255, 0], [0, 0, 255]]


def test_to_mask_rgba_partial_alpha_is_the_alpha():
    data = np.full((1, 3, 4), 255, dtype=np.uint8)
    data[0, :, 3] = (10, 200, 255)
    out = imgs.to_mask(Image.fromarray(data, mode="RGBA"))
    assert arr(out).tolist() == [[10, 200, 255]]


def test_to_mask_rgba_fully_opaque_uses_luminance():
    data = np.array([[[255, 255, 255, 255], [0, 0, 0, 255], [100, 100, 100, 255]]], dtype=np.uint8)
    out = imgs.to_mask(Image.fromarray(data, mode="RGBA"))
    assert out.mode == "L"
    assert arr(out).tolist() == [[255, 0, 100]]


def test_to_mask_la_transparent_uses_alpha_and_opaque_uses_l():
    transparent = Image.new("LA", (3, 1))
    transparent.putdata([(255, 0), (0, 255), (40, 130)])
    assert arr(imgs.to_mask(transparent)).tolist() == [[0, 255, 130]]

    opaque = Image.new("LA", (3, 1))
    opaque.putdata([(255, 255), (0, 255), (40, 255)])
    out = imgs.to_mask(opaque)
    assert out.mode == "L"
    assert arr(out).tolist() == [[255, 0, 40]]


def test_to_mask_mode_1():
    one = Image.new("1", (3, 1), 0)
    one.putpixel((1, 0), 1)
    out = imgs.to_mask(one)
    assert out.mode == "L"
    assert arr(out).tolist() == [[0, 255, 0]]


def _palette_image() -> Image.Image:
    image = Image.new("P", (3, 1))
    palette = [0, 0, 0, 255, 255, 255, 200, 200, 200] + [0] * (256 * 3 - 9)
    image.putpalette(palette)
    image.putdata([0, 1, 2])
    return image


def test_to_mask_palette_without_transparency_uses_luminance():
    image = _palette_image()
    assert "transparency" not in image.info
    out = imgs.to_mask(image)
    assert out.mode == "L"
    assert arr(out).tolist() == [[0, 255, 200]]


def test_to_mask_palette_with_transparency_uses_alpha():
    image = _palette_image()
    image.info["transparency"] = 1  # index 1 (white) is transparent: it is *kept*, not repainted
    out = imgs.to_mask(image)
    assert out.mode == "L"
    assert arr(out).tolist() == [[255, 0, 255]]


def test_to_mask_palette_with_transparency_survives_png_round_trip():
    image = _palette_image()
    data = png(image, transparency=0)
    decoded = imgs.open_image(data, "mask_url")
    assert arr(imgs.to_mask(decoded)).tolist() == [[0, 255, 255]]


def test_to_mask_i16_is_scaled_not_clipped():
    image = Image.fromarray(np.array([[0, 257, 32768, 65535]], dtype=np.uint16))
    assert image.mode == "I;16"
    out = imgs.to_mask(image)
    assert out.mode == "L"
    assert arr(out).tolist() == [[0, 1, 128, 255]]


def test_to_mask_i16_png_round_trip():
    image = Image.fromarray(np.array([[0, 65535], [65535, 0]], dtype=np.uint16))
    decoded = imgs.open_image(png(image), "mask_url")
    assert decoded.mode.startswith("I")
    assert arr(imgs.to_mask(decoded)).tolist() == [[0, 255], [255, 0]]


def test_to_mask_mode_i_is_scaled_not_clipped():
    image = Image.fromarray(np.array([[0, 32768, 65535]], dtype=np.int32))
    assert image.mode == "I"
    assert arr(imgs.to_mask(image)).tolist() == [[0, 128, 255]]
    # Pillow's own convert would turn 32768 into 255 (clip); the module scales it to mid-grey.
    assert arr(image.convert("L")).tolist() != arr(imgs.to_mask(image)).tolist()


def test_to_mask_big_endian_16_bit():
    image = Image.new("I;16B", (3, 1))
    image.frombytes(np.array([0, 32768, 65535], dtype=">u2").tobytes())
    assert arr(imgs.to_mask(image)).tolist() == [[0, 128, 255]]


def test_to_mask_float_in_unit_range_is_scaled():
    image = Image.fromarray(np.array([[0.0, 0.5, 1.0]], dtype=np.float32))
    assert image.mode == "F"
    out = imgs.to_mask(image)
    assert out.mode == "L"
    assert arr(out).tolist() == [[0, 128, 255]]


def test_to_mask_float_in_byte_range_is_kept():
    image = Image.fromarray(np.array([[0.0, 128.0, 255.0, 300.0]], dtype=np.float32))
    assert arr(imgs.to_mask(image)).tolist() == [[0, 128, 255, 255]]


# ---------------------------------------------------------------------------------------------
# to_rgb


def test_to_rgb_rgb_is_identity():
    image = gradient_rgb()
    assert imgs.to_rgb(image) is image


def test_to_rgb_cmyk():
    image = Image.new("CMYK", (2, 1))
    image.putdata([(0, 255, 255, 0), (0, 0, 0, 0)])
    out = imgs.to_rgb(image)
    assert out.mode == "RGB"
    assert arr(out).tolist() == [[[255, 0, 0], [255, 255, 255]]]


def test_to_rgb_i16_scaled_mid_grey_stays_mid_grey():
    image = Image.fromarray(np.array([[0, 128 * 257, 65535]], dtype=np.uint16))
    assert image.mode == "I;16"
    out = imgs.to_rgb(image)
    assert out.mode == "RGB"
    assert arr(out).tolist() == [[[0, 0, 0], [128, 128, 128], [255, 255, 255]]]


def test_to_rgb_palette():
    out = imgs.to_rgb(_palette_image())
    assert out.mode == "RGB"
    assert arr(out).tolist() == [[[0, 0, 0], [255, 255, 255], [200, 200, 200]]]


def test_to_rgb_palette_with_transparency_drops_alpha():
    image = _palette_image()
    image.info["transparency"] = 1
    out = imgs.to_rgb(image)
    assert out.mode == "RGB"
    assert arr(out).tolist() == [[[0, 0, 0], [255, 255, 255], [200, 200, 200]]]


def test_to_rgb_l_and_la():
    grey = Image.fromarray(np.array([[0, 77, 255]], dtype=np.uint8), mode="L")
    assert arr(imgs.to_rgb(grey)).tolist() == [[[0] * 3, [77] * 3, [255] * 3]]
    la = Image.new("LA", (2, 1))
    la.putdata([(10, 0), (200, 255)])
    out = imgs.to_rgb(la)
    assert out.mode == "RGB"
    assert arr(out).tolist() == [[[10] * 3, [200] * 3]]


def test_to_rgb_rgba_drops_alpha_without_premultiplying():
    data = np.array([[[10, 20, 30, 0], [40, 50, 60, 128], [70, 80, 90, 255]]], dtype=np.uint8)
    out = imgs.to_rgb(Image.fromarray(data, mode="RGBA"))
    assert out.mode == "RGB"
    assert arr(out).tolist() == [[[10, 20, 30], [40, 50, 60], [70, 80, 90]]]


# ---------------------------------------------------------------------------------------------
# open_image


@pytest.mark.parametrize(
    "data",
    [b"this is not an image at all", b"\x89PNG\r\n\x1a\n" + b"\x00" * 10, b"\xff\xd8\xff" + b"junk" * 10],
    ids=["text", "png-magic-only", "jpeg-magic-only"],
)
def test_open_image_garbage_raises_input_error(data):
    with pytest.raises(InputError) as info:
        imgs.open_image(data, "image_url")
    assert info.value.field == "image_url"


def test_open_image_empty_bytes():
    with pytest.raises(InputError) as info:
        imgs.open_image(b"", "mask_url")
    assert info.value.field == "mask_url"


def test_open_image_truncated_png():
    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8), mode="RGB")
    data = png(image)
    with pytest.raises(InputError) as info:
        imgs.open_image(data[: len(data) // 2], "image_url")
    assert info.value.field == "image_url"
    assert isinstance(info.value, ValueError)


def test_open_image_zero_size_pil_image():
    with pytest.raises(InputError) as info:
        imgs.open_image(Image.new("RGB", (0, 0)), "image_url")
    assert info.value.field == "image_url"


def test_open_image_valid_png_decodes():
    image = gradient_rgb(5, 3)
    out = imgs.open_image(png(image), "image_url")
    assert out.size == (5, 3)
    assert np.array_equal(arr(out.convert("RGB")), arr(image))


EXPECTED_TRANSPOSE = {
    1: None,
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}


@pytest.mark.parametrize("orientation", range(1, 9))
def test_open_image_applies_exif_orientation(orientation):
    base = gradient_rgb(6, 4)
    exif = Image.Exif()
    exif[0x0112] = orientation
    data = png(base, exif=exif)

    out = imgs.open_image(data, "image_url")
    reference = ImageOps.exif_transpose(Image.open(io.BytesIO(data)))
    assert out.size == reference.size
    assert np.array_equal(arr(out.convert("RGB")), arr(reference.convert("RGB")))

    transpose = EXPECTED_TRANSPOSE[orientation]
    expected = base if transpose is None else base.transpose(transpose)
    assert np.array_equal(arr(out.convert("RGB")), arr(expected))
    if orientation >= 5:
        assert out.size == (4, 6)
    else:
        assert out.size == (6, 4)


def test_open_image_applies_exif_orientation_to_pil_input():
    base = gradient_rgb(6, 4)
    exif = Image.Exif()
    exif[0x0112] = 6
    decoded = Image.open(io.BytesIO(png(base, exif=exif)))
    out = imgs.open_image(decoded, "image_url")
    assert np.array_equal(arr(out.convert("RGB")), arr(base.transpose(Image.Transpose.ROTATE_270)))


def test_open_image_rejects_decompression_bomb(monkeypatch):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    data = png(Image.new("L", (50, 50)))  # 2500 px > 2 * MAX_IMAGE_PIXELS: Pillow raises
    with pytest.raises(InputError) as info:
        imgs.open_image(data, "image_url")
    assert info.value.field == "image_url"


def test_open_image_rejects_decompression_bomb_warning_range(monkeypatch):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    data = png(Image.new("L", (40, 40)))  # 1600 px: between the warning and the error limits
    with pytest.raises(InputError) as info:  # the warning is an error, not a log line
        imgs.open_image(data, "image_url")
    assert info.value.field == "image_url"


# ---------------------------------------------------------------------------------------------
# snap8 / work_size


@pytest.mark.parametrize(
    ("size", "expected"),
    [
        ((1024, 1024), (1024, 1024)),
        ((1000, 1001), (1000, 1000)),
        ((1003, 1005), (1000, 1008)),
        ((1, 1), (8, 8)),
        ((0, 3), (8, 8)),
        ((13, 11), (16, 8)),
    ],
)
def test_snap8(size, expected):
    assert imgs.snap8(*size) == expected


@pytest.mark.parametrize(
    "shape",
    [
        (1024, 1024),
        (4000, 3000),
        (3000, 4000),
        (1920, 1080),
        (512, 512),
        (640, 480),
        (6000, 2000),
        (777, 1333),
    ],
)
def test_work_size_about_one_megapixel(shape):
    width, height = shape
    pixels = 1024 * 1024
    w, h = imgs.work_size(width, height, pixels)
    assert w % 8 == 0 and h % 8 == 0
    assert abs(w * h - pixels) / pixels < 0.02
    scale = (pixels / (width * height)) ** 0.5
    # round() then snap to 8: each side is within 4.5 px of the exact aspect-preserving size
    assert abs(w - width * scale) <= 4.5
    assert abs(h - height * scale) <= 4.5
    assert abs(w / h - width / height) / (width / height) < 0.01


def test_work_size_square_is_1024():
    assert imgs.work_size(300, 300, 1024 * 1024) == (1024, 1024)
    assert imgs.work_size(4096, 4096, 1024 * 1024) == (1024, 1024)


@settings(max_examples=200, deadline=None)
@given(st.integers(16, 8000), st.integers(16, 8000), st.sampled_from([512 * 512, 768 * 768, 1024 * 1024]))
def test_work_size_property(width, height, pixels):
    w, h = imgs.work_size(width, height, pixels)
    assert w % 8 == 0 and h % 8 == 0 and w >= 8 and h >= 8
    scale = (pixels / (width * height)) ** 0.5
    for got, exact in ((w, width * scale), (h, height * scale)):
        if exact >= 8:
            assert abs(got - exact) <= 4.5


# ---------------------------------------------------------------------------------------------
# fit


def _binary_mask(size: tuple[int, int], seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    data = np.where(rng.random((size[1], size[0])) < 0.5, 0, 255).astype(np.uint8)
    return Image.fromarray(data, mode="L")


@pytest.mark.parametrize("image_size", [(1001, 777), (512, 512), (640, 480), (1024, 576)])
def test_fit_with_image_size(image_size):
    image = gradient_rgb(300, 200)
    mask = _binary_mask((300, 200))
    fitted = imgs.fit(image, mask, image_size, 1024 * 1024)
    assert fitted.output_size == image_size
    assert fitted.image.size == image_size and fitted.mask.size == image_size
    assert fitted.work_size == imgs.snap8(*image_size)
    assert fitted.work_mask.size == fitted.work_size
    assert fitted.work_size[0] % 8 == 0 and fitted.work_size[1] % 8 == 0
    assert set(np.unique(arr(fitted.mask)).tolist()) <= {0, 255}
    assert set(np.unique(arr(fitted.work_mask)).tolist()) <= {0, 255}


def test_fit_with_image_size_equal_to_input_keeps_pixels():
    image = gradient_rgb(64, 48)
    mask = _binary_mask((64, 48))
    fitted = imgs.fit(image, mask, (64, 48), 1024 * 1024)
    assert np.array_equal(arr(fitted.image), arr(image))
    assert np.array_equal(arr(fitted.mask), arr(mask))
    assert fitted.work_size == (64, 48)


@pytest.mark.parametrize("size", [(300, 200), (1000, 1000), (97, 1201)])
def test_fit_without_image_size_keeps_input_size(size):
    image = gradient_rgb(*size)
    mask = _binary_mask(size)
    fitted = imgs.fit(image, mask, None, 1024 * 1024)
    assert fitted.output_size == size
    assert np.array_equal(arr(fitted.image), arr(image))  # the composite reference is the untouched input
    assert fitted.work_size == imgs.work_size(*size, 1024 * 1024)
    assert fitted.work_mask.size == fitted.work_size
    assert fitted.work_size[0] % 8 == 0 and fitted.work_size[1] % 8 == 0


def test_fit_resizes_mask_of_another_size_with_nearest():
    image = gradient_rgb(100, 60)
    small = _binary_mask((17, 13), seed=3)  # odd factor: any smoothing filter would create in-between values
    fitted = imgs.fit(image, small, None, 1024 * 1024)
    assert fitted.mask.size == (100, 60)
    values = set(np.unique(arr(fitted.mask)).tolist())
    assert values == {0, 255}
    assert set(np.unique(arr(fitted.work_mask)).tolist()) == {0, 255}
    assert np.array_equal(arr(fitted.mask), arr(small.resize((100, 60), Image.Resampling.NEAREST)))

    fitted = imgs.fit(image, small, (333, 211), 1024 * 1024)
    assert fitted.mask.size == (333, 211)
    assert set(np.unique(arr(fitted.mask)).tolist()) == {0, 255}
    assert set(np.unique(arr(fitted.work_mask)).tolist()) == {0, 255}


# ---------------------------------------------------------------------------------------------
# binarize / composite


def test_binarize_threshold_is_128():
    mask = Image.fromarray(np.array([[0, 127, 128, 255]], dtype=np.uint8), mode="L")
    assert imgs.binarize(mask).tolist() == [[False, False, True, True]]


def _expected_repaint(mode: str, raw: np.ndarray) -> np.ndarray:
    """What the user asked to repaint, computed from the raw mask data without the module under test."""
    if mode == "L":
        return raw >= 128
    if mode == "1":
        return raw.astype(bool)
    # RGBA masks are generated grey (R=G=B=v) so the luminance equals v exactly.
    alpha = raw[..., 3]
    if alpha.min() < 255:
        return alpha >= 128
    return raw[..., 0] >= 128


@st.composite
def composite_case(draw):
    width = draw(st.integers(8, 64))
    height = draw(st.integers(8, 64))
    seed = draw(st.integers(0, 2**32 - 1))
    mode = draw(st.sampled_from(["L", "1", "RGBA", "RGBA-opaque"]))
    rng = np.random.default_rng(seed)
    generated = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
    reference = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
    if mode == "L":
        raw = rng.integers(0, 256, (height, width), dtype=np.uint8)
        mask = Image.fromarray(raw, mode="L")
    elif mode == "1":
        raw = rng.random((height, width)) < 0.5
        mask = Image.fromarray(raw.astype(np.uint8) * 255, mode="L").convert("1")
        raw = np.asarray(mask)
    else:
        grey = rng.integers(0, 256, (height, width), dtype=np.uint8)
        if mode == "RGBA":
            alpha = rng.integers(0, 256, (height, width), dtype=np.uint8)
            alpha[0, 0] = 0  # guarantee a non-opaque alpha
        else:
            alpha = np.full((height, width), 255, dtype=np.uint8)
        raw = np.stack([grey, grey, grey, alpha], axis=-1)
        mask = Image.fromarray(raw, mode="RGBA")
        mode = "RGBA"
    return generated, reference, mode, raw, mask


@settings(max_examples=150, deadline=None)
@given(composite_case())
def test_composite_property(case):
    generated, reference, mode, raw, mask = case
    repaint = _expected_repaint(mode, raw)
    out = imgs.composite(
        Image.fromarray(generated, mode="RGB"), Image.fromarray(reference, mode="RGB"), imgs.to_mask(mask)
    )
    assert out.mode == "RGB"
    assert out.size == (reference.shape[1], reference.shape[0])
    result = arr(out)
    assert np.array_equal(result[~repaint], reference[~repaint])
    assert np.array_equal(result[repaint], generated[repaint])


def test_composite_resizes_generated_but_keeps_reference_pixels_exact():
    rng = np.random.default_rng(1)
    reference = rng.integers(0, 256, (30, 50, 3), dtype=np.uint8)
    generated = Image.fromarray(rng.integers(0, 256, (32, 48, 3), dtype=np.uint8), mode="RGB")
    repaint = np.zeros((30, 50), dtype=bool)
    repaint[5:20, 10:30] = True
    mask = Image.fromarray(repaint.astype(np.uint8) * 255, mode="L")
    out = arr(imgs.composite(generated, Image.fromarray(reference, mode="RGB"), mask))
    assert out.shape == (30, 50, 3)
    assert np.array_equal(out[~repaint], reference[~repaint])
    resized = arr(generated.resize((50, 30), Image.Resampling.LANCZOS))
    assert np.array_equal(out[repaint], resized[repaint])


def test_composite_accepts_non_rgb_generated():
    reference = np.zeros((8, 8, 3), dtype=np.uint8)
    generated = Image.new("RGBA", (8, 8), (10, 20, 30, 0))
    mask = Image.new("L", (8, 8), 255)
    out = arr(imgs.composite(generated, Image.fromarray(reference, mode="RGB"), mask))
    assert (out == np.array([10, 20, 30], dtype=np.uint8)).all()


def test_binarize_mode_1_image():
    one = Image.new("1", (2, 1), 0)
    one.putpixel((0, 0), 1)
    assert imgs.binarize(one).tolist() == [[True, False]]


@pytest.mark.parametrize("image_size", [(1, 1), (8, 8), (8, 16), (16, 8), (16, 16), (20, 16), (24, 24), (8, 4096)])
def test_fit_works_at_least_the_minimum_side_and_keeps_the_asked_size(image_size):
    """Issue 13, item 20: the model works at >= 32 px per side (VAE x8, UNet x4); the output is what was asked."""
    fitted = imgs.fit(gradient_rgb(64, 48), _binary_mask((64, 48)), image_size, 1024 * 1024)
    assert fitted.output_size == image_size
    assert all(side >= imgs.MIN_WORK_SIDE and side % 8 == 0 for side in fitted.work_size), fitted.work_size
    assert fitted.work_size == tuple(max(side, imgs.MIN_WORK_SIDE) for side in imgs.snap8(*image_size))


@pytest.mark.parametrize("size", [(4, 4), (1, 1), (2, 3000)])
def test_fit_of_a_tiny_or_thin_input_without_image_size_keeps_its_size(size):
    fitted = imgs.fit(gradient_rgb(*size), _binary_mask(size), None, 64 * 64)
    assert fitted.output_size == size
    assert all(side >= imgs.MIN_WORK_SIDE for side in fitted.work_size), fitted.work_size
