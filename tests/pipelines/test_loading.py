"""Where weights come from: local-path overrides, an empty cache, missing files and HF_HUB_OFFLINE."""

from __future__ import annotations

import logging
import time
from pathlib import Path

import pytest
from huggingface_hub import constants as hf_constants

from pipelines import hub
from pipelines.engine import Engine
from pipelines.errors import ModelFileError
from pipelines.hub import Resolver, check_model_files, download_all, model_parts
from pipelines.specs import apply_overrides
from pipelines.types import InpaintRequest
from tests.helpers import box_mask, noise_image, png
from tests.live import free_port

BASE_REPO = "stabilityai/stable-diffusion-xl-base-1.0"
VAE_REPO = "madebyollin/sdxl-vae-fp16-fix"
LIGHTNING_REPO = "ByteDance/SDXL-Lightning"
SIZE = (64, 48)


def request(steps: int = 2) -> InpaintRequest:
    return InpaintRequest(
        app_id="fast-lightning-sdxl",
        image=png(noise_image(64, 48, seed=4)),
        mask=png(box_mask(64, 48)),
        prompt="a photo",
        steps=steps,
        seed=1,
        image_size=SIZE,
    )


def snapshot(tiny_cache: Path, repo: str) -> Path:
    (folder,) = (tiny_cache / f"models--{repo.replace('/', '--')}" / "snapshots").iterdir()
    return folder


def local_overrides(tiny_cache: Path) -> dict[str, Path]:
    return {
        "base": snapshot(tiny_cache, BASE_REPO),
        "vae": snapshot(tiny_cache, VAE_REPO),
        "fast-lightning-sdxl:2": snapshot(tiny_cache, LIGHTNING_REPO) / "sdxl_lightning_2step_unet.safetensors",
    }


def load(spec, resolver, variants=(("fast-lightning-sdxl", 2),)) -> Engine:
    return Engine.load(spec, resolver=resolver, variants=list(variants), safety_checker=False, prompt_expansion=False)


def test_local_overrides_load_with_an_empty_cache(spec, tiny_cache, tmp_path):
    empty = tmp_path / "empty-cache"
    empty.mkdir()
    resolver = Resolver(cache_dir=empty, local_files_only=True)
    engine = load(apply_overrides(spec, local_overrides(tiny_cache)), resolver)
    (result,) = engine.run([request()])
    assert result.error is None
    assert result.images[0].size == SIZE
    assert list(empty.iterdir()) == []  # nothing was fetched or written


def test_missing_files_name_the_repo_the_file_and_the_fetch_command(spec, tmp_path):
    resolver = Resolver(
        cache_dir=tmp_path, local_files_only=True, fetch_hint="inpaint-server download --app fast-lightning-sdxl"
    )
    with pytest.raises(ModelFileError) as info:
        load(spec, resolver)
    message = str(info.value)
    assert BASE_REPO in message
    assert any(name in message for name in ("vocab.json", "merges.txt", "tokenizer_config.json", "config.json"))
    assert "inpaint-server download --app fast-lightning-sdxl" in message


def test_missing_checkpoint_names_its_repo_and_file(spec, tiny_cache, tmp_path):
    """Base and VAE from local folders, the UNet from an empty cache: the error names the checkpoint file."""
    overrides = {k: v for k, v in local_overrides(tiny_cache).items() if k != "fast-lightning-sdxl:2"}
    resolver = Resolver(cache_dir=tmp_path, local_files_only=True, fetch_hint="inpaint-server download")
    with pytest.raises(ModelFileError) as info:
        load(apply_overrides(spec, overrides), resolver)
    message = str(info.value)
    assert LIGHTNING_REPO in message
    assert "sdxl_lightning_2step_unet.safetensors" in message
    assert "inpaint-server download" in message


def test_local_override_folder_missing_a_file(spec, tiny_cache, tmp_path):
    folder = tmp_path / "base"
    source = snapshot(tiny_cache, BASE_REPO)
    for path in source.rglob("*"):
        if path.is_file() and path.relative_to(source).as_posix() != "tokenizer_2/merges.txt":
            target = folder / path.relative_to(source)
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(path.read_bytes())
    overrides = {**local_overrides(tiny_cache), "base": folder}
    with pytest.raises(ModelFileError) as info:
        load(apply_overrides(spec, overrides), Resolver(cache_dir=tmp_path / "empty", local_files_only=True))
    assert "tokenizer_2/merges.txt" in str(info.value)
    assert "base" in str(info.value)


def test_local_override_folder_that_does_not_exist(spec, tiny_cache, tmp_path):
    overrides = {**local_overrides(tiny_cache), "vae": tmp_path / "no-such-vae"}
    with pytest.raises(ModelFileError) as info:
        load(apply_overrides(spec, overrides), Resolver(cache_dir=tmp_path / "empty", local_files_only=True))
    assert "config.json" in str(info.value)
    assert "no-such-vae" in str(info.value)


