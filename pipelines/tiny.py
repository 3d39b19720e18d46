"""Tiny random-weight stand-ins for every model file the configs name, laid out as a Hugging Face hub cache.

Tests and offline demos cannot download SDXL, so :func:`make_tiny_models` writes small models with the
same topology (model-recipes.md §9) under the exact repo ids, pinned revisions and file names of the
app configs. ``hf_hub_download(repo, file, revision=<pinned>, cache_dir=..., local_files_only=True)``
and ``from_pretrained(..., cache_dir=..., local_files_only=True)`` then find them like real downloads:

    cache_dir/models--{org}--{name}/blobs/<sha256 of the content>
    cache_dir/models--{org}--{name}/snapshots/<revision>/<path>  -> relative symlink to the blob
    cache_dir/models--{org}--{name}/refs/main                    (the revision)

Every weight comes from a fixed seed, so every run writes the same bytes. The cache is built in a
temporary folder beside ``cache_dir`` and renamed into place with a marker file written last, so a
half-written cache is never used and later calls return at once.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
import tempfile
import time
import tomllib
import uuid
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .errors import ConfigError
from .specs import (
    ENGINE_FILE,
    CheckpointSpec,
    RepoSpec,
    ServingSpec,
    default_config_dir,
    load_serving_spec,
    parse_app,
)

if TYPE_CHECKING:
    import torch

# Bump when the generated content changes, so existing caches are rebuilt.
TINY_MODELS_VERSION = "tiny-models/1"
MARKER_NAME = ".tiny-complete"

# -- what the tiny components look like (model-recipes.md §9) -------------------------------------------

UNET_CONFIG: dict[str, Any] = {
    "sample_size": 8,
    "in_channels": 4,
    "out_channels": 4,
    "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    "up_block_types": ("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    "block_out_channels": (32, 64, 64),
    "layers_per_block": 2,
    "attention_head_dim": (2, 4, 4),
    "transformer_layers_per_block": (1, 1, 2),
    "use_linear_projection": True,
    "cross_attention_dim": 96,
    "addition_embed_type": "text_time",
    "addition_time_embed_dim": 8,
    "projection_class_embeddings_input_dim": 112,
}

VAE_CONFIG: dict[str, Any] = {
    "in_channels": 3,
    "out_channels": 3,
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
    "block_out_channels": [32, 32, 64, 64],
    "layers_per_block": 1,
    "latent_channels": 4,
    "norm_num_groups": 32,
    "sample_size": 64,
    "scaling_factor": 0.13025,
    # Like the real madebyollin/sdxl-vae-fp16-fix config: it is meant to run in fp16.
    "force_upcast": False,
}

# The real stabilityai/stable-diffusion-xl-base-1.0 scheduler/scheduler_config.json.
SDXL_SCHEDULER_CONFIG: dict[str, Any] = {
    "_class_name": "EulerDiscreteScheduler",
    "_diffusers_version": "0.19.0.dev0",
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "beta_start": 0.00085,
    "clip_sample": False,
    "interpolation_type": "linear",
    "num_train_timesteps": 1000,
    "prediction_type": "epsilon",
    "sample_max_value": 1.0,
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "steps_offset": 1,
    "timestep_spacing": "leading",
    "trained_betas": None,
    "use_karras_sigmas": False,
}

SDXL_MODEL_INDEX: dict[str, Any] = {
    "_class_name": "StableDiffusionXLPipeline",
    "_diffusers_version": "0.19.0.dev0",
    "force_zeros_for_empty_prompt": True,
    "add_watermarker": None,
    "scheduler": ["diffusers", "EulerDiscreteScheduler"],
    "text_encoder": ["transformers", "CLIPTextModel"],
    "text_encoder_2": ["transformers", "CLIPTextModelWithProjection"],
    "tokenizer": ["transformers", "CLIPTokenizer"],
    "tokenizer_2": ["transformers", "CLIPTokenizer"],
    "unet": ["diffusers", "UNet2DConditionModel"],
    # The configs load the VAE from its own repo, so no vae/ folder is written; the entry stays
    # because the real model_index.json has it (pass vae= to from_pretrained).
    "vae": ["diffusers", "AutoencoderKL"],
}

CLIP_IMAGE_PROCESSOR_CONFIG: dict[str, Any] = {
    "crop_size": {"height": 224, "width": 224},
    "do_center_crop": True,
    "do_convert_rgb": True,
    "do_normalize": True,
    "do_rescale": True,
    "do_resize": True,
    "image_mean": [0.48145466, 0.4578275, 0.40821073],
    "image_processor_type": "CLIPImageProcessor",
    "image_std": [0.26862954, 0.26130258, 0.27577711],
    "resample": 3,
    "rescale_factor": 0.00392156862745098,
    "size": {"shortest_edge": 224},
}

CLIP_WORDS = (
    "a", "photo", "of", "the", "cat", "dog", "on", "in", "red", "blue", "sky", "bench",
    "detailed", "cinematic", "lighting", "portrait", "landscape",
)  # fmt: skip
GPT2_WORDS = (
    " detailed", " cinematic", " lighting", " 4", " 8", " photo", " portrait", " art", " artstation",
    " highly", " sharp", " focus", " trending", " on", " masterpiece", " a", " cat",
)  # fmt: skip
BOS, EOS = "<|startoftext|>", "<|endoftext|>"
LORA_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")
LORA_RANK = 4

BASE_FILES = (
    "model_index.json",
    "scheduler/scheduler_config.json",
    *(f"{tok}/{name}" for tok in ("tokenizer", "tokenizer_2") for name in
      ("merges.txt", "special_tokens_map.json", "tokenizer_config.json", "vocab.json")),
    "text_encoder/config.json",
    "text_encoder/model{variant}.safetensors",
    "text_encoder_2/config.json",
    "text_encoder_2/model{variant}.safetensors",
    "unet/config.json",
    "unet/diffusion_pytorch_model{variant}.safetensors",
)  # fmt: skip
VAE_FILES = ("config.json", "diffusion_pytorch_model.safetensors")
SAFETY_CHECKER_FILES = ("config.json", "model.safetensors", "preprocessor_config.json")
EXPANSION_FILES = (
    "config.json", "generation_config.json", "merges.txt", "model.safetensors",
    "special_tokens_map.json", "tokenizer_config.json", "vocab.json",
)  # fmt: skip


# -- what to write ------------------------------------------------------------------------------------


@dataclass
class _Plan:
    """Every (repo, revision) to write, grouped by the role that decides its content."""

    bases: dict[tuple[str, str], str | None] = field(default_factory=dict)  # -> variant
    vaes: set[tuple[str, str]] = field(default_factory=set)
    checkpoints: dict[tuple[str, str], dict[str, str]] = field(default_factory=dict)  # -> {file: kind}
    safety_checkers: set[tuple[str, str]] = field(default_factory=set)
    expansions: set[tuple[str, str]] = field(default_factory=set)

    def add_checkpoint(self, ckpt: CheckpointSpec) -> None:
        files = self.checkpoints.setdefault((ckpt.repo, ckpt.revision), {})
        if files.setdefault(ckpt.file, ckpt.kind) != ckpt.kind:
            raise ConfigError(f"{ckpt.repo}/{ckpt.file} is used both as a UNet and as a LoRA")

    def files(self) -> list[tuple[str, str, str]]:
        """Every (repo, revision, filename) this plan writes, sorted."""
        out: list[tuple[str, str, str]] = []
        for (repo, rev), variant in self.bases.items():
            suffix = f".{variant}" if variant else ""
            out += [(repo, rev, f.format(variant=suffix)) for f in BASE_FILES]
        out += [(repo, rev, f) for repo, rev in self.vaes for f in VAE_FILES]
        out += [(repo, rev, f) for (repo, rev), files in self.checkpoints.items() for f in files]
        out += [(repo, rev, f) for repo, rev in self.safety_checkers for f in SAFETY_CHECKER_FILES]
        out += [(repo, rev, f) for repo, rev in self.expansions for f in EXPANSION_FILES]
        return sorted(set(out))


def _add_spec(plan: _Plan, spec: ServingSpec) -> None:
    for app in spec.apps.values():
        for variant in app.variants.values():
            _add_base(plan, variant.base)
            plan.vaes.add((variant.vae.repo, variant.vae.revision))
            plan.add_checkpoint(variant.checkpoint)
    plan.safety_checkers.add((spec.engine.safety_checker.repo, spec.engine.safety_checker.revision))
    model = spec.engine.prompt_expansion.model
    plan.expansions.add((model.repo, model.revision))


def _add_base(plan: _Plan, base: RepoSpec) -> None:
    key = (base.repo, base.revision)
    if plan.bases.setdefault(key, base.variant) != base.variant:
        raise ConfigError(f"{base.repo}@{base.revision} is used with two variants; tiny models write one")


def _config_dir() -> Path:
    """The default config directory; the source tree's ``configs/`` when the package is not installed."""
    try:
        return default_config_dir()
    except ModuleNotFoundError:
        return Path(__file__).resolve().parent.parent / "configs"


