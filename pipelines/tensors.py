"""Images as uint8 tensors: staged on the host in ``prepare``, normalised, resized and composited on the device.

The GPU thread used to spend ~28 ms of host work per 1024x1024 image while the GPU idled: PIL to
float arrays for the VAE, the mask's binarisation, a CPU-side cast, float to uint8, the PIL composite
and the safety checker's PIL preprocessing. Now ``Engine.prepare`` (a pool thread, off the GPU's path)
turns the decoded PIL inputs into uint8 tensors, pinned when the engine runs on CUDA so their copies
are asynchronous; the engine does the arithmetic on the device and only uint8 pixels come back.

Conventions are :mod:`pipelines.images`' (white = repaint, binarised at 128): every pixel outside the
binarised mask comes back bit-identical to the (resized) input.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from .images import MASK_THRESHOLD, FittedInputs


def pixels(image: Image.Image) -> torch.Tensor:
    """An RGB PIL image as a (3, H, W) uint8 tensor."""
    return torch.from_numpy(np.asarray(image.convert("RGB"), dtype=np.uint8).transpose(2, 0, 1).copy())


def mask_bits(mask: Image.Image) -> torch.Tensor:
    """An "L" mask as a (1, H, W) uint8 tensor of 0/1 (1 = repaint), binarised as diffusers' mask processor does."""
    return torch.from_numpy((np.asarray(mask, dtype=np.uint8) >= MASK_THRESHOLD).astype(np.uint8)[None])


def stage(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A host tensor ready to copy to ``device``: pinned for CUDA (the copy then needs no host sync)."""
    return tensor.pin_memory() if device.type == "cuda" else tensor


def to_device(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Copy a host tensor to ``device`` without waiting (asynchronous from pinned memory)."""
    if tensor.device == device:
        return tensor
    if device.type == "cuda" and not tensor.is_pinned():
        tensor = tensor.pin_memory()
    return tensor.to(device, non_blocking=True)


@dataclass
class RequestTensors:
    """One request's inputs as staged host tensors.

    ``work_*`` are what the model sees (working size, multiples of 8); ``out_*`` are the composite's
    reference at the output size (the same tensors when both sizes agree).
    """

    work_image: torch.Tensor  # (3, h, w) uint8
    work_mask: torch.Tensor  # (1, h, w) uint8 0/1
    out_image: torch.Tensor  # (3, H, W) uint8
    out_mask: torch.Tensor  # (1, H, W) uint8 0/1

    @classmethod
    def from_inputs(cls, inputs: FittedInputs, device: torch.device) -> RequestTensors:
        work_image, work_mask = stage(pixels(inputs.work_image), device), stage(mask_bits(inputs.work_mask), device)
        if inputs.work_size == inputs.output_size:
            return cls(work_image, work_mask, work_image, work_mask)
        return cls(work_image, work_mask, stage(pixels(inputs.image), device), stage(mask_bits(inputs.mask), device))


def normalize(images: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """uint8 images to the VAE's [-1, 1] range (as diffusers' image processor: float32 ``x / 255 * 2 - 1``)."""
    return ((images.to(torch.float32) / 255.0) * 2.0 - 1.0).to(dtype)


def decoded_to_unit(decoded: torch.Tensor) -> torch.Tensor:
    """A VAE decode in [-1, 1] to float32 [0, 1]; NaN/inf (reported as errors elsewhere) become 0."""
    return (decoded.to(torch.float32) / 2 + 0.5).clamp(0, 1).nan_to_num(0.0, 0.0, 0.0)


def quantize(unit: torch.Tensor) -> torch.Tensor:
    """[0, 1] float to uint8 (round half to even, as NumPy's ``round`` did before)."""
    return (unit * 255).round().to(torch.uint8)


def resize(unit: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Resize (N, C, h, w) float images to ``size`` = (width, height), bicubic with antialiasing (PIL-like)."""
    width, height = size
    if unit.shape[-2:] == (height, width):
        return unit
    return torch.nn.functional.interpolate(unit, size=(height, width), mode="bicubic", antialias=True).clamp(0, 1)


def composite(generated: torch.Tensor, reference: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """uint8 (3, H, W): ``generated`` where ``mask`` (0/1, (1, H, W)) is set, ``reference``'s exact pixels elsewhere."""
    return torch.where(mask.bool(), generated, reference)


def to_pil(images: torch.Tensor) -> list[Image.Image]:
    """(N, 3, H, W) uint8 on the host to PIL images."""
    hwc = images.permute(0, 2, 3, 1).contiguous().numpy()
    return [Image.fromarray(hwc[k], mode="RGB") for k in range(hwc.shape[0])]


def rows(tensor: torch.Tensor, index: list[int]) -> torch.Tensor:
    """``tensor[index]`` for a Python list of row indices without building an index tensor on the device
    (that would be a host-to-device copy, a sync on CUDA): a view for a contiguous run, else a concatenation."""
    if not index:
        return tensor[:0]
    start = index[0]
    if index == list(range(start, start + len(index))):
        return tensor[start : start + len(index)]
    return torch.cat([tensor[k : k + 1] for k in index])
