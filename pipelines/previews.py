"""Step previews: a denoising step's latents as small RGB images, without the VAE.

SDXL's four latent channels map to RGB almost linearly, so a fixed 3x4 projection plus a bias gives a
recognisable picture at the latent resolution (1/8 of the working size: 128x128 for a 1024x1024 image).
The factors are the "latent2rgb" ones ComfyUI uses for its previews without TAESD:
``comfy/latent_formats.py``, class ``SDXL`` (``latent_rgb_factors``, ``latent_rgb_factors_bias``), applied
to the scaled latents (``vae latents * scaling_factor``, the space the UNet works in, as here), and mapped
from [-1, 1] to [0, 255] as ``comfy/latent_preview.py`` does.

On the device this is one small matmul over the preview rows and a uint8 cast; the pixels go to pinned host
memory with an asynchronous copy (a CUDA event says when they have landed), so the denoising loop never
waits for them. :meth:`StepPreview.jpegs` (on a CPU thread, never on the GPU's) waits for that event and
encodes the JPEGs.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from typing import Any

import torch

from . import tensors

# (R, G, B) weights of latent channels 0..3, and the bias: ComfyUI's comfy/latent_formats.py, class SDXL.
SDXL_LATENT_RGB_FACTORS = (
    (0.3651, 0.4232, 0.4341),
    (-0.2533, -0.0042, 0.1068),
    (0.1076, 0.1111, -0.0362),
    (-0.3165, -0.2492, -0.2188),
)
SDXL_LATENT_RGB_BIAS = (0.1084, -0.0175, -0.0011)
JPEG_QUALITY = 80


@dataclass(frozen=True)
class PreviewJpeg:
    """One encoded preview image."""

    data: bytes
    width: int
    height: int


class LatentProjection:
    """The latent-to-RGB projection, its weights kept on each device (and dtype) it was used on."""

    def __init__(self) -> None:
        self._weights: dict[tuple[Any, torch.dtype], tuple[torch.Tensor, torch.Tensor]] = {}

    def weights(self, device: torch.device, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """(3, 4) factors and (3,) bias on ``device``; copied there once, without a host sync (pinned source)."""
        key = (device, dtype)
        if key not in self._weights:
            factors = torch.tensor(SDXL_LATENT_RGB_FACTORS, dtype=dtype).T.contiguous()
            bias = torch.tensor(SDXL_LATENT_RGB_BIAS, dtype=dtype)
            stage = tensors.stage
            self._weights[key] = (
                tensors.to_device(stage(factors, device), device),
                tensors.to_device(stage(bias, device), device),
            )
        return self._weights[key]

    def to_rgb(self, latents: torch.Tensor) -> torch.Tensor:
        """(N, 4, h, w) scaled latents to (N, 3, h, w) uint8 RGB, on the latents' device."""
        if latents.shape[1] != len(SDXL_LATENT_RGB_FACTORS):
            raise ValueError(f"previews need {len(SDXL_LATENT_RGB_FACTORS)} latent channels, got {latents.shape[1]}")
        factors, bias = self.weights(latents.device, torch.float32)
        rgb = torch.einsum("rc,nchw->nrhw", factors, latents.to(torch.float32)) + bias[None, :, None, None]
        return ((rgb + 1.0) * 127.5).clamp(0, 255).round().to(torch.uint8)


@dataclass
class StepPreview:
    """A step's preview pixels on their way to the host: ``pixels`` (N, 3, h, w) uint8, valid once ``ready``
    (a CUDA event; None on the CPU) has completed. Slicing rows is safe before that (a view, no read)."""

    pixels: torch.Tensor
    ready: Any = None

    @classmethod
    def capture(cls, rgb: torch.Tensor) -> StepPreview:
        """Start copying device pixels to the host without waiting (pinned memory, then an event)."""
        if rgb.device.type != "cuda":
            return cls(rgb)
        host = torch.empty(rgb.shape, dtype=rgb.dtype, pin_memory=True)
        host.copy_(rgb, non_blocking=True)
        event = torch.cuda.Event()
        event.record()
        return cls(host, event)

    def rows(self, start: int, stop: int) -> StepPreview:
        """Rows ``start:stop`` (one request's images)."""
        return StepPreview(self.pixels[start:stop], self.ready)

    def jpegs(self, quality: int = JPEG_QUALITY) -> list[PreviewJpeg]:
        """Wait for the copy (this thread only) and encode each image as a JPEG."""
        if self.ready is not None:
            self.ready.synchronize()
        out = []
        for image in tensors.to_pil(self.pixels):
            buffer = io.BytesIO()
            image.save(buffer, format="JPEG", quality=quality)
            out.append(PreviewJpeg(buffer.getvalue(), image.width, image.height))
        return out