def _config_plan(config_dir: Path | None) -> _Plan:
    """Everything a config folder names, with each app read both with and without ``unified_lora``."""
    directory = Path(config_dir) if config_dir else _config_dir()
    plan = _Plan()
    _add_spec(plan, load_serving_spec(directory))
    for path in sorted(directory.glob("*.toml")):
        if path.name == ENGINE_FILE:
            continue
        with path.open("rb") as fh:
            doc = tomllib.load(fh)
        for unified in (False, True):
            if unified and "unified" not in doc:
                continue
            app = parse_app({**doc, "unified_lora": unified}, str(path))
            for variant in app.variants.values():
                _add_base(plan, variant.base)
                plan.vaes.add((variant.vae.repo, variant.vae.revision))
                plan.add_checkpoint(variant.checkpoint)
    return plan


def _plan_for(spec: ServingSpec | None, config_dir: Path | None) -> _Plan:
    if spec is None:
        return _config_plan(config_dir)
    if config_dir is not None:
        raise TypeError("pass either spec or config_dir, not both")
    plan = _Plan()
    _add_spec(plan, spec)
    return plan


def tiny_model_files(spec: ServingSpec | None = None, *, config_dir: Path | None = None) -> list[tuple[str, str, str]]:
    """Every ``(repo, revision, filename)`` that :func:`make_tiny_models` writes, sorted.

    With a ``spec``: the files that spec serves. Without: every file the configs in ``config_dir``
    (default: :func:`pipelines.specs.default_config_dir`) name, including the ``[unified]``
    checkpoints of apps whose ``unified_lora`` is off (and the per-step ones where it is on).
    """
    return _plan_for(spec, config_dir).files()


