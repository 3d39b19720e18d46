"""Decoding untrusted image bytes: allowed formats, pixel limits read from the header, corrupt data, modes.

Cases S8-S10 and M7/M8 of the reliability list. ``open_image`` must refuse what it should before any
pixel data is decoded, never raise anything but :class:`InputError`, and keep its limit per call.
"""

from __future__ import annotations

import io
import struct
import warnings
import zlib
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image, ImageFile, PngImagePlugin

from pipelines import images as imgs
from pipelines.errors import InputError
from tests.helpers import noise_image, png


def encode(image: Image.Image, fmt: str, **options) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format=fmt, **options)
    return buf.getvalue()


def png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def png_claiming(width: int, height: int) -> bytes:
    """A PNG whose header says ``width`` x ``height`` RGB, followed by almost no pixel data."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    idat = zlib.compress(b"\x00" * 64)
    return b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", ihdr) + png_chunk(b"IDAT", idat) + png_chunk(b"IEND", b"")


@pytest.fixture
def loads(monkeypatch) -> list[tuple[int, int]]:
    """Sizes of the images whose pixel data was decoded (``ImageFile.load`` calls)."""
    calls: list[tuple[int, int]] = []
    original = ImageFile.ImageFile.load

    def spy(self):
        calls.append(self.size)
        return original(self)

    monkeypatch.setattr(ImageFile.ImageFile, "load", spy)
    return calls


# ---------------------------------------------------------------------------------------------
# formats (S9)


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "WEBP"])
def test_png_jpeg_and_webp_decode(fmt):
    image = noise_image(20, 10, seed=1)
    out = imgs.open_image(encode(image, fmt, **({"lossless": True} if fmt == "WEBP" else {})), "image_url")
    assert out.size == (20, 10)
    if fmt != "JPEG":
        assert np.array_equal(np.asarray(out.convert("RGB")), np.asarray(image))


def _psd(width: int, height: int) -> bytes:
    header = b"8BPS" + struct.pack(">H6xHIIHH", 1, 3, height, width, 8, 3)
    return header + struct.pack(">III", 0, 0, 0) + struct.pack(">H", 0) + bytes(3 * width * height)


def _fits(width: int, height: int) -> bytes:
    cards = ["SIMPLE  =                    T", "BITPIX  =                    8", "NAXIS   =                    2"]
    cards += [f"NAXIS1  = {width:>20}", f"NAXIS2  = {height:>20}", "END"]
    header = b"".join(c.ljust(80).encode() for c in cards).ljust(2880, b" ")
    return header + bytes(width * height).ljust(2880, b"\x00")


def _eps(width: int, height: int) -> bytes:
    return f"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 {width} {height}\n%%EndComments\nshowpage\n%%EOF\n".encode()


OTHER_FORMATS = {
    "TIFF": lambda: encode(noise_image(8, 6), "TIFF"),
    "PSD": lambda: _psd(8, 6),
    "EPS": lambda: _eps(8, 6),
    "FITS": lambda: _fits(8, 6),
    "GIF": lambda: encode(noise_image(8, 6), "GIF"),
    "BMP": lambda: encode(noise_image(8, 6), "BMP"),
}


@pytest.mark.parametrize("fmt", list(OTHER_FORMATS))
def test_other_formats_are_refused_whatever_their_name(fmt, loads):
    data = OTHER_FORMATS[fmt]()
    assert Image.open(io.BytesIO(data)).format == fmt  # Pillow alone would open it: the allow-list refuses it
    loads.clear()
    with pytest.raises(InputError) as info:
        imgs.open_image(data, "image_url")  # the bytes of a file named mask.png
    assert info.value.field == "image_url"
    assert fmt in info.value.message and "PNG, JPEG or WEBP" in info.value.message
    assert loads == []


# ---------------------------------------------------------------------------------------------
# pixel limits (S8)


@pytest.mark.parametrize(
    "size",
    [(50_000, 50_000), (10_000, 12_000), (imgs.MAX_IMAGE_PIXELS // 1000 + 1, 1000)],
    ids=["past-2x-pillow", "between-1x-and-2x-pillow", "just-over-default"],
)
def test_a_header_over_the_limit_is_refused_before_decoding(size, loads):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # Pillow's own note, 1x-2x its limit
        with pytest.raises(InputError) as info:
            imgs.open_image(png_claiming(*size), "mask_url")
    assert info.value.field == "mask_url"
    assert "pixels" in info.value.message
    assert loads == []


def test_pixel_limit_between_1x_and_2x_is_refused_and_at_the_limit_accepted(loads):
    data = png(noise_image(40, 40))  # 1600 pixels
    with pytest.raises(InputError) as info:
        imgs.open_image(data, "image_url", max_pixels=1000)
    assert "40x40" in info.value.message and "1000" in info.value.message
    assert loads == []
    assert imgs.open_image(data, "image_url", max_pixels=1600).size == (40, 40)
    assert loads and set(loads) == {(40, 40)}  # decoded only once allowed


def test_pixel_limit_applies_to_pil_images_too():
    with pytest.raises(InputError):
        imgs.open_image(Image.new("RGB", (40, 40)), "image_url", max_pixels=1000)


def test_limits_of_concurrent_decodes_do_not_interfere():
    data = png(noise_image(40, 40))

    def attempt(limit: int) -> bool:
        try:
            imgs.open_image(data, "image_url", max_pixels=limit)
            return True
        except InputError:
            return False

    limits = [1000, 5000] * 100
    with ThreadPoolExecutor(8) as pool:
        outcomes = list(pool.map(attempt, limits))
    assert outcomes == [limit >= 1600 for limit in limits]


# ---------------------------------------------------------------------------------------------
# truncated and corrupt data (S10)


def _corrupt_png() -> bytes:
    data = bytearray(png(noise_image(64, 64, seed=2)))
    start = data.index(b"IDAT") + 4
    data[start + 20 : start + 60] = bytes(40)  # zeroed deflate data; the chunk CRC no longer matches
    return bytes(data)


def _corrupt_jpeg() -> bytes:
    data = bytearray(encode(noise_image(64, 64, seed=2), "JPEG"))
    sos = data.index(b"\xff\xda")
    data[sos + 2 :] = b"\xff\xd9"  # start of scan, then straight to the end marker
    return bytes(data)


BROKEN = {
    "png-cut-in-header": lambda: png(noise_image(64, 64))[:30],
    "png-cut-in-data": lambda: png(noise_image(64, 64))[:-200],
    "png-corrupt-data": _corrupt_png,
    "jpeg-cut-in-header": lambda: encode(noise_image(64, 64), "JPEG")[:100],
    "jpeg-cut-in-data": lambda: encode(noise_image(64, 64), "JPEG")[:-300],
    "jpeg-no-scan-data": _corrupt_jpeg,
    "webp-cut": lambda: encode(noise_image(64, 64), "WEBP")[:-100],
    "magic-only": lambda: b"\x89PNG\r\n\x1a\n",
}


@pytest.mark.parametrize("kind", list(BROKEN))
def test_truncated_or_corrupt_images_are_input_errors(kind):
    with pytest.raises(InputError) as info:
        imgs.open_image(BROKEN[kind](), "image_url")
    assert info.value.field == "image_url"
    assert "image" in info.value.message
    assert "BytesIO" not in info.value.message and "/" not in info.value.message.replace("N/A", "")


@pytest.mark.parametrize("error", [ValueError("bad value"), struct.error("unpack"), IndexError("x"), RuntimeError("y")])
@pytest.mark.parametrize("stage", ["_open", "load"])
def test_a_plugin_raising_anything_is_an_input_error(monkeypatch, stage, error):
    def boom(self, *args):
        raise error

    monkeypatch.setattr(PngImagePlugin.PngImageFile, stage, boom)
    with pytest.raises(InputError) as info:
        imgs.open_image(png(noise_image(8, 8)), "mask_url")
    assert info.value.field == "mask_url"


# ---------------------------------------------------------------------------------------------
# modes (M7): decoded from bytes and converted to 8-bit RGB


def test_cmyk_jpeg_is_converted_without_colour_shift():
    colours = [(0, 0, 0, 0), (255, 0, 0, 0), (0, 255, 0, 0), (0, 0, 255, 0), (0, 0, 0, 255), (40, 120, 200, 10)]
    cmyk = Image.new("CMYK", (16 * len(colours), 16))
    for i, colour in enumerate(colours):
        cmyk.paste(colour, (16 * i, 0, 16 * i + 16, 16))
    decoded = imgs.open_image(encode(cmyk, "JPEG", quality=100), "image_url")
    assert decoded.mode == "CMYK"
    rgb = np.asarray(imgs.to_rgb(decoded), dtype=int)
    expected = np.asarray(cmyk.convert("RGB"), dtype=int)
    assert rgb.shape == expected.shape
    assert np.abs(rgb[4:12] - expected[4:12]).max() <= 6  # block centres; JPEG is lossy at the edges


def test_sixteen_bit_png_is_scaled_to_eight_bits():
    values = np.array([[0, 257 * 64, 257 * 128, 65535]], dtype=np.uint16)
    image = Image.fromarray(values)
    assert image.mode == "I;16"
    data = png(image)
    rgb = np.asarray(imgs.to_rgb(imgs.open_image(data, "image_url")))
    assert rgb[0, :, 0].tolist() == [0, 64, 128, 255]
    assert (rgb[..., 0] == rgb[..., 1]).all() and (rgb[..., 1] == rgb[..., 2]).all()


def test_palette_png_with_transparency_keeps_its_colours():
    palette = Image.new("P", (4, 1))
    palette.putpalette([255, 0, 0, 0, 255, 0, 0, 0, 255, 10, 20, 30] + [0] * (256 * 3 - 12))
    palette.putdata([0, 1, 2, 3])
    data = png(palette, transparency=3)
    rgb = np.asarray(imgs.to_rgb(imgs.open_image(data, "image_url")))
    assert rgb[0].tolist() == [[255, 0, 0], [0, 255, 0], [0, 0, 255], [10, 20, 30]]


@pytest.mark.parametrize("mode", ["L", "LA", "1"])
def test_greyscale_pngs_become_grey_rgb(mode):
    grey = np.array([[0, 100, 200, 255]], dtype=np.uint8)
    image = Image.fromarray(grey, mode="L")
    if mode == "LA":
        image = Image.merge("LA", [image, Image.new("L", image.size, 255)])
    elif mode == "1":
        image = image.convert("1")
        grey = np.where(grey >= 128, 255, 0).astype(np.uint8)
    rgb = np.asarray(imgs.to_rgb(imgs.open_image(png(image), "image_url")))
    assert rgb.shape == (1, 4, 3)
    assert (rgb == grey[..., None]).all()


# ---------------------------------------------------------------------------------------------
# M8: outside the binarised mask, every pixel is the input's, whatever the mask's mode and size


def _repaint_of(mode: str, mask: Image.Image) -> np.ndarray:
    """What the user asked to repaint, from Pillow's own conversions (not the module under test)."""
    if mode == "1":
        return np.asarray(mask).astype(bool)
    if mode == "L":
        return np.asarray(mask) >= 128
    if mode in ("LA", "RGBA", "P-transparent"):
        alpha = np.asarray(mask.convert("RGBA"))[..., 3]
        if alpha.min() < 255:
            return alpha >= 128
    return np.asarray(mask.convert("RGB").convert("L")) >= 128


