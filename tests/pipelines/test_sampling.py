"""pipelines/sampling.py computes what the diffusers schedulers compute (issue 10, section 4).

For every variant of both apps (and the unified Hyper LoRA with TCD eta 1), at several strengths and
prediction types, the engine's denoising loop is run twice with the same stand-in UNet: once through
the diffusers scheduler as the engine used to (``scale_model_input``, ``step``, ``add_noise``), once
through the host-precomputed :class:`~pipelines.sampling.Sampler`. In float32 the latents agree to the
bit; in bfloat16 to its rounding (diffusers rounds some 0-d coefficients to bf16 where the sampler
keeps float32).
"""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest
import torch
from diffusers.utils.torch_utils import randn_tensor

from pipelines.errors import ConfigError
from pipelines.sampling import LcmSampler, TcdSampler, build_sampler
from pipelines.schedules import make_scheduler, timesteps_for
from pipelines.specs import ENGINE_FILE, default_config_dir, parse_app

SHAPE = (3, 4, 6, 8)  # three rows of 48x64 latents


def _variants() -> list:
    found = []
    for path in sorted(Path(default_config_dir()).glob("*.toml")):
        if path.name == ENGINE_FILE:
            continue
        doc = tomllib.loads(path.read_text())
        found += parse_app(doc, str(path)).variants.values()
        if "unified" in doc:
            found += [v for v in parse_app({**doc, "unified_lora": True}, str(path)).variants.values() if v.steps > 1]
    return found


VARIANTS = _variants()
IDS = [f"{v.app_name}-{v.steps}-{v.schedule}" for v in VARIANTS]


@pytest.fixture(scope="module")
def base_config(engine) -> dict:
    variant = next(iter(engine.variants.values()))
    return engine.store.scheduler_config(variant.base)


def _fake_unet(latents: torch.Tensor, t: float, i: int) -> torch.Tensor:
    """A deterministic stand-in for the UNet that depends on its input and the timestep."""
    g = torch.Generator().manual_seed(100 + i)
    return 0.3 * latents + (t / 1000.0) * torch.randn(latents.shape, generator=g).to(latents.dtype)


def _generators(seed: int) -> list[torch.Generator]:
    return [torch.Generator().manual_seed(seed + k) for k in range(SHAPE[0])]