# -- public entry points ------------------------------------------------------------------------------


def tiny_cache_dir(data_dir: Path) -> Path:
    """Where :func:`ensure_tiny_models` keeps the tiny hub cache under a data directory."""
    return Path(data_dir) / "tiny-models" / "hub"


def ensure_tiny_models(data_dir: Path, spec: ServingSpec | None = None, *, config_dir: Path | None = None) -> Path:
    """Create the tiny hub cache under ``data_dir`` on first use; return its path (cheap afterwards)."""
    return make_tiny_models(tiny_cache_dir(data_dir), spec, config_dir=config_dir)


def make_tiny_models(cache_dir: Path, spec: ServingSpec | None = None, *, config_dir: Path | None = None) -> Path:
    """Write tiny random-weight stand-ins for every file ``spec`` names as a hub cache in ``cache_dir``.

    ``spec=None`` covers every file the configs in ``config_dir`` name (see :func:`tiny_model_files`).
    Returns ``cache_dir``. If ``cache_dir`` already holds a complete cache of this generator version
    with (at least) these files, nothing is written. Any other tiny cache there is replaced; a
    non-empty folder without a marker is refused rather than overwritten, as it may be a real hub cache.
    """
    cache_dir = Path(cache_dir)
    plan = _plan_for(spec, config_dir)
    files = plan.files()
    if _marker_covers(cache_dir, files):
        return cache_dir
    rows = ",\n".join("    " + json.dumps(f) for f in files)
    marker = f'{{\n  "version": {json.dumps(TINY_MODELS_VERSION)},\n  "files": [\n{rows}\n  ]\n}}\n'
    if cache_dir.exists() and not _replaceable(cache_dir):
        raise FileExistsError(
            f"{cache_dir} exists, is not empty and has no {MARKER_NAME} marker; refusing to overwrite it"
        )
    cache_dir.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_builds(cache_dir)
    prefix = f".{cache_dir.name}.building-{os.getpid()}-"
    staging = Path(tempfile.mkdtemp(prefix=prefix, dir=cache_dir.parent))
    try:
        staging.chmod(0o755)  # mkdtemp makes it private; the cache is meant to be shared like a hub cache
        _build(staging, plan)
        (staging / MARKER_NAME).write_text(marker)
        _install(staging, cache_dir, files)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return cache_dir


