"""GPU faults: which errors are which, freeing memory after an OOM, and the low-memory VAE mode.

Two kinds of GPU error matter to a server:

* **out of memory** (``torch.cuda.OutOfMemoryError``): the CUDA context is fine; free the cached
  blocks and try again with less at once (the engine's retry policy, see ``Engine.run``);
* **fatal** (illegal memory access, device-side assert, launch failure, ECC error...): the CUDA
  context is broken for the life of the process; every later CUDA call fails. Only a new process
  helps, so the engine raises :class:`~pipelines.errors.GpuFatalError` and the server restarts.
"""

from __future__ import annotations

import gc
import logging
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, Literal

import torch

log = logging.getLogger(__name__)

GpuErrorKind = Literal["oom", "fatal"]

# Lower-case fragments of the messages CUDA (via torch) gives for errors that poison the context.
FATAL_MARKERS = (
    "illegal memory access",
    "device-side assert",
    "unspecified launch failure",
    "illegal instruction",
    "misaligned address",
    "uncorrectable ecc error",
    "cuda error: unknown error",
    "cublas_status_execution_failed",
    "cudnn_status_execution_failed",
    "gpu has fallen off the bus",
)
OOM_MARKERS = ("cuda out of memory", "cuda error: out of memory", "cublas_status_alloc_failed")

# Largest VAE tile (pixels) in low-memory mode; SDXL's VAE would otherwise tile only above 1024 px.
LOW_MEMORY_TILE_PX = 512


def classify_gpu_error(exc: BaseException) -> GpuErrorKind | None:
    """``"oom"``, ``"fatal"`` or None (not a GPU fault: an ordinary bug or bad input)."""
    if isinstance(exc, torch.cuda.OutOfMemoryError):
        return "oom"
    if not isinstance(exc, RuntimeError):
        return None
    message = str(exc).lower()
    if any(marker in message for marker in OOM_MARKERS):
        return "oom"
    if any(marker in message for marker in FATAL_MARKERS):
        return "fatal"
    return None


def first_line(exc: BaseException, limit: int = 200) -> str:
    """The exception's first message line, short (torch's OOM text runs to several lines)."""
    text = str(exc).strip().splitlines()
    return (text[0] if text else type(exc).__name__)[:limit]


def free_memory(device: torch.device) -> None:
    """Give back what a failed attempt held: unreachable tensors, then the CUDA allocator's cache."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        log.info(
            "GPU memory after freeing: %.2f GiB allocated, %.2f GiB reserved",
            torch.cuda.memory_allocated(device) / 2**30,
            torch.cuda.memory_reserved(device) / 2**30,
        )


def check_device(device: torch.device) -> None:
    """Raise if the device no longer works (one tiny kernel and a synchronize). No-op on CPU."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        probe = torch.ones(8, device=device)
        if float(probe.add_(1).sum().item()) != 16.0:
            raise RuntimeError("CUDA error: unknown error (device self-check computed a wrong sum)")


_VAE_MEMORY_STATE = ("use_tiling", "use_slicing", "tile_sample_min_size", "tile_latent_min_size")


@contextmanager
def low_memory_vae(vae: Any, tile_px: int = LOW_MEMORY_TILE_PX) -> Iterator[None]:
    """VAE tiling and slicing (tiles of at most ``tile_px``) for the duration; the previous settings after."""
    saved = {name: getattr(vae, name) for name in _VAE_MEMORY_STATE}
    try:
        vae.enable_tiling()
        vae.enable_slicing()
        tile = vae.tile_sample_min_size
        if isinstance(tile, int) and tile > tile_px:
            scale = 2 ** (len(vae.config.block_out_channels) - 1)
            vae.tile_sample_min_size = tile_px
            vae.tile_latent_min_size = tile_px // scale
        yield
    finally:
        for name, value in saved.items():
            setattr(vae, name, value)
