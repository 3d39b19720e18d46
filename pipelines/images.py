"""Image and mask normalisation, working sizes and the final composite. Pure PIL/numpy, no torch.

Conventions: the mask is white where the image is repainted; it is binarised at 0.5 (value >= 128)
for both the latent blend and the final composite, so every pixel whose mask value is below 128
comes back bit-identical to the (resized) input.
"""

from __future__ import annotations

import io
import math
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from .errors import InputError

SIXTEEN_BIT_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I")
ALLOWED_FORMATS = ("PNG", "JPEG", "WEBP")  # the only decoders a request's bytes reach
MAX_IMAGE_PIXELS = 50_000_000  # default limit per decoded image: 8000x6000 photos, 8K frames
MASK_THRESHOLD = 128  # diffusers' VaeImageProcessor binarises value/255 at 0.5
# The smallest working side: the VAE downsamples by 8 and the UNet by another 4, so from 32 px on every UNet
# level has at least one latent pixel of its own. Below it a model can fail: the tiny test UNet (one channel per
# GroupNorm group in its first block) refuses a 1x1 map there, which both sides at most 16 px give (latent 2x2).
# SDXL itself (10+ channels per group) runs at any size from 8 px, but smaller outputs are made at 32 px and resized.
MIN_WORK_SIDE = 32


def open_image(data: bytes | Image.Image, field: str, max_pixels: int = MAX_IMAGE_PIXELS) -> Image.Image:
    """Decode bytes (or take a PIL image), apply the EXIF orientation, and check it has pixels.

    Only PNG, JPEG and WEBP are decoded. The pixel count is read from the header and checked against
    ``max_pixels`` (capped at Pillow's own ``Image.MAX_IMAGE_PIXELS``, so an image Pillow would warn
    about as a decompression bomb is refused too) before any pixel data is decoded. The limit is a
    parameter, not process state: threads decoding at once with different limits do not interfere.
    Every failure is an :class:`InputError` naming ``field``.
    """
    if isinstance(data, Image.Image):
        image = data
        _check_pixels(image, field, max_pixels)
    else:
        image = _decode(data, field, max_pixels)
    if image.width == 0 or image.height == 0:
        raise InputError(field, f"the image has no pixels ({image.width}x{image.height})")
    try:
        return ImageOps.exif_transpose(image)
    except (OSError, ValueError, SyntaxError) as exc:
        raise InputError(field, f"cannot apply the EXIF orientation: {exc}") from exc


def _decode(data: bytes, field: str, max_pixels: int) -> Image.Image:
    if not data:
        raise InputError(field, "the file is empty")
    try:
        # Image.open reads only the header; it raises DecompressionBombError past 2x Pillow's limit.
        image = Image.open(io.BytesIO(data), formats=ALLOWED_FORMATS)
    except UnidentifiedImageError:
        raise InputError(field, f"{_what_it_is(data)}; send a PNG, JPEG or WEBP image") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise InputError(field, f"the image has too many pixels (this server accepts at most {max_pixels})") from None
    except Exception as exc:  # plugins raise SyntaxError, ValueError, struct.error... on a bad header
        raise InputError(field, f"cannot read the image header ({_reason(exc)})") from None
    _check_pixels(image, field, max_pixels)
    try:
        image.load()
    except Exception as exc:  # truncated or corrupt data: OSError, SyntaxError, ValueError, EOFError...
        raise InputError(field, f"cannot decode the {image.format} image ({_reason(exc)})") from None
    return image


def _check_pixels(image: Image.Image, field: str, max_pixels: int) -> None:
    limit = min(max_pixels, Image.MAX_IMAGE_PIXELS or max_pixels)
    width, height = image.size
    if width * height > limit:
        raise InputError(
            field, f"the image is {width}x{height} ({width * height} pixels); this server accepts at most {limit}"
        )


# Formats Pillow could decode but this server refuses, named in the error so the user knows why.
_MAGIC = (
    (b"II*\x00", "TIFF"),
    (b"MM\x00*", "TIFF"),
    (b"8BPS", "PSD"),
    (b"%!PS", "EPS"),
    (b"\xc5\xd0\xd3\xc6", "EPS"),
    (b"SIMPLE  =", "FITS"),
    (b"GIF8", "GIF"),
    (b"BM", "BMP"),
    (b"\x00\x00\x01\x00", "ICO"),
    (b"%PDF", "PDF"),
    (b"<", "text (SVG, HTML or XML)"),
)


def _what_it_is(data: bytes) -> str:
    for magic, name in _MAGIC:
        if data.startswith(magic):
            return f"this is a {name} file, which is not accepted"
    return "not a PNG, JPEG or WEBP image"


def _reason(exc: Exception) -> str:
    text = str(exc) if isinstance(exc, (OSError, SyntaxError, ValueError, EOFError)) else ""
    text = text.strip() or type(exc).__name__
    return text if len(text) <= 200 else text[:197] + "..."