# -- cache folder handling ----------------------------------------------------------------------------


def _marker_covers(cache_dir: Path, files: list[tuple[str, str, str]]) -> bool:
    """Whether ``cache_dir`` is a complete tiny cache of this version holding at least ``files``."""
    try:
        marker = json.loads((cache_dir / MARKER_NAME).read_text())
        built = {tuple(f) for f in marker["files"]}
        return marker["version"] == TINY_MODELS_VERSION and built.issuperset(files)
    except (OSError, ValueError, KeyError, TypeError):
        return False


def _replaceable(cache_dir: Path) -> bool:
    """Only an empty folder or one of our own (marker present, any version) may be replaced."""
    return (cache_dir / MARKER_NAME).is_file() or (cache_dir.is_dir() and not any(cache_dir.iterdir()))


def _install(staging: Path, cache_dir: Path, files: list[tuple[str, str, str]]) -> None:
    """Rename the finished ``staging`` folder to ``cache_dir``, moving an older tiny cache out of the way."""
    old: Path | None = None
    if cache_dir.exists():
        if _marker_covers(cache_dir, files):  # a concurrent build finished first
            return
        old = cache_dir.parent / f".{cache_dir.name}.old-{uuid.uuid4().hex[:12]}"
        os.rename(cache_dir, old)
    try:
        os.rename(staging, cache_dir)
    except OSError:
        if not _marker_covers(cache_dir, files):
            raise
    finally:
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)


def _remove_stale_builds(cache_dir: Path, min_age_s: float = 600.0) -> None:
    """Delete staging and set-aside folders left by builds that crashed (process gone, folder old).

    The age check keeps a build running in another PID namespace (a second container on the same
    volume) safe; a build takes seconds.
    """
    leftovers = [
        *cache_dir.parent.glob(f".{cache_dir.name}.building-*"),
        *cache_dir.parent.glob(f".{cache_dir.name}.old-*"),
    ]
    for path in leftovers:
        try:
            if time.time() - path.stat().st_mtime < min_age_s:
                continue
            if ".building-" in path.name:
                os.kill(int(path.name.split(".building-")[1].split("-")[0]), 0)
                continue  # its process is still alive
        except (IndexError, ValueError, ProcessLookupError):
            pass
        except OSError:  # no permission to signal it (so alive), or the folder vanished meanwhile
            continue
        shutil.rmtree(path, ignore_errors=True)


def _repo_folder(root: Path, repo_id: str) -> Path:
    return root / ("models--" + repo_id.replace("/", "--"))


def _add_to_cache(root: Path, repo_id: str, revision: str, files: dict[str, bytes]) -> None:
    """Store ``files`` (snapshot path -> content) as blobs + snapshot symlinks, and point refs/main at it."""
    folder = _repo_folder(root, repo_id)
    blobs = folder / "blobs"
    snapshot = folder / "snapshots" / revision
    blobs.mkdir(parents=True, exist_ok=True)
    for name, content in sorted(files.items()):
        blob = blobs / hashlib.sha256(content).hexdigest()
        if not blob.exists():
            blob.write_bytes(content)
        link = snapshot / name
        link.parent.mkdir(parents=True, exist_ok=True)
        if link.is_symlink() or link.exists():
            raise ValueError(f"{repo_id}@{revision}: {name} written twice")
        link.symlink_to(os.path.relpath(blob, link.parent))
    (folder / "refs").mkdir(exist_ok=True)
    (folder / "refs" / "main").write_text(revision)


