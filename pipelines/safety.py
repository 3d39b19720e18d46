"""The CompVis safety checker (what fal's SDXL runtime uses); flagged images become black.

It checks the composited uint8 outputs where they are (on the GPU), preprocessing them with tensor
operations; only the flags come back to the host.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import torch
from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker
from PIL import Image

from .loading import frozen


def _image_processor(folder: Path):
    # transformers' default CLIPImageProcessor needs torchvision (GPU extra); the PIL one does the same work.
    if importlib.util.find_spec("torchvision") is not None:
        from transformers import CLIPImageProcessor

        return CLIPImageProcessor.from_pretrained(folder)
    from transformers import CLIPImageProcessorPil

    return CLIPImageProcessorPil.from_pretrained(folder)


class SafetyChecker:
    def __init__(self, folder: Path, device: torch.device, dtype: torch.dtype) -> None:
        self.device = device
        self.dtype = dtype
        self.processor = _image_processor(folder)
        # CLIP's normalisation constants, on the device once (not copied there on every check).
        self._mean = torch.tensor(self.processor.image_mean, dtype=torch.float32, device=device).view(1, -1, 1, 1)
        self._std = torch.tensor(self.processor.image_std, dtype=torch.float32, device=device).view(1, -1, 1, 1)
        self.model = frozen(
            StableDiffusionSafetyChecker.from_pretrained(folder, use_safetensors=True, dtype=dtype), device
        )

    @torch.inference_mode()
    def check(self, images: torch.Tensor) -> list[bool]:
        """One flag per image of ``images`` ((N, 3, H, W) uint8, on any device): True when it shows an NSFW concept."""
        if not len(images):
            return []
        pixels = self.clip_pixels(images.to(self.device)).to(self.dtype)
        placeholders = [np.zeros(1) for _ in range(len(images))]
        _, flags = self.model(images=placeholders, clip_input=pixels)
        return [bool(f) for f in flags]

    def clip_pixels(self, images: torch.Tensor) -> torch.Tensor:
        """CLIP's preprocessing (the processor's own settings: shortest-edge resize, centre crop, rescale,
        normalise) as tensor operations on the images' device, instead of PIL on the GPU thread's host.
        Matches the PIL processor to resampling rounding (tests/pipelines/test_safety.py)."""
        p = self.processor
        x = images.to(torch.float32)
        height, width = x.shape[-2:]
        if p.do_resize:
            x = _resize(x, _resize_size(p.size, height, width), _RESAMPLE.get(int(p.resample), "bicubic"))
        if p.do_center_crop:
            x = _center_crop(x, int(p.crop_size.height), int(p.crop_size.width))
        if p.do_rescale:
            x = x * float(p.rescale_factor)
        if p.do_normalize:
            x = (x - self._mean.to(x.device)) / self._std.to(x.device)
        return x

    @staticmethod
    def blacken(image: Image.Image) -> Image.Image:
        return Image.new("RGB", image.size, (0, 0, 0))


# PIL resampling codes (the processor's ``resample``) to torch's interpolation modes.
_RESAMPLE = {2: "bilinear", 3: "bicubic"}


def _resize_size(size, height: int, width: int) -> tuple[int, int]:
    """(height, width) the processor resizes to: the shortest edge to ``size.shortest_edge`` (as
    ``transformers.image_transforms.get_resize_output_image_size`` with ``default_to_square=False``), or
    exactly ``size.height`` x ``size.width``."""
    if size.shortest_edge:
        short, long = (width, height) if width <= height else (height, width)
        new_short, new_long = int(size.shortest_edge), int(int(size.shortest_edge) * long / short)
        return (new_long, new_short) if width <= height else (new_short, new_long)
    return int(size.height), int(size.width)


def _resize(x: torch.Tensor, size: tuple[int, int], mode: str) -> torch.Tensor:
    if tuple(x.shape[-2:]) == size:
        return x
    # PIL resamples uint8 and rounds; the same range here, without the rounding.
    return torch.nn.functional.interpolate(x, size=size, mode=mode, antialias=True).clamp(0, 255)


def _center_crop(x: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """``transformers.image_transforms.center_crop`` (zero-padded where the image is smaller than the crop)."""
    h, w = x.shape[-2:]
    if h < height or w < width:
        pad_h, pad_w = max(height - h, 0), max(width - w, 0)
        x = torch.nn.functional.pad(x, (pad_w // 2, pad_w - pad_w // 2, pad_h // 2, pad_h - pad_h // 2))
        h, w = x.shape[-2:]
    top, left = (h - height) // 2, (w - width) // 2
    return x[..., top : top + height, left : left + width]