def _sixteen_bit_to_l(image: Image.Image) -> Image.Image:
    """Scale a 16-bit or 32-bit greyscale image to 8 bits (Pillow's own convert clips instead)."""
    arr = np.asarray(image, dtype=np.float64)
    if image.mode == "F":
        arr = arr * 255.0 if arr.max(initial=0.0) <= 1.0 else arr
    elif image.mode != "I" or arr.max(initial=0.0) > 255:
        arr = arr / 257.0
    return Image.fromarray(np.clip(np.rint(arr), 0, 255).astype(np.uint8), mode="L")


def to_rgb(image: Image.Image) -> Image.Image:
    """Any Pillow mode (CMYK, 16-bit, palette, greyscale, with alpha) to 8-bit RGB; alpha is dropped."""
    if image.mode == "RGB":
        return image
    if image.mode in (*SIXTEEN_BIT_MODES, "F"):
        return _sixteen_bit_to_l(image).convert("RGB")
    if image.mode == "P":
        image = image.convert("RGBA") if "transparency" in image.info else image.convert("RGB")
    return image.convert("RGB")


def to_mask(image: Image.Image) -> Image.Image:
    """A mask of any mode to "L", white = repaint.

    With a non-opaque alpha channel (RGBA, LA, PA, palette with transparency) the alpha is the mask:
    strokes painted on a transparent canvas mark what to repaint. Otherwise the luminance is.
    """
    has_alpha = image.mode in ("RGBA", "LA", "PA", "RGBa", "La") or (image.mode == "P" and "transparency" in image.info)
    if has_alpha:
        rgba = image.convert("RGBA")
        alpha = rgba.getchannel("A")
        if alpha.getextrema()[0] < 255:
            return alpha
        return rgba.convert("RGB").convert("L")
    if image.mode == "L":
        return image
    if image.mode in (*SIXTEEN_BIT_MODES, "F"):
        return _sixteen_bit_to_l(image)
    if image.mode == "1":
        return image.convert("L")
    return image.convert("RGB").convert("L")


def binarize(mask: Image.Image) -> np.ndarray:
    """Boolean (H, W) array: True where the image is repainted (``mask`` as returned by :func:`to_mask`)."""
    if mask.mode != "L":
        mask = to_mask(mask)
    return np.asarray(mask, dtype=np.uint8) >= MASK_THRESHOLD


def snap8(width: int, height: int) -> tuple[int, int]:
    """Nearest multiples of 8 (the VAE's scale factor), at least 8."""
    return max(8, round(width / 8) * 8), max(8, round(height / 8) * 8)


def at_least_min(size: tuple[int, int]) -> tuple[int, int]:
    """Each side raised to :data:`MIN_WORK_SIDE` (a multiple of 8) if smaller."""
    return max(size[0], MIN_WORK_SIDE), max(size[1], MIN_WORK_SIDE)


def work_size(width: int, height: int, pixels: int) -> tuple[int, int]:
    """About ``pixels`` pixels with the aspect ratio of ``width`` x ``height``, sides in multiples of 8."""
    scale = math.sqrt(pixels / (width * height))
    return snap8(round(width * scale), round(height * scale))


@dataclass
class FittedInputs:
    """The input at its output size and at the size the model works at."""

    image: Image.Image  # RGB at the output size: the reference for the composite
    mask: Image.Image  # L at the output size
    work_image: Image.Image  # RGB at the working size (multiples of 8)
    work_mask: Image.Image  # L at the working size

    @property
    def output_size(self) -> tuple[int, int]:
        return self.image.size

    @property
    def work_size(self) -> tuple[int, int]:
        return self.work_image.size


def fit(image: Image.Image, mask: Image.Image, image_size: tuple[int, int] | None, work_pixels: int) -> FittedInputs:
    """Resize image and mask for one request.

    With ``image_size`` the output has exactly that size (input stretched to it, the model working at
    the nearest multiples of 8); without it the output keeps the input's own size and the model works
    at about ``work_pixels`` with the input's aspect ratio. Either way the model works at least
    :data:`MIN_WORK_SIDE` pixels per side (a 1x1 output is made at 32x32 and resized). A mask of another
    size than the image is first resized to it (nearest), so it never blurs into a soft edge.
    """
    if mask.size != image.size:
        mask = mask.resize(image.size, Image.Resampling.NEAREST)
    if image_size is not None:
        size = (int(image_size[0]), int(image_size[1]))
        if size != image.size:
            image = image.resize(size, Image.Resampling.LANCZOS)
            mask = mask.resize(size, Image.Resampling.NEAREST)
        working = at_least_min(snap8(*size))
    else:
        working = at_least_min(work_size(image.width, image.height, work_pixels))
    work_image = image if working == image.size else image.resize(working, Image.Resampling.LANCZOS)
    work_mask = mask if working == mask.size else mask.resize(working, Image.Resampling.NEAREST)
    return FittedInputs(image=image, mask=mask, work_image=work_image, work_mask=work_mask)


def composite(generated: Image.Image, reference: Image.Image, mask: Image.Image) -> Image.Image:
    """Generated pixels where the binarised mask is set, the reference's exact pixels elsewhere."""
    if generated.size != reference.size:
        generated = generated.resize(reference.size, Image.Resampling.LANCZOS)
    keep = binarize(mask)[..., None]
    out = np.where(keep, np.asarray(generated.convert("RGB")), np.asarray(reference))
    return Image.fromarray(out.astype(np.uint8), mode="RGB")
