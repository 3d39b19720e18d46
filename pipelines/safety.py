"""The CompVis safety checker (what fal's SDXL runtime uses); flagged images become black."""

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
        self.model = frozen(
            StableDiffusionSafetyChecker.from_pretrained(folder, use_safetensors=True, dtype=dtype), device
        )

    @torch.no_grad()
    def check(self, images: list[Image.Image]) -> list[bool]:
        """One flag per image: True when it shows an NSFW concept."""
        if not images:
            return []
        pixels = self.processor(images=images, return_tensors="pt").pixel_values.to(self.device, self.dtype)
        placeholders = [np.zeros(1) for _ in images]
        _, flags = self.model(images=placeholders, clip_input=pixels)
        return [bool(f) for f in flags]

    @staticmethod
    def blacken(image: Image.Image) -> Image.Image:
        return Image.new("RGB", image.size, (0, 0, 0))
