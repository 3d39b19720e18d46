"""Tests for ``pipelines.tiny``: the offline hub cache of tiny random-weight stand-ins.

The expected file list is derived here from the TOML configs (independently of ``pipelines.tiny``),
including the ``[unified]`` checkpoint of the Hyper app that the default spec does not select.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
import tomllib
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionXLInpaintPipeline
from huggingface_hub import hf_hub_download, snapshot_download

from pipelines import tiny
from pipelines.specs import ENGINE_FILE, RepoSpec, load_serving_spec, parse_app

CONFIG_DIR = Path(__file__).resolve().parents[2] / "configs"
BASE_FILES = (
    "model_index.json",
    "scheduler/scheduler_config.json",
    "tokenizer/merges.txt",
    "tokenizer/special_tokens_map.json",
    "tokenizer/tokenizer_config.json",
    "tokenizer/vocab.json",
    "tokenizer_2/merges.txt",
    "tokenizer_2/special_tokens_map.json",
    "tokenizer_2/tokenizer_config.json",
    "tokenizer_2/vocab.json",
    "text_encoder/config.json",
    "text_encoder/model.fp16.safetensors",
    "text_encoder_2/config.json",
    "text_encoder_2/model.fp16.safetensors",
    "unet/config.json",
    "unet/diffusion_pytorch_model.fp16.safetensors",
)
VAE_FILES = ("config.json", "diffusion_pytorch_model.safetensors")
SAFETY_CHECKER_FILES = ("config.json", "model.safetensors", "preprocessor_config.json")
EXPANSION_FILES = (
    "config.json",
    "generation_config.json",
    "merges.txt",
    "model.safetensors",
    "special_tokens_map.json",
    "tokenizer_config.json",
    "vocab.json",
)
LORA_MODULES = 136  # to_q/to_k/to_v/to_out.0 of the 34 attention blocks of the tiny SDXL UNet


def _variants() -> list:
    """Every variant of every app config, read both with and without ``unified_lora``."""
    variants = []
    for path in sorted(CONFIG_DIR.glob("*.toml")):
        if path.name == ENGINE_FILE:
            continue
        with path.open("rb") as fh:
            doc = tomllib.load(fh)
        variants += parse_app(doc, str(path)).variants.values()
        if "unified" in doc:
            variants += parse_app({**doc, "unified_lora": True}, str(path)).variants.values()
    return variants


def _expected_files() -> set[tuple[str, str, str]]:
    spec = load_serving_spec(CONFIG_DIR)
    expected: set[tuple[str, str, str]] = set()

    def add(repo: RepoSpec, files: tuple[str, ...]) -> None:
        expected.update((repo.repo, repo.revision, f) for f in files)

    for v in _variants():
        assert v.base.variant == "fp16"
        add(v.base, BASE_FILES)
        add(v.vae, VAE_FILES)
        expected.add((v.checkpoint.repo, v.checkpoint.revision, v.checkpoint.file))
    add(spec.engine.safety_checker, SAFETY_CHECKER_FILES)
    add(spec.engine.prompt_expansion.model, EXPANSION_FILES)
    return expected


def _tree(cache_dir: Path) -> dict[str, str]:
    """Relative path -> sha256 of the content (files) or ``-> target`` (symlinks), for the whole cache."""
    out = {}
    for path in sorted(cache_dir.rglob("*")):
        rel = path.relative_to(cache_dir).as_posix()
        if path.is_symlink():
            out[rel] = "-> " + os.readlink(path)
        elif path.is_file():
            out[rel] = hashlib.sha256(path.read_bytes()).hexdigest()
    return out


def _stats(cache_dir: Path) -> dict[str, tuple[int, int]]:
    return {
        p.relative_to(cache_dir).as_posix(): (p.lstat().st_ino, p.lstat().st_mtime_ns)
        for p in sorted(cache_dir.rglob("*"))
    }


def _download(cache_dir: Path, repo: str, revision: str, filename: str) -> Path:
    return Path(hf_hub_download(repo, filename, revision=revision, cache_dir=cache_dir, local_files_only=True))


@pytest.fixture(scope="session")
def tiny_data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    data_dir = tmp_path_factory.mktemp("tiny-data")
    assert tiny.ensure_tiny_models(data_dir, config_dir=CONFIG_DIR) == tiny.tiny_cache_dir(data_dir)
    return data_dir


@pytest.fixture(scope="session")
def tiny_hub(tiny_data_dir: Path) -> Path:
    return tiny.tiny_cache_dir(tiny_data_dir)


def test_cache_dir_layout(tiny_data_dir: Path, tiny_hub: Path) -> None:
    assert tiny_hub == tiny_data_dir / "tiny-models" / "hub"
    marker = json.loads((tiny_hub / tiny.MARKER_NAME).read_text())
    assert marker["version"] == tiny.TINY_MODELS_VERSION
    assert {tuple(f) for f in marker["files"]} == _expected_files()
    assert not [p for p in tiny_hub.parent.iterdir() if p != tiny_hub], "staging folders were left behind"


def test_every_configured_file_resolves(tiny_hub: Path) -> None:
    expected = _expected_files()
    unified = {v.checkpoint.file for v in _variants() if v.app_name == "hyper-sdxl" and v.schedule == "tcd"}
    assert unified == {"Hyper-SDXL-1step-lora.safetensors"}
    assert ("ByteDance/Hyper-SD", "a08b9c3da8dc3be0a6e79b04721bf237241403f9", *unified) in expected
    for repo, revision, filename in sorted(expected):
        path = _download(tiny_hub, repo, revision, filename)
        folder = tiny_hub / f"models--{repo.replace('/', '--')}"
        assert path == folder / "snapshots" / revision / filename
        assert (folder / "refs" / "main").read_text() == revision
        assert path.is_symlink() and not os.path.isabs(os.readlink(path))
        blob = path.resolve()
        assert blob.parent.name == "blobs"
        assert blob.name == hashlib.sha256(blob.read_bytes()).hexdigest()
        assert 0 < blob.stat().st_size < 16 * 2**20
    assert set(tiny.tiny_model_files(config_dir=CONFIG_DIR)) == expected


def test_default_configs_are_the_shipped_ones(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("INPAINT_CONFIG_DIR", raising=False)
    assert set(tiny.tiny_model_files()) == _expected_files()
    served = set(tiny.tiny_model_files(load_serving_spec(CONFIG_DIR)))
    assert served < _expected_files()  # the spec leaves out the checkpoints of the other unified_lora setting


def test_two_builds_are_byte_identical(tiny_hub: Path, tmp_path_factory: pytest.TempPathFactory) -> None:
    other = tmp_path_factory.mktemp("tiny-second") / "hub"
    assert tiny.make_tiny_models(other, config_dir=CONFIG_DIR) == other
    first, second = _tree(tiny_hub), _tree(other)
    assert first == second
    assert sum(1 for v in first.values() if not v.startswith("->")) > 30


def test_second_ensure_is_a_noop(tiny_data_dir: Path, tiny_hub: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    before = _stats(tiny_hub)

    def no_rebuild(*args: object, **kwargs: object) -> None:
        raise AssertionError("ensure_tiny_models rebuilt a complete cache")

    monkeypatch.setattr(tiny, "_build", no_rebuild)
    start = time.perf_counter()
    assert tiny.ensure_tiny_models(tiny_data_dir, config_dir=CONFIG_DIR) == tiny_hub
    assert time.perf_counter() - start < 2.0
    # A spec that serves a subset of the files is satisfied by the same cache.
    assert tiny.ensure_tiny_models(tiny_data_dir, load_serving_spec(CONFIG_DIR)) == tiny_hub
    assert _stats(tiny_hub) == before


def test_refuses_to_overwrite_a_foreign_folder(tmp_path: Path) -> None:
    foreign = tmp_path / "hub"
    (foreign / "models--someone--else").mkdir(parents=True)
    with pytest.raises(FileExistsError):
        tiny.make_tiny_models(foreign, config_dir=CONFIG_DIR)
    assert (foreign / "models--someone--else").is_dir()


def test_stale_tiny_cache_is_replaced_whole(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    hub = tmp_path / "hub"
    hub.mkdir()
    (hub / tiny.MARKER_NAME).write_text(json.dumps({"version": "tiny-models/0", "files": []}))
    (hub / "leftover").write_text("old")
    monkeypatch.setattr(tiny, "_build", lambda root, plan: (root / "built").write_text("new"))
    tiny.make_tiny_models(hub, config_dir=CONFIG_DIR)
    assert sorted(p.name for p in hub.iterdir()) == [tiny.MARKER_NAME, "built"]
    assert [p.name for p in tmp_path.iterdir()] == ["hub"]


def test_failed_build_leaves_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def crash(root: Path, plan: object) -> None:
        (root / "half-written").write_text("x")
        raise RuntimeError("boom")

    monkeypatch.setattr(tiny, "_build", crash)
    with pytest.raises(RuntimeError, match="boom"):
        tiny.make_tiny_models(tmp_path / "hub", config_dir=CONFIG_DIR)
    assert list(tmp_path.iterdir()) == []


def test_safety_checker_flags_nothing(tiny_hub: Path) -> None:
    from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker
    from PIL import Image
    from transformers import AutoImageProcessor

    sc = load_serving_spec(CONFIG_DIR).engine.safety_checker
    folder = snapshot_download(sc.repo, revision=sc.revision, cache_dir=tiny_hub, local_files_only=True)
    checker = StableDiffusionSafetyChecker.from_pretrained(folder).eval()
    processor = AutoImageProcessor.from_pretrained(folder)
    images = np.random.default_rng(0).random((3, 64, 96, 3)).astype(np.float32)
    pixels = processor([Image.fromarray((im * 255).astype(np.uint8)) for im in images], return_tensors="pt")
    assert pixels.pixel_values.shape == (3, 3, 224, 224)
    checked, flags = checker(images=images.copy(), clip_input=pixels.pixel_values)
    assert flags == [False, False, False]
    np.testing.assert_array_equal(checked, images)


@pytest.fixture(scope="module")
def tiny_pipe(tiny_hub: Path) -> StableDiffusionXLInpaintPipeline:
    from diffusers import AutoencoderKL

    variant = _variants()[0]
    vae = AutoencoderKL.from_pretrained(
        variant.vae.repo, revision=variant.vae.revision, cache_dir=tiny_hub, local_files_only=True
    )
    return StableDiffusionXLInpaintPipeline.from_pretrained(
        variant.base.repo,
        revision=variant.base.revision,
        variant=variant.base.variant,
        vae=vae,
        cache_dir=tiny_hub,
        local_files_only=True,
        dtype=torch.float32,
        add_watermarker=False,
    )


def test_base_pipeline_loads_and_inpaints(tiny_pipe: StableDiffusionXLInpaintPipeline) -> None:
    assert tiny_pipe.tokenizer.model_max_length == 77 and tiny_pipe.tokenizer_2.pad_token == "!"
    assert tiny_pipe.text_encoder.config.vocab_size == len(tiny_pipe.tokenizer)
    assert tiny_pipe.vae.config.force_upcast is False
    assert tiny_pipe.scheduler.config.timestep_spacing == "leading"
    image = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    mask = torch.zeros(1, 1, 64, 64)
    mask[..., 16:48, 16:48] = 1
    out = tiny_pipe(
        prompt="a photo of a cat",
        image=image,
        mask_image=mask,
        height=64,
        width=64,
        num_inference_steps=1,
        strength=1.0,
        guidance_scale=0.0,
        output_type="np",
        generator=torch.Generator().manual_seed(0),
    )
    assert out.images.shape == (1, 64, 64, 3) and np.isfinite(out.images).all()


def test_full_unet_checkpoints_load_strict(tiny_hub: Path, tiny_pipe: StableDiffusionXLInpaintPipeline) -> None:
    from safetensors.torch import load_file

    base = tiny_pipe.unet.state_dict()
    seen = []
    for ckpt in {v.checkpoint for v in _variants() if v.checkpoint.kind == "unet"}:
        state = load_file(_download(tiny_hub, ckpt.repo, ckpt.revision, ckpt.file))
        want = torch.float32 if ckpt.file == "Hyper-SDXL-1step-Unet.safetensors" else torch.float16
        assert {t.dtype for t in state.values()} == {want}
        assert set(state) == set(base)
        tiny_pipe.unet.__class__.from_config(tiny_pipe.unet.config).load_state_dict(state, strict=True)
        assert not torch.equal(state["conv_in.weight"].float(), base["conv_in.weight"])
        assert all(not torch.equal(state["conv_in.weight"].float(), other) for other in seen)
        seen.append(state["conv_in.weight"].float())
    assert len(seen) == 5


def test_loras_convert_load_and_fuse(tiny_hub: Path, tiny_pipe: StableDiffusionXLInpaintPipeline) -> None:
    from diffusers import StableDiffusionXLPipeline
    from peft.tuners.lora import LoraLayer
    from safetensors.torch import load_file

    loras = sorted({v.checkpoint for v in _variants() if v.checkpoint.kind == "lora"}, key=lambda c: c.file)
    assert [c.file for c in loras] == [
        "Hyper-SDXL-1step-lora.safetensors",
        "Hyper-SDXL-2steps-lora.safetensors",
        "Hyper-SDXL-4steps-lora.safetensors",
    ]
    base = {k: v.clone() for k, v in tiny_pipe.unet.state_dict().items()}
    for ckpt in loras:
        raw = load_file(_download(tiny_hub, ckpt.repo, ckpt.revision, ckpt.file))
        if ckpt.file == "Hyper-SDXL-4steps-lora.safetensors":  # kohya / SGM layout
            assert all(k.startswith("lora_unet_") for k in raw)
            assert len(raw) == 3 * LORA_MODULES
            config = tiny_pipe.unet.config
            converted, alphas = StableDiffusionXLPipeline.lora_state_dict(dict(raw), unet_config=config)
            assert converted and not any(k.startswith("lora_unet_") for k in converted)
            assert alphas and len(alphas) == LORA_MODULES
        else:  # PEFT / diffusers layout with a non-zero lora_B
            assert all(k.startswith("unet.") and (".lora_A." in k or ".lora_B." in k) for k in raw)
            assert len(raw) == 2 * LORA_MODULES
            assert all(v.abs().sum() > 0 for k, v in raw.items() if ".lora_B." in k)
        tiny_pipe.load_lora_weights(
            ckpt.repo, weight_name=ckpt.file, revision=ckpt.revision, cache_dir=tiny_hub,
            local_files_only=True, adapter_name="tiny",
        )  # fmt: skip
        assert sum(isinstance(m, LoraLayer) for m in tiny_pipe.unet.modules()) == LORA_MODULES
        tiny_pipe.fuse_lora(lora_scale=ckpt.lora_scale)
        tiny_pipe.unload_lora_weights()
        fused = tiny_pipe.unet.state_dict()
        assert set(fused) == set(base)
        changed = [k for k in base if not torch.equal(base[k], fused[k])]
        assert len(changed) == LORA_MODULES, ckpt.file
        tiny_pipe.unet.load_state_dict(base)


def test_prompt_expansion_model_generates(tiny_hub: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model_spec = load_serving_spec(CONFIG_DIR).engine.prompt_expansion
    folder = snapshot_download(
        model_spec.model.repo, revision=model_spec.model.revision, cache_dir=tiny_hub, local_files_only=True
    )
    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder, use_safetensors=True).eval()
    assert tokenizer.eos_token == "<|endoftext|>" and tokenizer.model_max_length == 256
    assert model.config.vocab_size == len(tokenizer)
    assert tokenizer.tokenize("a cat, detailed cinematic lighting") == [
        "a", "Ġcat", ",", "Ġdetailed", "Ġcinematic", "Ġlighting",
    ]  # fmt: skip
    inputs = tokenizer("a cat,", return_tensors="pt")
    outputs = []
    for seed in (1, 1, 2):
        torch.manual_seed(seed)
        out = model.generate(
            **inputs, do_sample=True, top_k=model_spec.top_k, max_new_tokens=10,
            pad_token_id=tokenizer.eos_token_id,
        )  # fmt: skip
        assert out.shape[1] > inputs.input_ids.shape[1]
        outputs.append(out[0].tolist())
    assert outputs[0] == outputs[1]
