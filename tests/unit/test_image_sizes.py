"""server.inputs.image_sizes.parse_image_size: fal presets and WIDTHxHEIGHT."""

from __future__ import annotations

import pytest

from server.inputs.image_sizes import MAX_SIDE, PRESETS, parse_image_size


@pytest.mark.parametrize(
    ("name", "size"),
    [
        ("square_hd", (1024, 1024)),
        ("square", (512, 512)),
        ("portrait_4_3", (768, 1024)),
        ("portrait_16_9", (576, 1024)),
        ("landscape_4_3", (1024, 768)),
        ("landscape_16_9", (1024, 576)),
    ],
)
def test_presets(name, size):
    assert parse_image_size(name) == size


def test_presets_are_width_by_height():
    for name, (w, h) in PRESETS.items():
        if name.startswith("portrait"):
            assert w < h
        elif name.startswith("landscape"):
            assert w > h
        else:
            assert w == h


@pytest.mark.parametrize(
    ("value", "size"),
    [
        ("512x768", (512, 768)),
        ("768X512", (768, 512)),
        ("1x1", (1, 1)),
        (f"{MAX_SIDE}x{MAX_SIDE}", (MAX_SIDE, MAX_SIDE)),
        ("0640x0480", (640, 480)),
    ],
)
def test_width_x_height(value, size):
    assert parse_image_size(value) == size


@pytest.mark.parametrize(
    "value",
    [
        "0x512",
        "512x0",
        f"{MAX_SIDE + 1}x512",
        f"512x{MAX_SIDE + 1}",
    ],
)
def test_out_of_range(value):
    with pytest.raises(ValueError, match=str(MAX_SIDE)):
        parse_image_size(value)


@pytest.mark.parametrize(
    "value",
    [
        "",
        "x",
        "512",
        "512x",
        "x512",
        "-512x512",
        "512x-512",
        "512.5x512",
        "512 x 512",
        " 512x512",
        "512x512x3",
        "abc",
        "Square_HD",
        "square-hd",
        "512*512",
    ],
)
def test_bad_values(value):
    with pytest.raises(ValueError, match="image size"):
        parse_image_size(value)
