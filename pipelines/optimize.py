"""Speed levers applied to loaded pipelines: fused QKV, channels_last, regional torch.compile, attention order.

Each lever is measured by ``scripts/bench.py`` and described with its predicted and measured gain in
``docs/performance.md``. All of them compute the same function as the stock modules (up to float
rounding; ``tests/pipelines/test_optimize.py`` checks it on the tiny models):

* **fused QKV**: one matmul for query, key and value of each self-attention (key and value of each
  cross-attention) instead of three. diffusers' ``fuse_qkv_projections`` keeps the separate weights
  next to the fused copy; here the separate ones become views into the fused weight, so fusing costs
  no memory.
* **channels_last**: NHWC memory layout for the convolutions (tensor cores want it; off on CPU).
* **torch.compile, regionally**: the UNet's repeated ``BasicTransformerBlock`` (diffusers'
  ``compile_repeated_blocks``; 70 % of the UNet's FLOPs are in them) and the VAE's encoder and
  decoder, with dynamic shapes. Dynamo compiles a block's code once and every instance of it reuses
  the graph (parameters are graph inputs), in every UNet of every variant: the number of graphs a
  warm-up builds does not grow with the number of variants, sizes or batch buckets
  (``tests/pipelines/test_compile_counts.py``), so a restart re-traces a handful of small graphs
  instead of ~100 whole-UNet ones. CUDA graphs over the whole UNet call (``graphs.py``) take the
  place of ``mode="reduce-overhead"``. Inductor's caches live under ``cache_dir`` (the data volume),
  set before anything compiles (:func:`use_compile_cache`).
* **FP8** (opt-in, Hopper): the UNet's linear layers in float8 with per-row scales, through torchao,
  checked against bf16 on the same weights before the engine starts (``fp8.py``).
* **attention backend order** (CUDA): ``attention="cudnn"`` puts cuDNN's fused attention ahead of
  flash (faster on Hopper in NVIDIA's numbers; measured by the bench's ``levers`` section).
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
# torch's scaled-dot-product backends, in the priority order each setting gives.
ATTENTION_ORDERS = {
    "cudnn": ("CUDNN_ATTENTION", "FLASH_ATTENTION", "EFFICIENT_ATTENTION", "MATH"),
    "flash": ("FLASH_ATTENTION", "EFFICIENT_ATTENTION", "CUDNN_ATTENTION", "MATH"),
    "efficient": ("EFFICIENT_ATTENTION", "FLASH_ATTENTION", "CUDNN_ATTENTION", "MATH"),
}
ATTENTION_CHOICES = ("auto", *ATTENTION_ORDERS)


@dataclass(frozen=True)
class SpeedOptions:
    """Which levers to apply. ``for_device`` gives the defaults: all on for CUDA, none on CPU."""

    fuse_qkv: bool = False
    channels_last: bool = False
    compile: bool = False
    compile_mode: str | None = None  # torch's default; "max-autotune-no-cudagraphs" only if it measures better
    compile_backend: str = "inductor"  # "eager" captures graphs without generating code (tests on CPU)
    compile_dynamic: bool = True  # dynamic shapes: one graph per block for every size and bucket
    cuda_graphs: bool = False  # whole-UNet CUDA graphs per (variant, bucket, size), recorded in the warm-up
    attention: str = "auto"  # see ATTENTION_ORDERS
    fp8: bool = False  # the UNet's linear layers in FP8 (pipelines/fp8.py), behind an equivalence gate
    fp8_max_error: float = 0.05  # the gate: relative L2 of the noise prediction against bf16
    cache_dir: Path | None = None  # inductor's and Triton's caches (compiled kernels, FX graphs, autotuning)

    @classmethod
    def for_device(
        cls, device: torch.device | str, compile: bool | None = None, cache_dir: Path | None = None, **overrides: Any
    ) -> SpeedOptions:
        """All levers on CUDA (``compile`` can be turned off: it costs a minute on a cold cache), none on CPU."""
        cuda = torch.device(device).type == "cuda"
        compiled = cuda if compile is None else compile
        options = {
            "fuse_qkv": cuda,
            "channels_last": cuda,
            "compile": compiled,
            "cuda_graphs": cuda and compiled,
            "cache_dir": cache_dir,
        }
        return cls(**{**options, **overrides})

    @property
    def pads_batches(self) -> bool:
        """Compiled batches are padded to ``BATCH_BUCKETS``, so CUDA graphs exist for every batch there is."""
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
    fused.requires_grad_(False)  # diffusers makes the fused projection a fresh (trainable) Linear
    start = 0
    for part in parts:
        rows = part.weight.shape[0]
        part.weight = nn.Parameter(fused.weight[start : start + rows], requires_grad=False)
        if part.bias is not None and fused.bias is not None:
            part.bias = nn.Parameter(fused.bias[start : start + rows], requires_grad=False)
        start += rows


def use_compile_cache(cache_dir: Path) -> None:
    """Point inductor's and Triton's caches at ``cache_dir``, before anything compiles.

    Assigned, not ``setdefault``: inductor writes its ``/tmp`` default into ``TORCHINDUCTOR_CACHE_DIR``
    the first time it asks for its cache dir, after which a ``setdefault`` would change nothing and a
    restart would find a cold cache. Inductor's memoised paths are cleared so they follow.
    """
    cache_dir = Path(cache_dir).resolve()
    cache_dir.mkdir(parents=True, exist_ok=True)
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(cache_dir)
    os.environ["TRITON_CACHE_DIR"] = str(cache_dir / "triton")
    from torch._inductor.utils import clear_caches

    clear_caches()


def _set_compile_limits() -> None:
    """Room for the few graphs per block that dynamic shapes still need (batch 1 is specialised), and
    no duck sizing: with it a square first size (1024x1024) makes height == width a guard, and the
    first non-square size would compile everything again."""
    import torch._dynamo
    import torch.fx.experimental._config as fx_config

    config = torch._dynamo.config
    for name in ("recompile_limit", "cache_size_limit"):
        if hasattr(config, name):
            setattr(config, name, max(getattr(config, name), 64))
    if hasattr(config, "accumulated_recompile_limit"):
        config.accumulated_recompile_limit = max(config.accumulated_recompile_limit, 1024)
    fx_config.use_duck_shape = False


def set_attention_order(attention: str) -> list[str]:
    """Give torch's scaled-dot-product attention its backend priority (``ATTENTION_ORDERS``); "auto" keeps
    torch's own. Global, like every SDPA setting; applied before anything is compiled (the choice is
    traced into the graphs). Returns the order now in force."""
    from torch.nn.attention import SDPBackend

    if attention not in ATTENTION_CHOICES:
        raise ValueError(f"attention must be one of {ATTENTION_CHOICES}, got {attention!r}")
    if attention != "auto":
        order = [getattr(SDPBackend, name) for name in ATTENTION_ORDERS[attention]]
        every = list(SDPBackend.__members__.values())
        rest = [b for b in every if b not in order and int(b.value) >= 0]
        torch._C._set_sdp_priority_order([int(b.value) for b in order + rest])
    by_value = {int(b.value): name for name, b in SDPBackend.__members__.items()}
    return [by_value[v] for v in torch._C._get_sdp_priority_order()]


def compile_kwargs(options: SpeedOptions) -> dict[str, Any]:
    kwargs: dict[str, Any] = {"fullgraph": True, "dynamic": options.compile_dynamic, "backend": options.compile_backend}
    if options.compile_mode and options.compile_backend == "inductor":
        kwargs["mode"] = options.compile_mode
    return kwargs


def compile_regions(unet: nn.Module, vae: Any, options: SpeedOptions) -> bool:
    """Compile the UNet's repeated blocks and both VAE halves in place (``nn.Module.compile``: the modules
    keep their type and config). Idempotent per module; returns whether anything was compiled now."""
    _set_compile_limits()
    kwargs = compile_kwargs(options)
    done = False
    if not getattr(unet, "_inpaint_compiled", False):
        unet.compile_repeated_blocks(**kwargs)
        unet._inpaint_compiled = done = True
    for module in (vae.encoder, vae.decoder):
        if not getattr(module, "_inpaint_compiled", False):
            module.compile(**kwargs)
            module._inpaint_compiled = done = True
    return done


def optimize_pipeline(pipe: Any, options: SpeedOptions) -> list[str]:
    """Apply ``options`` to a loaded pipeline's UNet and VAE, in place; returns what was applied.

    Idempotent per module (a UNet or VAE shared by several pipelines is changed once).
    """
    applied: list[str] = []
    unet, vae = pipe.unet, pipe.vae
    if options.fuse_qkv:  # first: FP8 then quantizes the fused projections
        count = fuse_qkv_projections(unet) + fuse_qkv_projections(vae)
        if count:
            applied.append(f"fused qkv ({count} attention modules)")
    if options.channels_last:
        for module in (unet, vae):
            if not getattr(module, "_inpaint_channels_last", False):
                module.to(memory_format=torch.channels_last)
                module._inpaint_channels_last = True
        applied.append("channels_last")
    if options.fp8:
        from .fp8 import quantize_unet

        applied.append(f"fp8 ({quantize_unet(unet, options.fp8_max_error)})")
    if options.compile:
        compile_regions(unet, vae, options)
        kwargs = compile_kwargs(options)
        shapes = "dynamic" if options.compile_dynamic else "static"
        applied.append(f"torch.compile of the UNet's blocks and the VAE ({kwargs['backend']}, {shapes} shapes)")
    return applied
