"""fal's ``image_size`` presets (width x height) and parsing of ``WxH``."""

from __future__ import annotations

PRESETS: dict[str, tuple[int, int]] = {
    "square_hd": (1024, 1024),
    "square": (512, 512),
    "portrait_4_3": (768, 1024),
    "portrait_16_9": (576, 1024),
    "landscape_4_3": (1024, 768),
    "landscape_16_9": (1024, 576),
}
MAX_SIDE = 14142


def parse_image_size(value: str) -> tuple[int, int]:
    """A preset name or ``WIDTHxHEIGHT``; raises ValueError with a message fit for users."""
    if value in PRESETS:
        return PRESETS[value]
    width, sep, height = value.lower().partition("x")
    if sep and width.isdigit() and height.isdigit():
        w, h = int(width), int(height)
        if 0 < w <= MAX_SIDE and 0 < h <= MAX_SIDE:
            return w, h
        raise ValueError(f"image size {value!r}: width and height must be in 1..{MAX_SIDE}")
    raise ValueError(f"image size {value!r}: use one of {', '.join(PRESETS)} or WIDTHxHEIGHT")
