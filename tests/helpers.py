"""Small image builders shared by the tests."""

from __future__ import annotations

import io

import numpy as np
from PIL import Image


def noise_image(width: int = 64, height: int = 48, seed: int = 0) -> Image.Image:
    rng = np.random.RandomState(seed)
    return Image.fromarray((rng.rand(height, width, 3) * 255).astype(np.uint8), mode="RGB")


def box_mask(width: int = 64, height: int = 48, box: tuple[int, int, int, int] | None = None) -> Image.Image:
    mask = Image.new("L", (width, height), 0)
    mask.paste(255, box or (width // 4, height // 4, 3 * width // 4, 3 * height // 4))
    return mask


def png(image: Image.Image, **save_options) -> bytes:
    """The image encoded as PNG (lossless, so decoded pixels equal the original)."""
    buf = io.BytesIO()
    image.save(buf, format="PNG", **save_options)
    return buf.getvalue()
