"""pipelines/fp8.py: FP8 linear layers are opt-in and gated against bf16 on the same weights (issue 10 §6).

torchao's float8 kernels need a GPU of compute capability 8.9 or newer, so on the CPU the gate is
exercised with quantizers that stand in for it: a faithful one (per-row scaled e4m3 weights, what
torchao stores) passes, broken ones fail with the numbers; torchao itself must refuse cleanly here.
``scripts/device_probe.py`` (S11) measures the real one's speed and error on an H200.
"""

from __future__ import annotations

import copy
from typing import Any

import pytest
import torch

from pipelines.errors import ConfigError
from pipelines.fp8 import _linear_fits, compare, probe_inputs, quantize_unet, torchao_rowwise

APP = "fal-ai/fast-lightning-sdxl/inpainting"


@pytest.fixture
def unet(engine: Any) -> torch.nn.Module:
    return copy.deepcopy(engine.pipeline(engine.variants[(APP, 4)]).unet).eval()


def per_row_e4m3(unet: torch.nn.Module) -> None:
    """What torchao stores: each fitting linear weight as float8 e4m3 with one scale per output row."""
    for m in unet.modules():
        if _linear_fits(m):
            w = m.weight
            scale = w.abs().amax(dim=1, keepdim=True).clamp(min=1e-12) / torch.finfo(torch.float8_e4m3fn).max
            m.weight.data = (w / scale).to(torch.float8_e4m3fn).to(w.dtype) * scale


def test_a_faithful_fp8_quantization_passes_the_gate(unet) -> None:
    before = {n: p.clone() for n, p in unet.named_parameters()}
    report = quantize_unet(unet, quantizer=per_row_e4m3)
    assert report.layers > 100 and 0 < report.relative_l2 < 0.05 and report.psnr_db > 30
    changed = [n for n, p in unet.named_parameters() if not torch.equal(p, before[n])]
    assert changed and all(n.endswith("weight") for n in changed)
    assert quantize_unet(unet, quantizer=lambda m: pytest.fail("quantized twice")) is report  # idempotent
    assert not any(p.requires_grad for p in unet.parameters())


@pytest.mark.parametrize(
    "broken",
    [
        lambda m: [layer.weight.data.zero_() for layer in m.modules() if _linear_fits(layer)],
        lambda m: [layer.weight.data.mul_(1.3) for layer in m.modules() if _linear_fits(layer)],
    ],
    ids=["zeroed", "scaled-by-1.3"],
)
def test_a_bad_quantization_fails_the_gate_with_its_numbers(unet, broken) -> None:
    with pytest.raises(ConfigError, match=r"equivalence gate.*relative L2 \d+\.\d+ > 0\.05.*PSNR"):
        quantize_unet(unet, quantizer=broken)
    assert not hasattr(unet, "_inpaint_fp8")


def test_the_gate_bound_is_the_operators(unet) -> None:
    with pytest.raises(ConfigError):
        quantize_unet(copy.deepcopy(unet), max_error=0.001, quantizer=per_row_e4m3)
    assert quantize_unet(unet, max_error=0.5, quantizer=per_row_e4m3).relative_l2 < 0.5


def test_torchao_refuses_cleanly_without_a_recent_gpu(unet) -> None:
    """No GPU of compute 8.9+ here: a ConfigError that says why (torchao missing, or the GPU), never a crash."""
    with pytest.raises(ConfigError, match="fp8"):
        torchao_rowwise(unet)


def test_the_engine_refuses_to_start_when_fp8_cannot_run(spec, resolver) -> None:
    from pipelines.engine import Engine
    from pipelines.optimize import SpeedOptions

    with pytest.raises(ConfigError, match="fp8"):
        Engine.load(
            spec,
            resolver=resolver,
            variants=[(APP, 4)],
            safety_checker=False,
            prompt_expansion=False,
            speed=SpeedOptions(fp8=True),
        )


def test_compare_reports_relative_error_and_psnr() -> None:
    ref = torch.tensor([1.0, -2.0, 3.0, 4.0])
    assert compare(ref, ref) == (0.0, float("inf"))
    error, psnr = compare(ref, ref + 0.1)
    assert error == pytest.approx(0.2 / ref.norm().item(), rel=1e-5)
    assert psnr == pytest.approx(20 * torch.log10(torch.tensor(4.0 / 0.1)).item(), rel=1e-4)


def test_the_probe_input_is_fixed(unet) -> None:
    a, b = probe_inputs(unet), probe_inputs(unet)
    assert torch.equal(a["sample"], b["sample"]) and a["sample"].shape[-1] == 64
