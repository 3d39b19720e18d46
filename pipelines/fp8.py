"""FP8 for the UNet's linear layers (opt-in, Hopper and newer), behind an equivalence gate.

torchao's dynamic float8 quantization (``Float8DynamicActivationFloat8WeightConfig`` with per-row
scales: weights stored in e4m3 with one scale per output row, activations scaled per row at run time)
replaces the UNet's ``nn.Linear`` layers, which carry about two thirds of its FLOPs; convolutions stay
bf16. Tensor cores run FP8 at twice the bf16 rate, so the linear layers can run up to 2x faster.

FP8 computes something else than bf16, so it is never silently on: with ``fp8`` set, each UNet is
run once on a fixed probe input before and after quantizing, and the noise predictions are compared
(relative L2 error and PSNR, logged at start and kept on the engine). Past ``max_error`` the engine
refuses to start and says by how much: the operator turns FP8 off or raises the bound knowingly.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .errors import ConfigError

log = logging.getLogger(__name__)

DEFAULT_MAX_ERROR = 0.05  # relative L2 of the noise prediction on the probe input

Quantizer = Callable[[nn.Module], None]


@dataclass(frozen=True)
class Fp8Report:
    relative_l2: float
    psnr_db: float
    layers: int  # linear layers quantized

    def __str__(self) -> str:
        return f"{self.layers} linear layers in FP8: relative L2 {self.relative_l2:.4f}, PSNR {self.psnr_db:.1f} dB"


def _linear_fits(module: nn.Module, _fqn: str = "") -> bool:
    """FP8 GEMMs want both dimensions in multiples of 16; tiny layers (time embeddings) gain nothing."""
    return isinstance(module, nn.Linear) and module.in_features % 16 == 0 and module.out_features % 16 == 0


def torchao_rowwise(unet: nn.Module) -> None:
    """torchao's dynamic per-row float8 quantization of the fitting linear layers, in place."""
    try:
        from torchao.quantization import Float8DynamicActivationFloat8WeightConfig, PerRow, quantize_
    except ImportError as exc:
        raise ConfigError("fp8 needs torchao: pip install 'inpaint-server[fp8]'") from exc
    try:
        quantize_(unet, Float8DynamicActivationFloat8WeightConfig(granularity=PerRow()), filter_fn=_linear_fits)
    except (AssertionError, RuntimeError, NotImplementedError) as exc:  # e.g. a GPU older than compute 8.9
        raise ConfigError(f"fp8 is not available here: {str(exc).splitlines()[0]}") from exc


def probe_inputs(unet: nn.Module, latent: int = 64, seed: int = 0) -> dict[str, Any]:
    """A fixed UNet input (one row, ``latent``^2 latents) on the UNet's device and dtype."""
    param = next(unet.parameters())
    device, dtype = param.device, param.dtype
    g = torch.Generator(device="cpu").manual_seed(seed)
    cfg = unet.config
    time_ids = 6
    text_embeds = cfg.projection_class_embeddings_input_dim - time_ids * cfg.addition_time_embed_dim

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=g).to(device=device, dtype=dtype)

    return {
        "sample": randn(1, cfg.in_channels, latent, latent),
        "timestep": torch.tensor(500.0, device=device),
        "encoder_hidden_states": randn(1, 77, cfg.cross_attention_dim),
        "added_cond_kwargs": {
            "text_embeds": randn(1, text_embeds),
            "time_ids": torch.tensor([[latent * 8, latent * 8, 0, 0, latent * 8, latent * 8]], device=device).to(dtype),
        },
    }


def compare(reference: torch.Tensor, candidate: torch.Tensor) -> tuple[float, float]:
    """(relative L2 error, PSNR in dB against the reference's peak) of ``candidate``."""
    ref, cand = reference.float(), candidate.float()
    error = (cand - ref).norm() / ref.norm().clamp(min=1e-12)
    mse = (cand - ref).pow(2).mean()
    peak = ref.abs().max().clamp(min=1e-12)
    psnr = math.inf if mse == 0 else float(20 * torch.log10(peak / mse.sqrt()))
    return float(error), psnr


@torch.inference_mode()
def quantize_unet(
    unet: nn.Module, max_error: float = DEFAULT_MAX_ERROR, quantizer: Quantizer = torchao_rowwise
) -> Fp8Report:
    """Quantize ``unet``'s linear layers in place, after checking the gate; idempotent.

    Raises :class:`ConfigError` when the quantized UNet's noise prediction on the probe input is
    further than ``max_error`` (relative L2) from the bf16 one.
    """
    done = getattr(unet, "_inpaint_fp8", None)
    if done is not None:
        return done
    inputs = probe_inputs(unet)
    reference = unet(**inputs, return_dict=False)[0]
    layers = sum(1 for m in unet.modules() if _linear_fits(m))
    with torch.inference_mode(False), torch.no_grad():  # the quantizer swaps weights: ordinary tensors
        quantizer(unet)
        unet.requires_grad_(False)
    error, psnr = compare(reference, unet(**inputs, return_dict=False)[0])
    report = Fp8Report(relative_l2=error, psnr_db=psnr, layers=layers)
    if not error <= max_error:
        raise ConfigError(
            f"fp8 fails its equivalence gate on this UNet: relative L2 {error:.4f} > {max_error} (PSNR {psnr:.1f} dB) "
            "against bf16 on the same weights; turn fp8 off, or raise fp8_max_error if that is acceptable"
        )
    unet._inpaint_fp8 = report
    log.info("UNet %s", report)
    return report