def _inputs(dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(7)
    image = torch.randn(SHAPE, generator=g).to(dtype)
    noise = randn_tensor(SHAPE, generator=_generators(0), dtype=dtype)
    mask = (torch.rand(SHAPE[0], 1, *SHAPE[2:], generator=g) > 0.5).to(dtype)
    return image, noise, mask


def _reference(variant, base_config, timesteps, strength, dtype, eta) -> tuple[torch.Tensor, list[float]]:
    """The engine's loop as it was: the diffusers scheduler does the math."""
    scheduler = make_scheduler(variant, base_config)
    scheduler.set_timesteps(timesteps=timesteps, device="cpu")
    if hasattr(scheduler, "set_begin_index"):
        scheduler.set_begin_index(0)
    ts = scheduler.timesteps
    image, noise, mask = _inputs(dtype)
    n = SHAPE[0]
    latents = (
        noise * scheduler.init_noise_sigma if strength == 1.0 else scheduler.add_noise(image, noise, ts[:1].repeat(n))
    )
    extra = {"generator": _generators(50)}
    if eta is not None and variant.scheduler_class == "TCDScheduler":
        extra["eta"] = eta
    seen = []
    for i, t in enumerate(ts):
        seen.append(float(t))
        out = _fake_unet(scheduler.scale_model_input(latents, t), float(t), i)
        latents = scheduler.step(out, t, latents, **extra, return_dict=False)[0]
        proper = image if i == len(ts) - 1 else scheduler.add_noise(image, noise, ts[i + 1 : i + 2])
        latents = (1 - mask) * proper + mask * latents
    return latents, seen


def _ours(sampler, strength, dtype) -> tuple[torch.Tensor, list[float]]:
    image, noise, mask = _inputs(dtype)
    generators = _generators(50)
    latents = sampler.start(image, noise, strength == 1.0)
    for i, t in enumerate(sampler.timesteps):
        out = _fake_unet(sampler.model_input(latents, i), t, i)
        latents = sampler.step(out, latents, i, generators)
        latents = (1 - mask) * sampler.renoise(image, noise, i) + mask * latents
    return latents, list(sampler.timesteps)


def _eta(variant) -> float | None:
    return variant.eta


@pytest.mark.parametrize("variant", VARIANTS, ids=IDS)
@pytest.mark.parametrize("strength", [1.0, 0.95, 0.6])
@pytest.mark.parametrize("prediction", [None, "v_prediction"])
def test_sampler_equals_the_diffusers_scheduler_in_float32(base_config, variant, strength, prediction) -> None:
    config = dict(base_config, **({"prediction_type": prediction} if prediction else {}))
    timesteps = timesteps_for(variant, strength, config)
    sampler = build_sampler(make_scheduler(variant, config), timesteps, torch.float32, _eta(variant))
    ours, our_ts = _ours(sampler, strength, torch.float32)
    theirs, their_ts = _reference(variant, config, timesteps, strength, torch.float32, _eta(variant))
    assert our_ts == their_ts  # the UNet sees the same timesteps (as float32 for every scheduler)
    assert torch.equal(ours, theirs), (ours - theirs).abs().max()


@pytest.mark.parametrize("variant", VARIANTS, ids=IDS)
def test_sampler_in_bfloat16_is_as_close_to_float32_as_the_diffusers_scheduler(base_config, variant) -> None:
    """In bf16 both differ from the float32 result by rounding; the sampler's rounding is no worse."""
    timesteps = timesteps_for(variant, 0.95, base_config)
    eta = _eta(variant)
    truth, _ = _reference(variant, base_config, timesteps, 0.95, torch.float32, eta)
    sampler = build_sampler(make_scheduler(variant, base_config), timesteps, torch.bfloat16, eta)
    ours, _ = _ours(sampler, 0.95, torch.bfloat16)
    theirs, _ = _reference(variant, base_config, timesteps, 0.95, torch.bfloat16, eta)
    assert ours.dtype == theirs.dtype == torch.bfloat16

    def error(x: torch.Tensor) -> float:
        return float((x.float() - truth).norm() / truth.norm())

    name = f"{variant.app_name}:{variant.steps}"
    print(f"{name} bf16 error vs fp32: sampler {error(ours):.2e}, diffusers {error(theirs):.2e}")
    assert error(ours) < 1e-2
    assert error(ours) <= 1.25 * error(theirs) + 1e-3


def test_the_unified_lora_runs_stochastic_tcd_and_the_one_step_hyper_runs_lcm(base_config) -> None:
    """The kinds the configs reach: TCD with eta 1 draws fresh noise (so the generators matter), LCM at t=800."""
    unified = next(v for v in VARIANTS if v.schedule == "tcd" and v.steps == 4)
    sampler = build_sampler(
        make_scheduler(unified, base_config), timesteps_for(unified, 1.0, base_config), torch.float32, 1.0
    )
    assert isinstance(sampler, TcdSampler) and sampler.eta == 1.0
    image, noise, _ = _inputs(torch.float32)
    a = sampler.step(image, noise, 0, _generators(1))
    b = sampler.step(image, noise, 0, _generators(2))
    assert not torch.equal(a, b)
    one = next(v for v in VARIANTS if v.app_name == "hyper-sdxl" and v.steps == 1)
    lcm = build_sampler(make_scheduler(one, base_config), timesteps_for(one, 1.0, base_config), torch.float32)
    assert isinstance(lcm, LcmSampler) and lcm.timesteps == (800.0,)


def test_unsupported_scheduler_options_are_refused_at_build_time(base_config) -> None:
    variant = next(v for v in VARIANTS if v.scheduler_class == "EulerDiscreteScheduler" and v.steps == 4)
    with pytest.raises(ConfigError, match="prediction_type"):
        build_sampler(make_scheduler(variant, {**base_config, "prediction_type": "flow"}), [999], torch.float32)
    tcd = next(v for v in VARIANTS if v.scheduler_class == "TCDScheduler")
    with pytest.raises(ConfigError, match="eta"):
        build_sampler(make_scheduler(tcd, base_config), [999, 499], torch.float32, eta=1.5)


def test_the_engine_builds_each_schedule_once(engine) -> None:
    """Requests with the same variant and timesteps share one (immutable) sampler; another strength gets its own."""
    from pipelines.types import InpaintRequest
    from tests.helpers import box_mask, noise_image

    def prepared(strength: float):
        request = InpaintRequest(
            app_id="fal-ai/fast-lightning-sdxl/inpainting",
            image=noise_image(),
            mask=box_mask(),
            prompt="x",
            steps=4,
            strength=strength,
            image_size=(64, 48),
        )
        return engine.prepare(request)

    a, b, c = prepared(0.9), prepared(0.9), prepared(0.7)
    assert a.sampler is b.sampler and a.sampler is not c.sampler
    assert c.sampler.timesteps == tuple(float(t) for t in c.timesteps)


@pytest.mark.parametrize("variant", VARIANTS, ids=IDS)
@pytest.mark.parametrize("prediction", [None, "v_prediction"])
def test_denoised_is_the_clean_image_the_step_predicts(base_config, variant, prediction) -> None:
    """What a step preview shows: diffusers' own x0 of the step (Euler's ``pred_original_sample``, LCM's
    ``denoised``); for TCD, the x0 that its epsilon turns back into the step's input."""
    config = dict(base_config, **({"prediction_type": prediction} if prediction else {}))
    timesteps = timesteps_for(variant, 1.0, config)
    sampler = build_sampler(make_scheduler(variant, config), timesteps, torch.float32, _eta(variant))
    scheduler = make_scheduler(variant, config)
    scheduler.set_timesteps(timesteps=timesteps, device="cpu")
    if hasattr(scheduler, "set_begin_index"):
        scheduler.set_begin_index(0)
    image, noise, _ = _inputs(torch.float32)
    latents = sampler.start(image, noise, True)
    out = _fake_unet(sampler.model_input(latents, 0), sampler.timesteps[0], 0)
    ours = sampler.denoised(out, latents, 0)
    t = scheduler.timesteps[0]
    if isinstance(sampler, TcdSampler):
        c = sampler.coefficients[0]
        eps = out if sampler.prediction_type == "epsilon" else c.pow_a_t * out + c.pow_b_t * latents
        torch.testing.assert_close(c.sqrt_a_t * ours + c.sqrt_b_t * eps, latents, rtol=1e-4, atol=1e-4)
        return
    step = scheduler.step(out, t, latents, generator=_generators(50), return_dict=True)
    theirs = step.denoised if isinstance(sampler, LcmSampler) else step.pred_original_sample
    torch.testing.assert_close(ours, theirs.to(torch.float32), rtol=1e-5, atol=1e-5)
