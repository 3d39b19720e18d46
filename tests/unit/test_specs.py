"""pipelines.specs: the shipped app configs, unified_lora, overrides and config errors."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import pytest

from pipelines.errors import ConfigError
from pipelines.specs import (
    ENGINE_FILE,
    apply_overrides,
    default_config_dir,
    load_serving_spec,
    override_keys,
    parse_app,
)

CONFIG_DIR = default_config_dir()
HYPER_FILE = "hyper-sdxl-inpainting.toml"
LIGHTNING_FILE = "fast-lightning-sdxl-inpainting.toml"
HYPER_ID = "fal-ai/hyper-sdxl/inpainting"
LIGHTNING_ID = "fal-ai/fast-lightning-sdxl/inpainting"
HEX40 = re.compile(r"[0-9a-f]{40}")


def copy_configs(tmp_path: Path, *names: str) -> Path:
    for name in names:
        shutil.copy(CONFIG_DIR / name, tmp_path / name)
    return tmp_path


def edit(path: Path, old: str, new: str) -> None:
    text = path.read_text()
    assert old in text, f"{old!r} not in {path}"
    path.write_text(text.replace(old, new))


@pytest.fixture(scope="module")
def spec():
    return load_serving_spec()


def test_config_dir_has_the_shipped_files():
    names = {p.name for p in CONFIG_DIR.glob("*.toml")}
    assert {ENGINE_FILE, HYPER_FILE, LIGHTNING_FILE} <= names


def test_shipped_configs_parse(spec):
    assert set(spec.apps) == {HYPER_ID, LIGHTNING_ID}
    assert spec.overrides == {}
    assert spec.engine.work_pixels == 1024 * 1024
    assert spec.engine.safety_checker.repo == "CompVis/stable-diffusion-safety-checker"
    assert spec.engine.prompt_expansion.max_new_tokens == 48
    assert spec.engine.prompt_expansion.top_k == 50


def test_hyper_app(spec):
    app = spec.apps[HYPER_ID]
    assert app.name == "hyper-sdxl"
    assert app.steps == (1, 2, 4)
    assert app.default_steps == 1
    assert app.default_strength == pytest.approx(0.95)
    assert app.unified_lora is False

    one = app.variants[1]
    assert one.checkpoint.file == "Hyper-SDXL-1step-Unet.safetensors"
    assert one.checkpoint.kind == "unet"
    assert one.scheduler_class == "LCMScheduler"
    assert one.schedule == "fixed"
    assert one.fixed_timesteps == (800,)

    for n, file in ((2, "Hyper-SDXL-2steps-lora.safetensors"), (4, "Hyper-SDXL-4steps-lora.safetensors")):
        v = app.variants[n]
        assert v.steps == n
        assert v.checkpoint.file == file
        assert v.checkpoint.kind == "lora"
        assert v.checkpoint.lora_scale == pytest.approx(1.0)
        assert v.scheduler_class == "TCDScheduler"
        assert dict(v.scheduler_options) == {"timestep_spacing": "trailing"}
        assert v.schedule == "trailing"
        assert v.eta == 0.0

    for v in app.variants.values():
        assert v.checkpoint.repo == "ByteDance/Hyper-SD"
        assert v.base.repo == "stabilityai/stable-diffusion-xl-base-1.0"
        assert v.base.variant == "fp16"
        assert v.vae.repo == "madebyollin/sdxl-vae-fp16-fix"
        assert v.app_id == HYPER_ID and v.app_name == "hyper-sdxl"


def test_lightning_app(spec):
    app = spec.apps[LIGHTNING_ID]
    assert app.name == "fast-lightning-sdxl"
    assert app.steps == (1, 2, 4, 8)
    assert app.default_steps == 4
    files = {n: v.checkpoint.file for n, v in app.variants.items()}
    assert files == {
        1: "sdxl_lightning_1step_unet_x0.safetensors",
        2: "sdxl_lightning_2step_unet.safetensors",
        4: "sdxl_lightning_4step_unet.safetensors",
        8: "sdxl_lightning_8step_unet.safetensors",
    }
    for n, v in app.variants.items():
        assert v.checkpoint.repo == "ByteDance/SDXL-Lightning"
        assert v.checkpoint.kind == "unet"
        assert v.scheduler_class == "EulerDiscreteScheduler"
        assert v.schedule == "trailing"
        options = dict(v.scheduler_options)
        assert options["timestep_spacing"] == "trailing"
        if n == 1:
            assert options["prediction_type"] == "sample"
        else:
            assert "prediction_type" not in options
        assert v.eta is None


def test_every_revision_is_a_full_commit_hash(spec):
    revisions = [spec.engine.safety_checker.revision, spec.engine.prompt_expansion.model.revision]
    for app in spec.apps.values():
        for v in app.variants.values():
            revisions += [v.base.revision, v.vae.revision, v.checkpoint.revision]
    assert len(revisions) == 2 + 3 * 7
    for revision in revisions:
        assert HEX40.fullmatch(revision), revision


def test_unified_revision_is_a_full_commit_hash(tmp_path):
    directory = copy_configs(tmp_path, ENGINE_FILE, HYPER_FILE)
    edit(directory / HYPER_FILE, "unified_lora = false", "unified_lora = true")
    spec = load_serving_spec(directory)
    for v in spec.app("hyper-sdxl").variants.values():
        assert HEX40.fullmatch(v.checkpoint.revision)


def test_unified_lora(tmp_path):
    directory = copy_configs(tmp_path, ENGINE_FILE, HYPER_FILE, LIGHTNING_FILE)
    edit(directory / HYPER_FILE, "unified_lora = false", "unified_lora = true")
    spec = load_serving_spec(directory)
    hyper = spec.app(HYPER_ID)
    assert hyper.unified_lora is True
    assert hyper.steps == (1, 2, 4)
    for n, v in hyper.variants.items():
        assert v.steps == n
        assert v.checkpoint.file == "Hyper-SDXL-1step-lora.safetensors"
        assert v.checkpoint.kind == "lora"
        assert v.scheduler_class == "TCDScheduler"
        assert v.schedule == "tcd"
        assert v.eta == 1.0
        assert v.fixed_timesteps == ()
    # every step count shares one checkpoint (one UNet in memory)
    assert len({v.checkpoint.key for v in hyper.variants.values()}) == 1
    # the other app is untouched
    assert spec.app(LIGHTNING_ID).variants == load_serving_spec().app(LIGHTNING_ID).variants


def test_app_by_id_and_short_name(spec):
    assert spec.app(HYPER_ID) is spec.apps[HYPER_ID]
    assert spec.app("hyper-sdxl") is spec.apps[HYPER_ID]
    assert spec.app("fast-lightning-sdxl") is spec.apps[LIGHTNING_ID]


@pytest.mark.parametrize("name", ["nope", "fal-ai/hyper-sdxl", "", "HYPER-SDXL"])
def test_app_unknown(spec, name):
    with pytest.raises(ConfigError) as info:
        spec.app(name)
    assert HYPER_ID in str(info.value) and LIGHTNING_ID in str(info.value)


def test_override_keys(spec):
    keys = override_keys(spec)
    assert {"base", "vae", "safety_checker", "prompt_expansion"} <= set(keys)
    assert {"hyper-sdxl:1", "hyper-sdxl:2", "hyper-sdxl:4"} <= set(keys)
    assert {f"fast-lightning-sdxl:{n}" for n in (1, 2, 4, 8)} <= set(keys)
    assert len(keys) == 4 + 7


def test_apply_overrides_sets_paths(spec, tmp_path):
    base, vae, ckpt = tmp_path / "base", tmp_path / "vae", tmp_path / "l4.safetensors"
    out = apply_overrides(spec, {"base": base, "vae": str(vae), "fast-lightning-sdxl:4": ckpt})
    for app in out.apps.values():
        for v in app.variants.values():
            assert v.base.path == base
            assert v.vae.path == vae
            # the Hub coordinates are kept next to the local path
            assert v.base.repo == "stabilityai/stable-diffusion-xl-base-1.0"
            if v.override_key == "fast-lightning-sdxl:4":
                assert v.checkpoint.path == ckpt
            else:
                assert v.checkpoint.path is None
    assert out.overrides == {"base": str(base), "vae": str(vae), "fast-lightning-sdxl:4": str(ckpt)}
    assert out.engine.safety_checker.path is None
    # the original spec is not modified
    assert all(v.base.path is None for a in spec.apps.values() for v in a.variants.values())
    assert spec.overrides == {}


def test_apply_overrides_engine_components(spec, tmp_path):
    out = apply_overrides(spec, {"safety_checker": tmp_path / "sc", "prompt_expansion": tmp_path / "pe"})
    assert out.engine.safety_checker.path == tmp_path / "sc"
    assert out.engine.prompt_expansion.model.path == tmp_path / "pe"
    assert out.engine.prompt_expansion.max_new_tokens == spec.engine.prompt_expansion.max_new_tokens
    assert all(v.base.path is None for a in out.apps.values() for v in a.variants.values())


def test_apply_overrides_expands_user(spec, monkeypatch, tmp_path):
    monkeypatch.setenv("HOME", str(tmp_path))
    out = apply_overrides(spec, {"hyper-sdxl:1": "~/h1.safetensors"})
    assert out.app("hyper-sdxl").variants[1].checkpoint.path == tmp_path / "h1.safetensors"


def test_apply_overrides_changes_variant_keys(spec, tmp_path):
    out = apply_overrides(spec, {"hyper-sdxl:2": tmp_path / "x.safetensors"})
    before = spec.app("hyper-sdxl").variants[2].checkpoint.key
    after = out.app("hyper-sdxl").variants[2].checkpoint.key
    assert before != after


def test_apply_overrides_empty_is_identity(spec):
    assert apply_overrides(spec, {}) is spec


def test_load_serving_spec_with_overrides(tmp_path):
    spec = load_serving_spec(CONFIG_DIR, {"base": tmp_path})
    assert spec.overrides == {"base": str(tmp_path)}
    assert spec.app("hyper-sdxl").variants[4].base.path == tmp_path


def test_unknown_override_key_lists_valid_keys(spec):
    with pytest.raises(ConfigError) as info:
        apply_overrides(spec, {"unet": "/x", "hyper-sdxl:8": "/y", "base": "/z"})
    message = str(info.value)
    assert "hyper-sdxl:8" in message and "unet" in message
    for key in override_keys(spec):
        assert key in message


def test_checkpoint_must_be_safetensors(tmp_path):
    directory = copy_configs(tmp_path, ENGINE_FILE, LIGHTNING_FILE)
    edit(directory / LIGHTNING_FILE, "sdxl_lightning_2step_unet.safetensors", "sdxl_lightning_2step_unet.ckpt")
    with pytest.raises(ConfigError, match=r"\.safetensors"):
        load_serving_spec(directory)


def test_missing_engine_toml(tmp_path):
    directory = copy_configs(tmp_path, HYPER_FILE, LIGHTNING_FILE)
    with pytest.raises(ConfigError, match=r"engine\.toml"):
        load_serving_spec(directory)


def test_missing_config_dir(tmp_path):
    with pytest.raises(ConfigError):
        load_serving_spec(tmp_path / "does-not-exist")


def test_no_app_configs(tmp_path):
    directory = copy_configs(tmp_path, ENGINE_FILE)
    with pytest.raises(ConfigError):
        load_serving_spec(directory)


def test_invalid_toml(tmp_path):
    directory = copy_configs(tmp_path, ENGINE_FILE, HYPER_FILE)
    (directory / HYPER_FILE).write_text("app_id = [unclosed\n")
    with pytest.raises(ConfigError, match=HYPER_FILE):
        load_serving_spec(directory)


def test_duplicate_app_id(tmp_path):
    directory = copy_configs(tmp_path, ENGINE_FILE, HYPER_FILE)
    shutil.copy(directory / HYPER_FILE, directory / "zz-copy.toml")
    with pytest.raises(ConfigError, match="twice"):
        load_serving_spec(directory)


def test_config_dir_from_environment(tmp_path, monkeypatch):
    directory = copy_configs(tmp_path, ENGINE_FILE, LIGHTNING_FILE)
    monkeypatch.setenv("INPAINT_CONFIG_DIR", str(directory))
    assert default_config_dir() == directory
    assert set(load_serving_spec().apps) == {LIGHTNING_ID}


def _minimal_app(**steps_table) -> dict:
    ckpt = {"repo": "r/c", "revision": "a" * 40, "file": "x.safetensors", "kind": "unet"}
    return {
        "app_id": "fal-ai/test",
        "name": "test",
        "base": {"repo": "r/base", "revision": "b" * 40},
        "vae": {"repo": "r/vae", "revision": "c" * 40},
        "steps": {k: {"checkpoint": dict(ckpt), **v} for k, v in steps_table.items()},
    }


def test_parse_app_minimal_defaults():
    app = parse_app(_minimal_app(**{"2": {"scheduler": {"class": "EulerDiscreteScheduler"}, "schedule": "trailing"}}))
    assert app.default_steps == 2
    assert app.default_strength == pytest.approx(0.95)
    assert app.variants[2].base.path is None


@pytest.mark.parametrize(
    ("table", "match"),
    [
        ({"scheduler": {"class": "DDIMScheduler"}, "schedule": "trailing"}, "scheduler class"),
        ({"scheduler": {"class": "EulerDiscreteScheduler"}, "schedule": "leading"}, "schedule"),
        ({"scheduler": {"class": "EulerDiscreteScheduler"}, "schedule": "tcd"}, "TCDScheduler"),
        ({"scheduler": {"class": "LCMScheduler"}, "schedule": "fixed", "timesteps": [800, 400]}, "fixed"),
        ({"schedule": "trailing"}, "scheduler"),
    ],
)
def test_parse_app_rejects_bad_variant(table, match):
    with pytest.raises(ConfigError, match=match):
        parse_app(_minimal_app(**{"1": table}))


def test_parse_app_rejects_bad_checkpoint_kind():
    doc = _minimal_app(**{"1": {"scheduler": {"class": "EulerDiscreteScheduler"}, "schedule": "trailing"}})
    doc["steps"]["1"]["checkpoint"]["kind"] = "full"
    with pytest.raises(ConfigError, match="kind"):
        parse_app(doc)


def test_parse_app_rejects_bad_default_steps():
    doc = _minimal_app(**{"1": {"scheduler": {"class": "EulerDiscreteScheduler"}, "schedule": "trailing"}})
    doc["default_steps"] = 4
    with pytest.raises(ConfigError, match="default_steps"):
        parse_app(doc)


def test_parse_app_rejects_non_integer_step_keys():
    doc = _minimal_app(**{"four": {"scheduler": {"class": "EulerDiscreteScheduler"}, "schedule": "trailing"}})
    with pytest.raises(ConfigError, match="integers"):
        parse_app(doc)