def _read_tree(folder: Path) -> dict[str, bytes]:
    paths = sorted(p for p in folder.rglob("*") if p.is_file())
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in paths}


def _json_bytes(obj: Any) -> bytes:
    return (json.dumps(obj, indent=2, sort_keys=True, ensure_ascii=False) + "\n").encode()


def _seed(*parts: str) -> int:
    """A stable seed from names (Python's ``hash`` is salted per process)."""
    return int.from_bytes(hashlib.sha256("/".join(parts).encode()).digest()[:4], "little")


# -- building -----------------------------------------------------------------------------------------


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """Silence library warnings and info logs while building; nothing goes to stdout."""
    import diffusers
    import transformers

    levels = (diffusers.logging.get_verbosity(), transformers.logging.get_verbosity())
    bars = transformers.logging.is_progress_bar_enabled()
    diffusers.logging.set_verbosity_error()
    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    hub_logger = logging.getLogger("huggingface_hub")
    hub_level = hub_logger.level
    hub_logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        diffusers.logging.set_verbosity(levels[0])
        transformers.logging.set_verbosity(levels[1])
        if bars:
            transformers.logging.enable_progress_bar()
        hub_logger.setLevel(hub_level)


def _build(root: Path, plan: _Plan) -> None:
    import torch

    with _quiet(), torch.random.fork_rng(devices=[]):
        unet_state: dict[str, torch.Tensor] | None = None
        for (repo, rev), variant in sorted(plan.bases.items(), key=lambda kv: kv[0]):
            files, unet_state = _base_files(variant)
            _add_to_cache(root, repo, rev, files)
        if plan.checkpoints and unet_state is None:
            unet_state = _tiny_unet().state_dict()
        for repo, rev in sorted(plan.vaes):
            _add_to_cache(root, repo, rev, _vae_files())
        for (repo, rev), wanted in sorted(plan.checkpoints.items()):
            assert unet_state is not None
            ckpts = {name: _checkpoint_bytes(repo, name, kind, unet_state) for name, kind in wanted.items()}
            _add_to_cache(root, repo, rev, ckpts)
        for repo, rev in sorted(plan.safety_checkers):
            _add_to_cache(root, repo, rev, _safety_checker_files())
        for repo, rev in sorted(plan.expansions):
            _add_to_cache(root, repo, rev, _expansion_files())


def _saved(save: Callable[[Path], None]) -> dict[str, bytes]:
    """Run a ``save_pretrained``-style callable into a scratch folder and return what it wrote."""
    with tempfile.TemporaryDirectory(prefix="tiny-save-") as tmp:
        save(Path(tmp))
        return _read_tree(Path(tmp))


def _tiny_unet() -> Any:
    import torch
    from diffusers import UNet2DConditionModel

    torch.manual_seed(_seed("unet"))
    return UNet2DConditionModel(**UNET_CONFIG).eval()


