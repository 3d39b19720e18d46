"""pipelines.schedules: strength-aware timesteps (model-recipes.md §3.3) and scheduler construction."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from diffusers import EulerDiscreteScheduler, LCMScheduler, TCDScheduler
from hypothesis import given, settings
from hypothesis import strategies as st

from pipelines import schedules
from pipelines.errors import InputError
from pipelines.specs import default_config_dir, load_serving_spec

# The SDXL base scheduler config (the parts that matter), plus keys TCD/LCM do not take.
SDXL_SCHEDULER_CONFIG = {
    "_class_name": "EulerDiscreteScheduler",
    "num_train_timesteps": 1000,
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "steps_offset": 1,
    "prediction_type": "epsilon",
    "interpolation_type": "linear",
    "use_karras_sigmas": False,
    "timestep_spacing": "leading",
    "clip_sample": False,
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "sample_max_value": 1.0,
}

SHIPPED = load_serving_spec()
SHIPPED_VARIANTS = [v for app in SHIPPED.apps.values() for v in app.variants.values()]


def _unified_variants():
    """The hyper app with unified_lora = true (parsed from a temporary copy of the shipped configs)."""
    import tempfile

    src = default_config_dir()
    with tempfile.TemporaryDirectory() as tmp:
        for path in src.glob("*.toml"):
            shutil.copy(path, tmp)
        hyper = Path(tmp) / "hyper-sdxl-inpainting.toml"
        text = hyper.read_text()
        assert "unified_lora = false" in text
        hyper.write_text(text.replace("unified_lora = false", "unified_lora = true"))
        spec = load_serving_spec(tmp)
    return list(spec.app("hyper-sdxl").variants.values())


UNIFIED_VARIANTS = _unified_variants()


# ---------------------------------------------------------------------------------------------
# trailing


@pytest.mark.parametrize(
    ("steps", "expected"),
    [
        (1, [949]),
        (2, [949, 474]),
        (4, [949, 711, 474, 237]),
        (8, [949, 830, 711, 593, 474, 355, 237, 118]),
    ],
)
def test_trailing_at_095_matches_recipe(steps, expected):
    assert schedules.trailing_timesteps(steps, 0.95) == expected


@pytest.mark.parametrize(
    ("steps", "expected"),
    [
        (1, [999]),
        (2, [999, 499]),
        (4, [999, 749, 499, 249]),
        (8, [999, 874, 749, 624, 499, 374, 249, 124]),
    ],
)
def test_trailing_at_1_is_native(steps, expected):
    assert schedules.trailing_timesteps(steps, 1.0) == expected


@pytest.mark.parametrize("steps", [1, 2, 3, 4, 5, 6, 8, 10, 12, 16])
def test_trailing_at_1_equals_diffusers_euler_trailing(steps):
    scheduler = EulerDiscreteScheduler.from_config(SDXL_SCHEDULER_CONFIG, timestep_spacing="trailing")
    scheduler.set_timesteps(steps)
    assert schedules.trailing_timesteps(steps, 1.0) == [int(t) for t in scheduler.timesteps]


def test_trailing_returns_python_ints():
    ts = schedules.trailing_timesteps(4, 0.7)
    assert all(type(t) is int for t in ts)


# ---------------------------------------------------------------------------------------------
# tcd / fixed


@pytest.mark.parametrize(
    ("steps", "expected"),
    [
        (1, [939]),
        (2, [939, 479]),
        (4, [939, 719, 479, 239]),
        (8, [939, 839, 719, 599, 479, 359, 239, 119]),
    ],
)
def test_tcd_at_095_matches_recipe(steps, expected):
    assert schedules.tcd_timesteps(steps, 0.95, SDXL_SCHEDULER_CONFIG) == expected


def test_tcd_at_095_matches_scheduler_directly():
    scheduler = TCDScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", steps_offset=1)
    scheduler.set_timesteps(4, strength=0.95)
    assert schedules.tcd_timesteps(4, 0.95, SDXL_SCHEDULER_CONFIG) == [int(t) for t in scheduler.timesteps]


@pytest.mark.parametrize(
    ("strength", "expected"),
    [(1.0, [800]), (0.95, [800]), (0.802, [800]), (0.801, [800]), (0.8, [799]), (0.5, [499]), (0.001, [0])],
)
def test_fixed_timesteps(strength, expected):
    assert schedules.fixed_timesteps((800,), strength) == expected


def test_min_strength():
    assert schedules.min_strength(1) == pytest.approx(0.001)
    assert schedules.min_strength(8) == pytest.approx(0.008)


# ---------------------------------------------------------------------------------------------
# timesteps_for


@pytest.mark.parametrize("strength", [0.0, -1.0, 1.5, 1.0000001, float("nan"), float("inf")])
@pytest.mark.parametrize("variant", SHIPPED_VARIANTS, ids=lambda v: v.override_key)
def test_timesteps_for_rejects_out_of_range(variant, strength):
    with pytest.raises(InputError) as info:
        schedules.timesteps_for(variant, strength, SDXL_SCHEDULER_CONFIG)
    assert info.value.field == "strength"


@pytest.mark.parametrize("variant", SHIPPED_VARIANTS + UNIFIED_VARIANTS, ids=lambda v: f"{v.override_key}-{v.schedule}")
def test_timesteps_for_rejects_strength_below_steps_over_1000(variant):
    n = variant.steps
    strength = (n - 0.5) / 1000
    with pytest.raises(InputError) as info:
        schedules.timesteps_for(variant, strength, SDXL_SCHEDULER_CONFIG)
    assert info.value.field == "strength"


def test_timesteps_for_shipped_variants_at_095():
    got = {v.override_key: schedules.timesteps_for(v, 0.95, SDXL_SCHEDULER_CONFIG) for v in SHIPPED_VARIANTS}
    assert got == {
        "fast-lightning-sdxl:1": [949],
        "fast-lightning-sdxl:2": [949, 474],
        "fast-lightning-sdxl:4": [949, 711, 474, 237],
        "fast-lightning-sdxl:8": [949, 830, 711, 593, 474, 355, 237, 118],
        "hyper-sdxl:1": [800],
        "hyper-sdxl:2": [949, 474],
        "hyper-sdxl:4": [949, 711, 474, 237],
    }


def test_timesteps_for_unified_variants_at_095():
    got = {v.steps: schedules.timesteps_for(v, 0.95, SDXL_SCHEDULER_CONFIG) for v in UNIFIED_VARIANTS}
    assert got == {1: [939], 2: [939, 479], 4: [939, 719, 479, 239]}


def _check_schedule(ts: list[int], n: int, strength: float) -> None:
    assert len(ts) == n
    assert len(set(ts)) == n
    assert ts == sorted(ts, reverse=True)
    assert all(type(t) is int for t in ts)
    assert min(ts) >= 0
    assert max(ts) <= 999
    # never noisier than the strength asks for
    assert ts[0] <= round(strength * 1000) - 1


@settings(max_examples=300, deadline=None)
@given(st.sampled_from(SHIPPED_VARIANTS), st.floats(min_value=0.0, max_value=1.0, allow_nan=False))
def test_timesteps_for_every_shipped_variant_property(variant, strength):
    n = variant.steps
    if strength == 0.0 or strength * 1000 < n:
        with pytest.raises(InputError) as info:
            schedules.timesteps_for(variant, strength, SDXL_SCHEDULER_CONFIG)
        assert info.value.field == "strength"
        return
    _check_schedule(schedules.timesteps_for(variant, strength, SDXL_SCHEDULER_CONFIG), n, strength)


@settings(max_examples=150, deadline=None)
@given(st.sampled_from(UNIFIED_VARIANTS), st.floats(min_value=0.0, max_value=1.0, allow_nan=False))
def test_timesteps_for_unified_variants_property(variant, strength):
    # TCD's own rule needs original_inference_steps (50) * strength >= N.
    n = variant.steps
    if strength * 50 < n:
        return
    _check_schedule(schedules.timesteps_for(variant, strength, SDXL_SCHEDULER_CONFIG), n, strength)


@pytest.mark.parametrize("steps", [1, 2, 4])
def test_timesteps_for_unified_low_strength_raises_input_error(steps):
    variant = next(v for v in UNIFIED_VARIANTS if v.steps == steps)
    strength = steps / 100  # >= N/1000 but < N/50
    with pytest.raises(InputError) as info:
        schedules.timesteps_for(variant, strength, SDXL_SCHEDULER_CONFIG)
    assert info.value.field == "strength"


# ---------------------------------------------------------------------------------------------
# make_scheduler


def test_make_scheduler_for_every_shipped_variant():
    for variant in SHIPPED_VARIANTS + UNIFIED_VARIANTS:
        scheduler = schedules.make_scheduler(variant, SDXL_SCHEDULER_CONFIG)
        assert type(scheduler).__name__ == variant.scheduler_class
        for key, value in variant.scheduler_options:
            assert scheduler.config[key] == value
        assert scheduler.config.beta_schedule == "scaled_linear"
        assert scheduler.config.beta_end == pytest.approx(0.012)


def test_make_scheduler_lightning_1step_predicts_sample():
    variant = SHIPPED.app("fast-lightning-sdxl").variants[1]
    scheduler = schedules.make_scheduler(variant, SDXL_SCHEDULER_CONFIG)
    assert isinstance(scheduler, EulerDiscreteScheduler)
    assert scheduler.config.prediction_type == "sample"
    assert scheduler.config.timestep_spacing == "trailing"
    four = schedules.make_scheduler(SHIPPED.app("fast-lightning-sdxl").variants[4], SDXL_SCHEDULER_CONFIG)
    assert four.config.prediction_type == "epsilon"


def test_make_scheduler_returns_fresh_instances():
    variant = SHIPPED.app("hyper-sdxl").variants[1]
    a = schedules.make_scheduler(variant, SDXL_SCHEDULER_CONFIG)
    b = schedules.make_scheduler(variant, SDXL_SCHEDULER_CONFIG)
    assert isinstance(a, LCMScheduler)
    assert a is not b


def test_known_drops_keys_the_class_does_not_take():
    known = schedules._known(TCDScheduler, SDXL_SCHEDULER_CONFIG)
    assert "interpolation_type" not in known and "use_karras_sigmas" not in known
    assert known["beta_start"] == 0.00085
    assert known["_class_name"] == "EulerDiscreteScheduler"
