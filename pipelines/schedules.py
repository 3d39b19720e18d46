"""Strength-aware timestep schedules (model-recipes.md §3.3) and scheduler construction.

The stock img2img/inpaint pipelines cut ``int(N * strength)`` steps off a native schedule, which
for few-step models means fewer UNet evaluations than asked (or none: 1 step at strength 0.95
raises). Here every request runs exactly N evaluations spread over the strength-scaled part of the
trajectory; at strength 1.0 the schedules equal the native ones.
"""

from __future__ import annotations

import inspect
import logging
from typing import Any

import numpy as np
from diffusers import EulerDiscreteScheduler, LCMScheduler, TCDScheduler

from .errors import InputError
from .specs import VariantSpec

NUM_TRAIN_TIMESTEPS = 1000
# Strength-scaled schedules start off the native grid on purpose; the schedulers warn about that.
for _name in ("scheduling_euler_discrete", "scheduling_lcm", "scheduling_tcd"):
    logging.getLogger(f"diffusers.schedulers.{_name}").setLevel(logging.ERROR)

SCHEDULERS = {
    "EulerDiscreteScheduler": EulerDiscreteScheduler,
    "LCMScheduler": LCMScheduler,
    "TCDScheduler": TCDScheduler,
}


def trailing_timesteps(steps: int, strength: float, train_steps: int = NUM_TRAIN_TIMESTEPS) -> list[int]:
    """``t_i = round(s*T - i*s*T/N) - 1``: diffusers' "trailing" spacing over the first ``s*T`` timesteps."""
    span = strength * train_steps
    return [int(t) for t in np.round(span - np.arange(steps) * span / steps).astype(np.int64) - 1]


def tcd_timesteps(steps: int, strength: float, base_config: dict[str, Any]) -> list[int]:
    """TCD's own strength rule (what ``LatentConsistencyModelImg2ImgPipeline`` uses)."""
    scheduler = TCDScheduler.from_config(_known(TCDScheduler, base_config))
    scheduler.set_timesteps(steps, strength=strength)
    return [int(t) for t in scheduler.timesteps]


def fixed_timesteps(fixed: tuple[int, ...], strength: float, train_steps: int = NUM_TRAIN_TIMESTEPS) -> list[int]:
    """A fixed schedule (Hyper-SDXL 1-step: t=800), capped at the strength: ``min(t, round(s*T) - 1)``."""
    cap = round(strength * train_steps) - 1
    return [min(t, cap) for t in fixed]


def min_strength(steps: int, train_steps: int = NUM_TRAIN_TIMESTEPS) -> float:
    """The lowest strength that still gives ``steps`` distinct timesteps."""
    return steps / train_steps


def timesteps_for(variant: VariantSpec, strength: float, base_config: dict[str, Any]) -> list[int]:
    """The exact timesteps one request runs; raises :class:`InputError` on a strength out of range."""
    if not (0.0 < strength <= 1.0):
        raise InputError("strength", f"must be in (0, 1], got {strength}")
    n = variant.steps
    if strength * NUM_TRAIN_TIMESTEPS < n:
        raise InputError("strength", f"{strength} is too low for {n} steps (at least {min_strength(n):g} is needed)")
    if variant.schedule == "trailing":
        ts = trailing_timesteps(n, strength)
    elif variant.schedule == "tcd":
        # TCD picks from its 50-step skipping schedule, which needs strength * 50 >= N.
        original = int(base_config.get("original_inference_steps", 50))
        if strength * original < n:
            raise InputError("strength", f"{strength} is too low for {n} steps (at least {n / original:g} is needed)")
        ts = tcd_timesteps(n, strength, base_config)
    else:
        ts = fixed_timesteps(variant.fixed_timesteps, strength)
    if len(ts) != n or len(set(ts)) != n or min(ts) < 0 or ts != sorted(ts, reverse=True):
        raise InputError("strength", f"{strength} gives no valid {n}-step schedule ({ts})")
    return ts


def _known(cls: type, config: dict[str, Any]) -> dict[str, Any]:
    """The base scheduler config minus keys this scheduler class does not take (it would warn)."""
    params = inspect.signature(cls.__init__).parameters
    return {k: v for k, v in config.items() if k in params or k.startswith("_")}


def make_scheduler(variant: VariantSpec, base_config: dict[str, Any]):
    """A fresh scheduler for one batch (schedulers are stateful, so never shared between batches)."""
    cls = SCHEDULERS[variant.scheduler_class]
    return cls.from_config(_known(cls, base_config), **dict(variant.scheduler_options))