def _base_files(variant: str | None) -> tuple[dict[str, bytes], dict[str, torch.Tensor]]:
    """The SDXL base repo; also returns the fp32 UNet state dict that the checkpoints perturb."""
    import torch
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    files: dict[str, bytes] = {
        "model_index.json": _json_bytes(SDXL_MODEL_INDEX),
        "scheduler/scheduler_config.json": _json_bytes(SDXL_SCHEDULER_CONFIG),
    }
    suffix = f".{variant}" if variant else ""
    save_kw: dict[str, Any] = {"safe_serialization": True, "variant": variant}
    for folder, pad in (("tokenizer", EOS), ("tokenizer_2", "!")):
        files.update({f"{folder}/{k}": v for k, v in _clip_tokenizer_files(pad).items()})
    with tempfile.TemporaryDirectory(prefix="tiny-tok-") as tmp:
        for name, content in _clip_tokenizer_files(EOS).items():
            (Path(tmp) / name).write_bytes(content)
        vocab_size = len(CLIPTokenizer.from_pretrained(tmp))

    ids = {"bos_token_id": 0, "eos_token_id": 2, "pad_token_id": 1, "vocab_size": vocab_size}
    encoders = (
        ("text_encoder", CLIPTextModel, {"hidden_size": 32, "intermediate_size": 37, "projection_dim": 32,
                                         "hidden_act": "quick_gelu"}),
        ("text_encoder_2", CLIPTextModelWithProjection, {"hidden_size": 64, "intermediate_size": 64,
                                                         "projection_dim": 64, "hidden_act": "gelu"}),
    )  # fmt: skip
    for folder, cls, dims in encoders:
        torch.manual_seed(_seed(folder))
        config = CLIPTextConfig(num_hidden_layers=3, num_attention_heads=4, max_position_embeddings=77, **dims, **ids)
        model = cls(config).eval().half()
        written = _saved(lambda d, m=model: m.save_pretrained(d, **save_kw))
        files.update({f"{folder}/{k}": v for k, v in written.items()})

    unet = _tiny_unet()
    state = {k: v.clone() for k, v in unet.state_dict().items()}
    written = _saved(lambda d: unet.half().save_pretrained(d, **save_kw))
    files.update({f"unet/{k}": v for k, v in written.items()})

    expected = {f.format(variant=suffix) for f in BASE_FILES}
    _check_written("base", files, expected)
    return {k: v for k, v in files.items() if k in expected}, state


def _check_written(what: str, files: dict[str, bytes], expected: set[str] | tuple[str, ...]) -> None:
    missing = sorted(set(expected) - set(files))
    if missing:
        raise RuntimeError(f"tiny {what}: save_pretrained did not write {missing} (wrote {sorted(files)})")


def _vae_files() -> dict[str, bytes]:
    import torch
    from diffusers import AutoencoderKL

    torch.manual_seed(_seed("vae"))
    vae = AutoencoderKL(**VAE_CONFIG).eval()
    files = _saved(lambda d: vae.save_pretrained(d, safe_serialization=True))
    _check_written("vae", files, VAE_FILES)
    return {k: files[k] for k in VAE_FILES}


def _safety_checker_files() -> dict[str, bytes]:
    import torch
    from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker
    from transformers import CLIPConfig

    torch.manual_seed(_seed("safety_checker"))
    config = CLIPConfig(
        text_config={"hidden_size": 32, "intermediate_size": 37, "num_hidden_layers": 2,
                     "num_attention_heads": 4, "max_position_embeddings": 77, "vocab_size": 99,
                     "bos_token_id": 0, "eos_token_id": 2, "pad_token_id": 1},
        vision_config={"hidden_size": 32, "intermediate_size": 37, "num_hidden_layers": 2,
                       "num_attention_heads": 4, "image_size": 224, "patch_size": 14},
        projection_dim=32,
    )  # fmt: skip
    checker = StableDiffusionSafetyChecker(config).eval()
    # The thresholds must stay at their init (1.0): a cosine never exceeds 1, so nothing is flagged.
    for name in ("concept_embeds_weights", "special_care_embeds_weights"):
        if not torch.equal(getattr(checker, name), torch.ones_like(getattr(checker, name))):
            raise RuntimeError(f"tiny safety checker: {name} is not all ones after init")
    files = _saved(lambda d: checker.save_pretrained(d, safe_serialization=True))
    files["preprocessor_config.json"] = _json_bytes(CLIP_IMAGE_PROCESSOR_CONFIG)
    _check_written("safety checker", files, SAFETY_CHECKER_FILES)
    return {k: files[k] for k in SAFETY_CHECKER_FILES}