def _nearest(repaint: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    image = Image.fromarray(repaint.astype(np.uint8) * 255, mode="L")
    return np.asarray(image.resize(size, Image.Resampling.NEAREST)) >= 128


@st.composite
def mask_case(draw):
    mode = draw(st.sampled_from(["1", "L", "LA", "RGB", "RGBA", "P", "P-transparent"]))
    width, height = draw(st.integers(1, 40)), draw(st.integers(1, 40))
    same_size = draw(st.booleans())
    mw, mh = (width, height) if same_size else (draw(st.integers(1, 40)), draw(st.integers(1, 40)))
    image_size = draw(st.one_of(st.none(), st.tuples(st.integers(1, 40), st.integers(1, 40))))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    opaque = draw(st.booleans())
    raw = rng.integers(0, 256, (mh, mw, 4), dtype=np.uint8)
    if opaque:
        raw[..., 3] = 255
    if mode == "1":
        mask = Image.fromarray(raw[..., 0], mode="L").convert("1")
    elif mode == "L":
        mask = Image.fromarray(raw[..., 0], mode="L")
    elif mode == "LA":
        mask = Image.fromarray(raw[..., [0, 3]], mode="LA")
    elif mode == "RGB":
        mask = Image.fromarray(raw[..., :3], mode="RGB")
    elif mode == "RGBA":
        mask = Image.fromarray(raw, mode="RGBA")
    else:
        mask = Image.fromarray(raw[..., :3], mode="RGB").quantize(colors=16)
        if mode == "P-transparent":
            mask.info["transparency"] = int(raw[0, 0, 0]) % 16
    image = Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8), mode="RGB")
    generated_seed = int(rng.integers(0, 2**31))
    return mode, image, mask, image_size, generated_seed


