"""Image encoding for results: JPEG at quality 95 or PNG at compress level 1 (what fal uses)."""

from __future__ import annotations

import io

from PIL import Image

CONTENT_TYPES = {"jpeg": "image/jpeg", "png": "image/png"}


def encode_image(image: Image.Image, fmt: str) -> bytes:
    """Encode without metadata; the same image always gives the same bytes."""
    buf = io.BytesIO()
    image = Image.frombytes(image.mode, image.size, image.tobytes())  # drops every info entry (ICC, EXIF)
    if fmt == "jpeg":
        image.convert("RGB").save(buf, format="JPEG", quality=95)
    elif fmt == "png":
        image.save(buf, format="PNG", compress_level=1)
    else:
        raise ValueError(f"format must be 'jpeg' or 'png', not {fmt!r}")
    return buf.getvalue()
