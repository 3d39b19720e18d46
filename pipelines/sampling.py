"""Few-step sampling math with every per-step number computed on the host before the loop starts.

diffusers' schedulers keep their state in tensors and read it back inside the loop: Euler's
``add_noise`` copies ``sigmas`` host-to-device and indexes them with a Python list, its ``step``
compares a 0-d tensor with Python floats; TCD and LCM index ``alphas_cumprod`` with 0-d device
tensors and branch on ``prev_timestep >= 0``. Each of those is a host sync that stalls the GPU
between two UNet calls (about 16 per 4-step TCD request).

A :class:`Sampler` is built once per batch on the host (in ``Engine.prepare``, off the GPU thread)
from the very diffusers scheduler the variant names, so its numbers are that scheduler's numbers
(float32, and rounded to the latents' dtype where diffusers rounds them). The loop then only
multiplies tensors by Python floats, in the same order of operations as diffusers' ``step`` and
``add_noise``, so in float32 the results are the scheduler's results to the bit
(``tests/pipelines/test_sampling.py``).

The loop, for ``n`` steps (``pipelines/inpaint.py``)::

    latents = sampler.start(image_latents, noise, full_strength)
    for i in range(n):
        out = unet(sampler.model_input(latents, i), sampler.timesteps[i], ...)
        latents = sampler.step(out, latents, i, generators)
        clean = sampler.renoise(image_latents, noise, i)   # the input at step i + 1's noise level
        latents = keep * clean + mask * latents
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
from diffusers import EulerDiscreteScheduler, LCMScheduler, TCDScheduler
from diffusers.utils.torch_utils import randn_tensor

from .errors import ConfigError

PREDICTION_TYPES = ("epsilon", "sample", "v_prediction")


def _f(value: torch.Tensor | float) -> float:
    """A host tensor's value as a Python float (exact: float32 and bf16 values are doubles too)."""
    return float(value.item()) if isinstance(value, torch.Tensor) else float(value)


@dataclass(frozen=True)
class Sampler:
    """The schedule of one batch: what the UNet is given at each step, and how latents move."""

    timesteps: tuple[float, ...]  # the UNet's timestep input at each step (one dtype for every variant)
    prediction_type: str

    @property
    def steps(self) -> int:
        return len(self.timesteps)

    def start(self, image_latents: torch.Tensor, noise: torch.Tensor, full_strength: bool) -> torch.Tensor:
        """The first step's latents: pure noise at strength 1.0, else the input noised to the first timestep."""
        raise NotImplementedError

    def model_input(self, latents: torch.Tensor, i: int) -> torch.Tensor:
        """What the UNet sees at step ``i`` (diffusers' ``scale_model_input``)."""
        return latents

    def step(
        self, model_output: torch.Tensor, latents: torch.Tensor, i: int, generators: list[torch.Generator]
    ) -> torch.Tensor:
        """The latents after step ``i`` (diffusers' ``step(...).prev_sample``)."""
        raise NotImplementedError

    def renoise(self, image_latents: torch.Tensor, noise: torch.Tensor, i: int) -> torch.Tensor:
        """The input's latents at the noise level the latents have after step ``i`` (clean after the last)."""
        raise NotImplementedError

    def denoised(self, model_output: torch.Tensor, latents: torch.Tensor, i: int) -> torch.Tensor:
        """The clean latents step ``i`` predicts (x0; what a step preview shows): the same arithmetic as
        :meth:`step` up to its prediction, without its noise."""
        raise NotImplementedError


