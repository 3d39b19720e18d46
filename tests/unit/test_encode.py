"""pipelines.encode.encode_image: JPEG/PNG output bytes."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from pipelines.encode import CONTENT_TYPES, encode_image


def noise_image(width: int, height: int, mode: str = "RGB", seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    channels = len(mode)
    return Image.fromarray(rng.integers(0, 256, (height, width, channels), dtype=np.uint8), mode=mode)


@pytest.mark.parametrize("size", [(1, 1), (64, 48), (333, 17)])
def test_jpeg_round_trip(size):
    image = noise_image(*size)
    data = encode_image(image, "jpeg")
    assert data[:3] == b"\xff\xd8\xff"
    decoded = Image.open(io.BytesIO(data))
    assert decoded.format == "JPEG"
    assert decoded.mode == "RGB"
    assert decoded.size == size


def test_jpeg_quality_is_high():
    smooth = Image.fromarray(np.tile(np.arange(256, dtype=np.uint8), (64, 1)), mode="L").convert("RGB")
    decoded = np.asarray(Image.open(io.BytesIO(encode_image(smooth, "jpeg"))).convert("RGB")).astype(int)
    assert np.abs(decoded - np.asarray(smooth).astype(int)).max() <= 4


@pytest.mark.parametrize("mode", ["RGBA", "L", "P"])
def test_jpeg_converts_other_modes(mode):
    image = noise_image(16, 8).convert(mode)
    decoded = Image.open(io.BytesIO(encode_image(image, "jpeg")))
    assert decoded.mode == "RGB" and decoded.size == (16, 8)


@pytest.mark.parametrize("mode", ["RGB", "RGBA", "L"])
@pytest.mark.parametrize("size", [(1, 1), (64, 48), (333, 17)])
def test_png_round_trip_is_lossless(size, mode):
    image = noise_image(*size, mode=mode if mode != "L" else "RGB").convert(mode)
    data = encode_image(image, "png")
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    decoded = Image.open(io.BytesIO(data))
    assert decoded.format == "PNG"
    assert decoded.size == size
    assert decoded.mode == mode
    assert np.array_equal(np.asarray(decoded), np.asarray(image))


@pytest.mark.parametrize("fmt", ["jpeg", "png"])
def test_deterministic_bytes(fmt):
    first = encode_image(noise_image(40, 30, seed=1), fmt)
    second = encode_image(noise_image(40, 30, seed=1), fmt)
    assert first == second
    assert encode_image(noise_image(40, 30, seed=2), fmt) != first


@pytest.mark.parametrize("fmt", ["webp", "JPEG", "jpg", "PNG", "", "gif"])
def test_bad_format_raises(fmt):
    with pytest.raises(ValueError, match="format"):
        encode_image(noise_image(4, 4), fmt)


def test_content_types():
    assert CONTENT_TYPES == {"jpeg": "image/jpeg", "png": "image/png"}


@pytest.mark.parametrize("fmt", ["jpeg", "png"])
def test_no_exif_written(fmt):
    image = noise_image(8, 8)
    exif = Image.Exif()
    exif[0x0112] = 6
    image.info["exif"] = exif.tobytes()
    decoded = Image.open(io.BytesIO(encode_image(image, fmt)))
    assert dict(decoded.getexif()) == {}


def test_png_drops_icc_profile():
    from PIL import ImageCms

    image = noise_image(8, 8)
    image.info["icc_profile"] = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()
    decoded = Image.open(io.BytesIO(encode_image(image, "png")))
    assert "icc_profile" not in decoded.info
