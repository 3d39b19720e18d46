"""The speed levers of pipelines/optimize.py compute what the stock modules compute (tiny models, CPU).

Fused QKV projections and channels_last give the same outputs (fp32: to float rounding) and fusing
takes no extra memory; the whole UNet and both VAE halves are captured by torch.compile as single
graphs (``fullgraph=True``, the eager backend: the capture is what can break, code generation is
Inductor's); batch buckets round up as the compiled graphs expect.
"""

from __future__ import annotations

import copy
from typing import Any

import pytest
import torch

from pipelines.optimize import SpeedOptions, batch_bucket, fuse_qkv_projections, optimize_pipeline

APP = "fal-ai/fast-lightning-sdxl/inpainting"


@pytest.fixture
def parts(engine: Any) -> tuple[Any, Any, Any]:
    """Private copies of one variant's UNet and VAE (the shared engine is never changed) and its pipeline."""
    pipe = engine.pipeline(engine.variants[(APP, 4)])
    return copy.deepcopy(pipe.unet).eval(), copy.deepcopy(pipe.vae).eval(), pipe


def _unet_inputs(unet: Any, batch: int = 2, seed: int = 0) -> dict[str, Any]:
    g = torch.Generator().manual_seed(seed)
    cfg = unet.config
    cross = cfg.cross_attention_dim
    time_ids = 6  # SDXL's add_time_ids
    text_embeds = cfg.projection_class_embeddings_input_dim - time_ids * cfg.addition_time_embed_dim
    return {
        "sample": torch.randn(batch, cfg.in_channels, 8, 12, generator=g),
        "timestep": torch.tensor(500.0),
        "encoder_hidden_states": torch.randn(batch, 77, cross, generator=g),
        "added_cond_kwargs": {
            "text_embeds": torch.randn(batch, text_embeds, generator=g),
            "time_ids": torch.randn(batch, time_ids, generator=g),
        },
    }


def _storage_bytes(module: torch.nn.Module) -> int:
    """Bytes of distinct parameter storages: views into one tensor count once."""
    seen: dict[int, int] = {}
    for p in module.parameters():
        storage = p.untyped_storage()
        seen[storage.data_ptr()] = storage.nbytes()
    return sum(seen.values())