@dataclass(frozen=True)
class EulerSampler(Sampler):
    """``EulerDiscreteScheduler.step`` with ``s_churn=0`` (what every caller here uses)."""

    init_sigma: float  # ``init_noise_sigma``
    noise_sigmas: tuple[float, ...]  # ``sigmas`` rounded to the latents' dtype, as ``add_noise`` uses them
    input_divisors: tuple[float, ...]  # ``(sigma**2 + 1) ** 0.5`` per step
    sigmas: tuple[float, ...]  # per step (sigma_hat: no churn)
    dts: tuple[float, ...]  # ``sigmas[i + 1] - sigma_hat`` per step, in float32
    v_scales: tuple[tuple[float, float], ...]  # v_prediction: ``-sigma / (sigma**2 + 1) ** 0.5`` and ``sigma**2 + 1``

    def start(self, image_latents: torch.Tensor, noise: torch.Tensor, full_strength: bool) -> torch.Tensor:
        if full_strength:
            return noise * self.init_sigma
        return image_latents + noise * self.noise_sigmas[0]

    def model_input(self, latents: torch.Tensor, i: int) -> torch.Tensor:
        return latents / self.input_divisors[i]

    def step(
        self, model_output: torch.Tensor, latents: torch.Tensor, i: int, generators: list[torch.Generator]
    ) -> torch.Tensor:
        sample = latents.to(torch.float32)
        sigma = self.sigmas[i]
        if self.prediction_type == "sample":
            pred_original = model_output
        elif self.prediction_type == "epsilon":
            pred_original = sample - sigma * model_output
        else:
            scale, divisor = self.v_scales[i]
            pred_original = model_output * scale + (sample / divisor)
        derivative = (sample - pred_original) / sigma
        return (sample + derivative * self.dts[i]).to(model_output.dtype)

    def denoised(self, model_output: torch.Tensor, latents: torch.Tensor, i: int) -> torch.Tensor:
        sample = latents.to(torch.float32)
        if self.prediction_type == "sample":
            return model_output
        if self.prediction_type == "epsilon":
            return sample - self.sigmas[i] * model_output
        scale, divisor = self.v_scales[i]
        return model_output * scale + (sample / divisor)

    def renoise(self, image_latents: torch.Tensor, noise: torch.Tensor, i: int) -> torch.Tensor:
        if i == self.steps - 1:
            return image_latents
        return image_latents + noise * self.noise_sigmas[i + 1]