def test_local_override_checkpoint_file_missing(spec, tiny_cache, tmp_path):
    overrides = {**local_overrides(tiny_cache), "fast-lightning-sdxl:2": tmp_path / "gone.safetensors"}
    with pytest.raises(ModelFileError) as info:
        load(apply_overrides(spec, overrides), Resolver(cache_dir=tmp_path / "empty", local_files_only=True))
    assert "gone.safetensors" in str(info.value)


def test_download_all_from_a_warm_cache(spec, tiny_cache):
    paths = download_all(spec, resolver=Resolver(cache_dir=tiny_cache, local_files_only=True))
    assert paths
    for path in paths:
        assert path.exists(), path
        assert Path(tiny_cache) in path.parents or path.resolve().is_relative_to(Path(tiny_cache).resolve())


def test_download_all_offline_with_an_empty_cache_names_the_file(spec, tmp_path):
    with pytest.raises(ModelFileError) as info:
        download_all(spec, resolver=Resolver(cache_dir=tmp_path, local_files_only=True))
    assert BASE_REPO in str(info.value)


@pytest.mark.parametrize("flag", [True, False])
def test_resolver_follows_hf_hub_offline(monkeypatch, flag):
    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", flag)
    assert Resolver(local_files_only=None).offline is flag
    assert Resolver().offline is flag
    assert Resolver(local_files_only=True).offline is True
    assert Resolver(local_files_only=False).offline is False


# Before loading: what is missing from the cache, said at once (check_model_files).


def _lightning_parts(spec, with_expansion: bool = False) -> list:
    variant = spec.app("fast-lightning-sdxl").variants[2]
    return model_parts(spec, [variant], with_safety_checker=True, with_prompt_expansion=with_expansion)


def _no_probe() -> str | None:
    raise AssertionError("the Hub was asked")


def test_a_full_cache_asks_the_hub_nothing(spec, tiny_cache, monkeypatch):
    monkeypatch.setattr(hub, "hub_unreachable", _no_probe)
    resolver = Resolver(cache_dir=tiny_cache, local_files_only=False)
    assert check_model_files(_lightning_parts(spec), resolver) is resolver


def test_missing_files_and_an_unreachable_hub_fail_at_once_naming_them(spec, tmp_path, monkeypatch):
    port = free_port()  # nothing listens: refused at once, no retries
    monkeypatch.setattr(hf_constants, "ENDPOINT", f"http://127.0.0.1:{port}")
    resolver = Resolver(cache_dir=tmp_path, local_files_only=False, fetch_hint="inpaint-server download --app x")
    started = time.monotonic()
    with pytest.raises(ModelFileError) as info:
        check_model_files(_lightning_parts(spec), resolver)
    assert time.monotonic() - started < 5
    message = str(info.value)
    assert f"the Hub cannot be reached: http://127.0.0.1:{port}: ConnectError" in message
    assert f"{BASE_REPO} (revision " in message and "tokenizer/vocab.json" in message and "more" in message
    assert "sdxl_lightning_2step_unet.safetensors" in message and VAE_REPO in message
    assert "`inpaint-server download --app x`" in message and "fast-lightning-sdxl:2" in message


def test_missing_files_and_a_reachable_hub_are_named_once_then_fetched(spec, tmp_path, monkeypatch, caplog):
    monkeypatch.setattr(hub, "hub_unreachable", lambda: None)
    resolver = Resolver(cache_dir=tmp_path, local_files_only=False, fetch_hint="inpaint-server download")
    with caplog.at_level(logging.WARNING, logger="pipelines.hub"):
        assert check_model_files(_lightning_parts(spec), resolver) is resolver  # the load downloads them
        assert check_model_files(_lightning_parts(spec), resolver, announce=False) is resolver
    (record,) = caplog.records
    assert "are not in the cache" in record.message and "downloading them now" in record.message
    assert BASE_REPO in record.message and "`inpaint-server download`" in record.message


def test_optional_files_unknown_and_the_hub_unreachable_load_from_the_cache(spec, tiny_cache, monkeypatch):
    """The prompt expander's tokenizer.json is optional and not in the tiny cache: without a Hub, skip it."""
    monkeypatch.setattr(hub, "hub_unreachable", lambda: "http://127.0.0.1:1: ConnectError")
    resolver = Resolver(cache_dir=tiny_cache, local_files_only=False)
    checked = check_model_files(_lightning_parts(spec, with_expansion=True), resolver)
    assert checked.offline and checked.cache_dir == tiny_cache
