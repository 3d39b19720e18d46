"""Speed levers applied to loaded pipelines: fused QKV projections, channels_last, torch.compile.

Each lever is measured by ``scripts/bench.py`` and described with its predicted and measured gain in
``docs/performance.md``. All of them compute the same function as the stock modules (up to float
rounding; ``tests/pipelines/test_optimize.py`` checks it on the tiny models):

* **fused QKV**: one matmul for query, key and value of each self-attention (key and value of each
  cross-attention) instead of three. diffusers' ``fuse_qkv_projections`` keeps the separate weights
  next to the fused copy; here the separate ones become views into the fused weight, so fusing costs
  no memory.
* **channels_last**: NHWC memory layout for the convolutions (tensor cores want it; on CPU it is
  left off).
* **torch.compile** of the UNet and the VAE encoder and decoder, in place (``nn.Module.compile``, so
  the modules keep their type and config), one static graph per input shape. On CUDA the default
  mode ``max-autotune`` also captures CUDA graphs, so a denoising step launches as one graph. The
  engine pads batches to a few sizes (``batch_bucket``) and the warm-up runs the served sizes, so
  the graphs exist before the server says it is ready. Inductor's caches go to ``cache_dir`` (on
  the data volume), so a restart compiles from cache.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

log = logging.getLogger(__name__)

BATCH_BUCKETS = (1, 2, 4, 8)


@dataclass(frozen=True)
class SpeedOptions:
    """Which levers to apply. ``for_device`` gives the defaults: all on for CUDA, none on CPU."""

    fuse_qkv: bool = False
    channels_last: bool = False
    compile: bool = False
    compile_mode: str | None = "max-autotune"  # None: torch's default mode
    compile_backend: str = "inductor"  # "eager" captures graphs without generating code (tests on CPU)
    cache_dir: Path | None = None  # inductor's cache (compiled kernels, FX graphs, autotuning results)

    @classmethod
    def for_device(cls, device: torch.device | str, compile: bool | None = None, cache_dir: Path | None = None):
        """All levers on CUDA (``compile`` can be turned off: it costs minutes on a cold cache), none on CPU."""
        cuda = torch.device(device).type == "cuda"
        return cls(
            fuse_qkv=cuda,
            channels_last=cuda,
            compile=cuda if compile is None else compile,
            cache_dir=cache_dir,
        )

    @property
    def pads_batches(self) -> bool:
        """Compiled graphs are per shape: pad UNet batches to ``BATCH_BUCKETS`` so few shapes exist."""
        return self.compile


def batch_bucket(rows: int, buckets: tuple[int, ...] = BATCH_BUCKETS) -> int:
    """The smallest bucket that holds ``rows`` (beyond the largest: the next multiple of it)."""
    if rows < 1:
        raise ValueError(f"a batch has at least one row, not {rows}")
    for size in buckets:
        if rows <= size:
            return size
    top = buckets[-1]
    return -(-rows // top) * top


def fuse_qkv_projections(model: nn.Module) -> int:
    """Fuse the projections of every attention module of ``model``; returns how many were fused.

    Like diffusers' ``fuse_qkv_projections`` (same processor, same math), but the unfused weights are
    then made views of the fused ones, so the model takes no more memory than before.
    """
    from diffusers.models.attention_processor import Attention, FusedAttnProcessor2_0

    fused = 0
    for module in model.modules():
        if not isinstance(module, Attention) or getattr(module, "fused_projections", False):
            continue
        module.fuse_projections(fuse=True)
        if module.is_cross_attention:
            _share(module.to_kv, [module.to_k, module.to_v])
        else:
            _share(module.to_qkv, [module.to_q, module.to_k, module.to_v])
        module.set_processor(FusedAttnProcessor2_0())
        fused += 1
    return fused


@torch.no_grad()
def _share(fused: nn.Linear, parts: list[nn.Linear]) -> None:
    """Point each part's weight (and bias) at its rows of ``fused``: one copy of the numbers."""
    start = 0
    for part in parts:
        rows = part.weight.shape[0]
        part.weight = nn.Parameter(fused.weight[start : start + rows], requires_grad=False)
        if part.bias is not None and fused.bias is not None:
            part.bias = nn.Parameter(fused.bias[start : start + rows], requires_grad=False)
        start += rows


def _set_compile_limits(cache_dir: Path | None) -> None:
    """Room for one graph per (bucket, size, variant) and a persistent kernel cache."""
    import torch._dynamo

    config = torch._dynamo.config
    for name in ("recompile_limit", "cache_size_limit"):
        if hasattr(config, name):
            setattr(config, name, max(getattr(config, name), 256))
    if hasattr(config, "accumulated_recompile_limit"):
        config.accumulated_recompile_limit = max(config.accumulated_recompile_limit, 4096)
    if cache_dir is not None:
        cache_dir.mkdir(parents=True, exist_ok=True)
        os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(cache_dir))


def optimize_pipeline(pipe: Any, options: SpeedOptions) -> list[str]:
    """Apply ``options`` to a loaded pipeline's UNet and VAE, in place; returns what was applied.

    Idempotent per module (a UNet shared by several pipelines is changed once).
    """
    applied: list[str] = []
    unet, vae = pipe.unet, pipe.vae
    if options.fuse_qkv:
        count = fuse_qkv_projections(unet) + fuse_qkv_projections(vae)
        if count:
            applied.append(f"fused qkv ({count} attention modules)")
    if options.channels_last:
        for module in (unet, vae):
            if not getattr(module, "_inpaint_channels_last", False):
                module.to(memory_format=torch.channels_last)
                module._inpaint_channels_last = True
        applied.append("channels_last")
    if options.compile:
        _set_compile_limits(options.cache_dir)
        kwargs: dict[str, Any] = {"fullgraph": True, "dynamic": False, "backend": options.compile_backend}
        if options.compile_mode and options.compile_backend == "inductor":
            kwargs["mode"] = options.compile_mode
        for module in (unet, vae.encoder, vae.decoder):
            if not getattr(module, "_inpaint_compiled", False):
                module.compile(**kwargs)
                module._inpaint_compiled = True
        applied.append(f"torch.compile ({options.compile_backend}, {kwargs.get('mode', 'default')})")
    return applied