def _expansion_files() -> dict[str, bytes]:
    import torch
    from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel

    files = _gpt2_tokenizer_files()
    with tempfile.TemporaryDirectory(prefix="tiny-tok-") as tmp:
        for name, content in files.items():
            (Path(tmp) / name).write_bytes(content)
        tokenizer = AutoTokenizer.from_pretrained(tmp)
        vocab_size, eos_id = len(tokenizer), tokenizer.convert_tokens_to_ids(EOS)
    torch.manual_seed(_seed("prompt_expansion"))
    config = GPT2Config(
        n_embd=32, n_layer=2, n_head=2, n_positions=256, vocab_size=vocab_size,
        bos_token_id=eos_id, eos_token_id=eos_id,
    )  # fmt: skip
    model = GPT2LMHeadModel(config).eval()
    files.update(_saved(lambda d: model.save_pretrained(d, safe_serialization=True)))
    _check_written("prompt expansion", files, EXPANSION_FILES)
    return {k: files[k] for k in EXPANSION_FILES}


# -- tokenizers ---------------------------------------------------------------------------------------


def _bytes_to_unicode() -> list[str]:
    """The GPT-2/CLIP byte-level alphabet, in vocabulary order."""
    bs = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), 256)]
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return [chr(c) for c in cs]


def _chain_merges(words: list[list[str]]) -> list[tuple[str, str]]:
    """Merges that build each word (a list of symbols) left to right, without duplicates."""
    merges: list[tuple[str, str]] = []
    for symbols in words:
        current = symbols[0]
        for symbol in symbols[1:]:
            pair = (current, symbol)
            if pair not in merges:
                merges.append(pair)
            current += symbol
    return merges