@torch.no_grad()
def test_fused_qkv_computes_the_same_and_costs_no_memory(parts) -> None:
    unet, vae, _ = parts
    inputs = _unet_inputs(unet)
    image = torch.randn(1, 3, 32, 48, generator=torch.Generator().manual_seed(1))
    before_unet, before_vae = unet(**inputs).sample, vae.decode(vae.encode(image).latent_dist.mean).sample
    bytes_before = _storage_bytes(unet) + _storage_bytes(vae)

    count = fuse_qkv_projections(unet) + fuse_qkv_projections(vae)
    assert count > 0
    assert fuse_qkv_projections(unet) == 0  # already fused: nothing more to do
    after_unet, after_vae = unet(**inputs).sample, vae.decode(vae.encode(image).latent_dist.mean).sample
    torch.testing.assert_close(after_unet, before_unet, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(after_vae, before_vae, rtol=1e-4, atol=1e-5)
    assert _storage_bytes(unet) + _storage_bytes(vae) == bytes_before


@torch.no_grad()
def test_fused_weights_really_are_used(parts) -> None:
    """The fused processor reads to_qkv: changing the fused weight changes the output (not a no-op)."""
    unet, _, _ = parts
    inputs = _unet_inputs(unet)
    fuse_qkv_projections(unet)
    reference = unet(**inputs).sample
    attn = next(m for m in unet.modules() if getattr(m, "to_qkv", None) is not None)
    attn.to_qkv.weight.mul_(2.0)
    assert attn.to_q.weight.data_ptr() == attn.to_qkv.weight.data_ptr()  # the view follows
    assert not torch.allclose(unet(**inputs).sample, reference)


@torch.no_grad()
def test_channels_last_computes_the_same(parts) -> None:
    unet, vae, _ = parts
    inputs = _unet_inputs(unet)
    latents = torch.randn(1, vae.config.latent_channels, 4, 6, generator=torch.Generator().manual_seed(3))
    reference, decoded = unet(**inputs).sample, vae.decode(latents).sample
    unet.to(memory_format=torch.channels_last)
    vae.to(memory_format=torch.channels_last)
    torch.testing.assert_close(unet(**inputs).sample, reference, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(vae.decode(latents).sample, decoded, rtol=1e-4, atol=1e-5)


@torch.no_grad()
def test_optimize_pipeline_captures_whole_graphs_and_matches(parts) -> None:
    """fuse + channels_last + compile (eager backend, fullgraph): same outputs at two batch sizes, and a
    graph break anywhere in a compiled region (each transformer block, each VAE half) would raise here."""
    unet, vae, _ = parts
    references = {b: unet(**_unet_inputs(unet, batch=b)).sample for b in (1, 2)}
    latents = torch.randn(2, vae.config.latent_channels, 4, 6, generator=torch.Generator().manual_seed(2))
    decoded = vae.decode(latents).sample

    class Pipe:  # what optimize_pipeline touches of a pipeline
        pass

    pipe = Pipe()
    pipe.unet, pipe.vae = unet, vae
    options = SpeedOptions(fuse_qkv=True, channels_last=True, compile=True, compile_backend="eager")
    applied = optimize_pipeline(pipe, options)
    assert [a.split(" ")[0] for a in applied] == ["fused", "channels_last", "torch.compile"]
    assert "dynamic shapes" in applied[-1]
    torch._dynamo.reset()
    for b, reference in references.items():
        torch.testing.assert_close(unet(**_unet_inputs(unet, batch=b)).sample, reference, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(vae.decode(latents).sample, decoded, rtol=1e-4, atol=1e-5)
    assert optimize_pipeline(pipe, options)[-1].startswith("torch.compile")  # again: no second wrapping
    blocks = [m for m in unet.modules() if type(m).__name__ == "BasicTransformerBlock"]
    assert blocks and all(b._compiled_call_impl is not None for b in blocks)  # the repeated blocks, regionally
    assert unet._compiled_call_impl is None  # not the whole UNet: CUDA graphs cover its glue (graphs.py)
    assert vae.encoder._compiled_call_impl is not None and vae.decoder._compiled_call_impl is not None


def test_speed_options_defaults_per_device() -> None:
    cpu, cuda = SpeedOptions.for_device("cpu"), SpeedOptions.for_device("cuda")
    assert (cpu.fuse_qkv, cpu.channels_last, cpu.compile, cpu.cuda_graphs) == (False, False, False, False)
    assert (cuda.fuse_qkv, cuda.channels_last, cuda.compile, cuda.cuda_graphs) == (True, True, True, True)
    assert cuda.compile_mode is None  # torch's default mode: max-autotune only where it measures better
    assert cuda.compile_dynamic and cuda.attention == "auto"
    assert SpeedOptions.for_device("cuda", compile=False).compile is False
    assert cuda.pads_batches and not cpu.pads_batches


@pytest.mark.parametrize(
    ("rows", "bucket"), [(1, 1), (2, 2), (3, 4), (4, 4), (5, 8), (8, 8), (9, 16), (17, 24), (64, 64)]
)
def test_batch_bucket(rows: int, bucket: int) -> None:
    assert batch_bucket(rows) == bucket


def test_batch_bucket_refuses_empty() -> None:
    with pytest.raises(ValueError):
        batch_bucket(0)


def test_fused_projections_are_frozen_too(parts) -> None:
    """diffusers builds the fused projection as a fresh, trainable Linear; it is frozen like the rest."""
    unet = parts[0]
    unet.requires_grad_(False)
    fuse_qkv_projections(unet)
    assert not any(p.requires_grad for p in unet.parameters())


@pytest.mark.parametrize("attention", ["cudnn", "flash", "efficient"])
def test_attention_order_puts_the_chosen_backend_first(attention: str) -> None:
    from pipelines.optimize import ATTENTION_ORDERS, set_attention_order

    saved = torch._C._get_sdp_priority_order()
    try:
        order = set_attention_order(attention)
        assert order[: len(ATTENTION_ORDERS[attention])] == list(ATTENTION_ORDERS[attention])
        assert set_attention_order("auto") == order  # "auto" leaves the order in force alone
    finally:
        torch._C._set_sdp_priority_order(saved)
    with pytest.raises(ValueError, match="attention"):
        set_attention_order("fastest")