@settings(max_examples=200, deadline=None)
@given(mask_case())
def test_pixels_outside_the_mask_are_the_inputs_for_every_mask_mode_and_size(case):
    mode, image, mask, image_size, generated_seed = case
    # Through the real decoder: the mask arrives as PNG bytes, like a mask_url.
    decoded_mask = imgs.to_mask(imgs.open_image(png(mask, **_png_options(mask)), "mask_url"))
    decoded_image = imgs.to_rgb(imgs.open_image(png(image), "image_url"))
    fitted = imgs.fit(decoded_image, decoded_mask, image_size, work_pixels=24 * 24)

    repaint = _nearest(_repaint_of(mode, mask), image.size)
    if image_size is not None:
        repaint = _nearest(repaint, image_size)
    assert np.array_equal(imgs.binarize(fitted.mask), repaint)
    if image_size is None:
        assert np.array_equal(np.asarray(fitted.image), np.asarray(image))

    rng = np.random.default_rng(generated_seed)
    w, h = fitted.work_size
    generated = Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8), mode="RGB")
    out = np.asarray(imgs.composite(generated, fitted.image, fitted.mask))
    assert out.shape == np.asarray(fitted.image).shape
    assert np.array_equal(out[~repaint], np.asarray(fitted.image)[~repaint])


def _png_options(mask: Image.Image) -> dict:
    return {"transparency": mask.info["transparency"]} if "transparency" in mask.info else {}