def _merges_txt(merges: list[tuple[str, str]]) -> bytes:
    return ("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges)).encode()


def _clip_tokenizer_files(pad_token: str) -> dict[str, bytes]:
    """A CLIP BPE tokenizer in the real layout: bytes, bytes + ``</w>``, merges, then the two specials."""
    alphabet = _bytes_to_unicode()
    merges = _chain_merges([[*w[:-1], w[-1] + "</w>"] for w in CLIP_WORDS if len(w) > 1])
    tokens = alphabet + [c + "</w>" for c in alphabet] + [a + b for a, b in merges] + [BOS, EOS]
    vocab = {tok: i for i, tok in enumerate(dict.fromkeys(tokens))}
    special = {"bos_token": BOS, "eos_token": EOS, "unk_token": EOS, "pad_token": pad_token}
    config = {
        **special,
        "add_prefix_space": False,
        "clean_up_tokenization_spaces": True,
        "do_lower_case": True,
        "errors": "replace",
        "model_max_length": 77,
        "tokenizer_class": "CLIPTokenizer",
    }
    return {
        "merges.txt": _merges_txt(merges),
        "special_tokens_map.json": _json_bytes(special),
        "tokenizer_config.json": _json_bytes(config),
        "vocab.json": _json_bytes(vocab),
    }


def _gpt2_tokenizer_files() -> dict[str, bytes]:
    """A byte-level GPT-2 BPE tokenizer: the 256 byte symbols, the merge results, ``<|endoftext|>`` last."""
    alphabet = _bytes_to_unicode()
    space = alphabet[alphabet.index("Ġ")]
    merges = _chain_merges([list(w.replace(" ", space)) for w in GPT2_WORDS])
    tokens = alphabet + [a + b for a, b in merges] + [EOS]
    vocab = {tok: i for i, tok in enumerate(dict.fromkeys(tokens))}
    special = {"bos_token": EOS, "eos_token": EOS, "unk_token": EOS}
    config = {
        **special,
        "add_prefix_space": False,
        "clean_up_tokenization_spaces": True,
        "model_max_length": 256,
        "tokenizer_class": "GPT2Tokenizer",
    }
    return {
        "merges.txt": _merges_txt(merges),
        "special_tokens_map.json": _json_bytes(special),
        "tokenizer_config.json": _json_bytes(config),
        "vocab.json": _json_bytes(vocab),
    }


# -- checkpoints --------------------------------------------------------------------------------------

# Known hub files: (format, dtype) as the real file has them. Others get a default by kind.
_CHECKPOINT_FORMATS: dict[str, tuple[str, str]] = {
    "Hyper-SDXL-1step-Unet.safetensors": ("unet", "float32"),
    "Hyper-SDXL-1step-lora.safetensors": ("peft", "float16"),
    "Hyper-SDXL-2steps-lora.safetensors": ("peft", "float16"),
    "Hyper-SDXL-4steps-lora.safetensors": ("kohya", "float16"),
}


def _checkpoint_bytes(repo: str, name: str, kind: str, unet_state: dict[str, torch.Tensor]) -> bytes:
    import torch
    from safetensors.torch import save as save_bytes

    fmt, dtype_name = _CHECKPOINT_FORMATS.get(name, ("unet" if kind == "unet" else "peft", "float16"))
    if (fmt == "unet") != (kind == "unet"):
        raise ConfigError(f"{repo}/{name}: configured as kind {kind!r}, but the real file is a {fmt} file")
    dtype = getattr(torch, dtype_name)
    generator = torch.Generator().manual_seed(_seed(repo, name))
    if fmt == "unet":
        tensors = {
            k: (v + 0.02 * torch.randn(v.shape, generator=generator, dtype=v.dtype)).to(dtype)
            for k, v in sorted(unet_state.items())
        }
    else:
        tensors = _lora_tensors(fmt, generator, dtype)
    return save_bytes({k: v.contiguous() for k, v in tensors.items()}, metadata={"format": "pt"})


def _lora_targets() -> list[tuple[str, int, int]]:
    """``(module name, in_features, out_features)`` of every attention projection a LoRA adapts."""
    import torch
    from diffusers import UNet2DConditionModel

    with torch.device("meta"):
        unet = UNet2DConditionModel(**UNET_CONFIG)
    return [
        (name, module.in_features, module.out_features)
        for name, module in unet.named_modules()
        if isinstance(module, torch.nn.Linear) and any(name.endswith("." + t) for t in LORA_TARGETS)
    ]


def _lora_tensors(fmt: str, generator: torch.Generator, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """A rank-4 LoRA on to_q/to_k/to_v/to_out.0 with random A *and* B (PEFT zero-inits B, a no-op)."""
    import torch

    layers_per_block = UNET_CONFIG["layers_per_block"]
    tensors: dict[str, torch.Tensor] = {}
    for name, fan_in, fan_out in _lora_targets():
        down = torch.randn(LORA_RANK, fan_in, generator=generator) / fan_in**0.5
        up = 0.1 * torch.randn(fan_out, LORA_RANK, generator=generator)
        if fmt == "peft":  # as written by save_lora_weights(unet_lora_layers=get_peft_model_state_dict(unet))
            tensors[f"unet.{name}.lora_A.weight"] = down.to(dtype)
            tensors[f"unet.{name}.lora_B.weight"] = up.to(dtype)
        else:  # kohya / SGM key layout (model-recipes.md §9.3)
            key = _kohya_name(name, layers_per_block)
            tensors[f"{key}.lora_down.weight"] = down.to(dtype)
            tensors[f"{key}.lora_up.weight"] = up.to(dtype)
            tensors[f"{key}.alpha"] = torch.tensor(float(LORA_RANK), dtype=dtype)
    return tensors


def _kohya_name(name: str, layers_per_block: int) -> str:
    """``down_blocks.1.attentions.0.x.to_q`` -> ``lora_unet_input_blocks_4_1_x_to_q`` (SGM numbering)."""
    parts = name.split(".")
    if parts[0] == "down_blocks" and parts[2] == "attentions":
        head = ["input_blocks", str(1 + int(parts[1]) * (layers_per_block + 1) + int(parts[3])), "1"]
        rest = parts[4:]
    elif parts[0] == "up_blocks" and parts[2] == "attentions":
        head = ["output_blocks", str(int(parts[1]) * (layers_per_block + 1) + int(parts[3])), "1"]
        rest = parts[4:]
    elif parts[0] == "mid_block" and parts[1] == "attentions":
        head, rest = ["middle_block", "1"], parts[3:]
    else:
        raise ValueError(f"no SGM name for UNet module {name}")
    return "lora_unet_" + "_".join(head + rest)