def _ddpm_noised(scales: tuple[float, float], image_latents: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """TCD's and LCM's ``add_noise``: ``sqrt(a_t) * x + sqrt(1 - a_t) * noise``."""
    signal, spread = scales
    return signal * image_latents + spread * noise


class TcdStep(NamedTuple):
    """One TCD step's numbers (t: this timestep, s: where the step lands, prev: the next timestep)."""

    sqrt_a_t: float  # alpha_prod_t.sqrt()
    sqrt_b_t: float  # beta_prod_t.sqrt()
    pow_a_t: float  # alpha_prod_t ** 0.5 (diffusers writes both; float32 rounds them apart)
    pow_b_t: float
    sqrt_a_s: float
    sqrt_b_s: float
    keep: float  # (alpha_prod_t_prev / alpha_prod_s).sqrt()
    fresh: float  # (1 - alpha_prod_t_prev / alpha_prod_s).sqrt()


@dataclass(frozen=True)
class _DdpmSampler(Sampler):
    """TCD and LCM: no input scaling, ``init_noise_sigma`` 1, and DDPM's ``add_noise``."""

    noise_scales: tuple[tuple[float, float], ...]  # per timestep: (sqrt(a_t), sqrt(1 - a_t)) in the latents' dtype

    def start(self, image_latents: torch.Tensor, noise: torch.Tensor, full_strength: bool) -> torch.Tensor:
        return noise * 1.0 if full_strength else _ddpm_noised(self.noise_scales[0], image_latents, noise)

    def renoise(self, image_latents: torch.Tensor, noise: torch.Tensor, i: int) -> torch.Tensor:
        if i == self.steps - 1:
            return image_latents
        return _ddpm_noised(self.noise_scales[i + 1], image_latents, noise)


@dataclass(frozen=True)
class TcdSampler(_DdpmSampler):
    """``TCDScheduler.step`` (``eta`` is its gamma: 0 is deterministic, DDIM-like; 1 is fully stochastic)."""

    eta: float
    coefficients: tuple[TcdStep, ...]

    def step(
        self, model_output: torch.Tensor, latents: torch.Tensor, i: int, generators: list[torch.Generator]
    ) -> torch.Tensor:
        c = self.coefficients[i]
        if self.prediction_type == "epsilon":
            pred_original, pred_epsilon = (latents - c.sqrt_b_t * model_output) / c.sqrt_a_t, model_output
        elif self.prediction_type == "sample":
            pred_original = model_output
            pred_epsilon = (latents - c.pow_a_t * pred_original) / c.pow_b_t
        else:
            pred_original = c.pow_a_t * latents - c.pow_b_t * model_output
            pred_epsilon = c.pow_a_t * model_output + c.pow_b_t * latents
        noised = c.sqrt_a_s * pred_original + c.sqrt_b_s * pred_epsilon
        if self.eta > 0 and i != self.steps - 1:
            fresh = randn_tensor(
                model_output.shape, generator=generators, device=model_output.device, dtype=noised.dtype
            )
            return c.keep * noised + c.fresh * fresh
        return noised

    def denoised(self, model_output: torch.Tensor, latents: torch.Tensor, i: int) -> torch.Tensor:
        c = self.coefficients[i]
        if self.prediction_type == "epsilon":
            return (latents - c.sqrt_b_t * model_output) / c.sqrt_a_t
        if self.prediction_type == "sample":
            return model_output
        return c.pow_a_t * latents - c.pow_b_t * model_output


class LcmStep(NamedTuple):
    sqrt_a_t: float
    sqrt_b_t: float
    c_out: float
    c_skip: float
    sqrt_a_prev: float
    sqrt_b_prev: float


@dataclass(frozen=True)
class LcmSampler(_DdpmSampler):
    """``LCMScheduler.step``: the consistency boundary condition (Hyper-SDXL 1-step runs it at t=800)."""

    coefficients: tuple[LcmStep, ...]
    clip_range: float | None  # clip_sample's range, or None

    def step(
        self, model_output: torch.Tensor, latents: torch.Tensor, i: int, generators: list[torch.Generator]
    ) -> torch.Tensor:
        c = self.coefficients[i]
        denoised = self.denoised(model_output, latents, i)
        if i == self.steps - 1:
            return denoised
        fresh = randn_tensor(model_output.shape, generator=generators, device=model_output.device, dtype=denoised.dtype)
        return c.sqrt_a_prev * denoised + c.sqrt_b_prev * fresh

    def denoised(self, model_output: torch.Tensor, latents: torch.Tensor, i: int) -> torch.Tensor:
        c = self.coefficients[i]
        if self.prediction_type == "epsilon":
            pred_original = (latents - c.sqrt_b_t * model_output) / c.sqrt_a_t
        elif self.prediction_type == "sample":
            pred_original = model_output
        else:
            pred_original = c.sqrt_a_t * latents - c.sqrt_b_t * model_output
        if self.clip_range is not None:
            pred_original = pred_original.clamp(-self.clip_range, self.clip_range)
        return c.c_out * pred_original + c.c_skip * latents


# ---------------------------------------------------------------------------------------------- building


def build_sampler(scheduler: Any, timesteps: list[int], dtype: torch.dtype, eta: float | None = None) -> Sampler:
    """The sampler for ``timesteps`` of a fresh diffusers ``scheduler`` (Euler, TCD or LCM), latents in ``dtype``.

    Runs on the host only (the scheduler is set up on the CPU); raises :class:`ConfigError` for a
    scheduler option the engine does not implement.
    """
    prediction_type = scheduler.config.prediction_type
    if prediction_type == "original_sample":
        prediction_type = "sample"
    if prediction_type not in PREDICTION_TYPES:
        raise ConfigError(f"prediction_type {prediction_type!r} is not supported (one of {PREDICTION_TYPES})")
    scheduler.set_timesteps(timesteps=list(timesteps), device="cpu")
    if isinstance(scheduler, EulerDiscreteScheduler):
        return _euler(scheduler, prediction_type, dtype)
    if isinstance(scheduler, TCDScheduler):
        if eta is None:  # what TCDScheduler.step defaults to
            eta = float(inspect.signature(TCDScheduler.step).parameters["eta"].default)
        if not 0.0 <= eta <= 1.0:
            raise ConfigError(f"TCD eta must be in [0, 1], got {eta}")
        return _tcd(scheduler, prediction_type, dtype, eta)
    if isinstance(scheduler, LCMScheduler):
        if scheduler.config.thresholding:
            raise ConfigError("LCMScheduler with thresholding=True is not supported")
        return _lcm(scheduler, prediction_type, dtype)
    raise ConfigError(f"no sampler for {type(scheduler).__name__}")


def _euler(scheduler: EulerDiscreteScheduler, prediction_type: str, dtype: torch.dtype) -> EulerSampler:
    sigmas = scheduler.sigmas.to(torch.float32)  # host tensor, n + 1 values (the last is the final sigma)
    n = len(scheduler.timesteps)
    return EulerSampler(
        timesteps=tuple(_f(t) for t in scheduler.timesteps.to(torch.float32)),
        prediction_type=prediction_type,
        init_sigma=_f(scheduler.init_noise_sigma),
        noise_sigmas=tuple(_f(s) for s in sigmas.to(dtype)),
        input_divisors=tuple(_f((sigmas[i] ** 2 + 1) ** 0.5) for i in range(n)),
        sigmas=tuple(_f(sigmas[i]) for i in range(n)),
        dts=tuple(_f(sigmas[i + 1] - sigmas[i]) for i in range(n)),
        v_scales=tuple((_f(-sigmas[i] / (sigmas[i] ** 2 + 1) ** 0.5), _f(sigmas[i] ** 2 + 1)) for i in range(n)),
    )


def _ddpm_noise_scales(scheduler: Any, dtype: torch.dtype) -> tuple[tuple[float, float], ...]:
    alphas = scheduler.alphas_cumprod.to(dtype)  # add_noise casts the table to the latents' dtype first
    return tuple((_f(alphas[t] ** 0.5), _f((1 - alphas[t]) ** 0.5)) for t in scheduler.timesteps)


def _alpha(scheduler: Any, t: torch.Tensor) -> torch.Tensor:
    return scheduler.alphas_cumprod[t] if t >= 0 else scheduler.final_alpha_cumprod


def _tcd(scheduler: TCDScheduler, prediction_type: str, dtype: torch.dtype, eta: float) -> TcdSampler:
    ts = scheduler.timesteps
    coefficients = []
    for i, t in enumerate(ts):
        prev = ts[i + 1] if i + 1 < len(ts) else torch.tensor(0)
        s = torch.floor((1 - eta) * prev).to(dtype=torch.long)
        a_t, a_prev, a_s = scheduler.alphas_cumprod[t], _alpha(scheduler, prev), scheduler.alphas_cumprod[s]
        b_t, b_s = 1 - a_t, 1 - a_s
        ratio = a_prev / a_s
        values = (a_t.sqrt(), b_t.sqrt(), a_t**0.5, b_t**0.5, a_s.sqrt(), b_s.sqrt(), ratio.sqrt(), (1 - ratio).sqrt())
        coefficients.append(TcdStep(*(_f(v) for v in values)))
    return TcdSampler(
        timesteps=tuple(float(t) for t in ts.tolist()),
        prediction_type=prediction_type,
        noise_scales=_ddpm_noise_scales(scheduler, dtype),
        eta=float(eta),
        coefficients=tuple(coefficients),
    )


def _lcm(scheduler: LCMScheduler, prediction_type: str, dtype: torch.dtype) -> LcmSampler:
    ts = scheduler.timesteps
    coefficients = []
    for i, t in enumerate(ts):
        prev = ts[i + 1] if i + 1 < len(ts) else t
        a_t, a_prev = scheduler.alphas_cumprod[t], _alpha(scheduler, prev)
        b_t, b_prev = 1 - a_t, 1 - a_prev
        c_skip, c_out = scheduler.get_scalings_for_boundary_condition_discrete(t)
        values = (a_t.sqrt(), b_t.sqrt(), c_out, c_skip, a_prev.sqrt(), b_prev.sqrt())
        coefficients.append(LcmStep(*(_f(v) for v in values)))
    clip = float(scheduler.config.clip_sample_range) if scheduler.config.clip_sample else None
    return LcmSampler(
        timesteps=tuple(float(t) for t in ts.tolist()),
        prediction_type=prediction_type,
        noise_scales=_ddpm_noise_scales(scheduler, dtype),
        coefficients=tuple(coefficients),
        clip_range=clip,
    )
