"""Finding model files: the Hugging Face Hub cache (``HF_HOME``, ``HF_HUB_OFFLINE``) or local overrides.

Every file is resolved through ``huggingface_hub.hf_hub_download`` at the pinned revision, so a warm
cache is used as is and a cold one is filled (unless offline). Only ``.safetensors`` weights are
ever named here; pickle-based formats are never fetched or read.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from huggingface_hub import constants as hf_constants
from huggingface_hub import hf_hub_download
from huggingface_hub.errors import EntryNotFoundError, HfHubHTTPError, LocalEntryNotFoundError

from .errors import ModelFileError
from .specs import AppSpec, CheckpointSpec, RepoSpec, ServingSpec

log = logging.getLogger(__name__)

TOKENIZER_FILES = ("vocab.json", "merges.txt", "special_tokens_map.json", "tokenizer_config.json")


@dataclass(frozen=True)
class FileNeed:
    path: str
    optional: bool = False


@dataclass(frozen=True)
class Resolver:
    """How files are found: ``cache_dir`` None means the standard HF cache (``HF_HOME``/``HF_HUB_CACHE``).

    ``local_files_only`` None follows ``HF_HUB_OFFLINE``.
    """

    cache_dir: Path | None = None
    local_files_only: bool | None = None
    fetch_hint: str = "inpaint-server download"

    @property
    def offline(self) -> bool:
        if self.local_files_only is not None:
            return self.local_files_only
        return bool(hf_constants.HF_HUB_OFFLINE)


def base_files(base: RepoSpec, with_unet_weights: bool) -> list[FileNeed]:
    """Files of the SDXL base repo the engine reads (the base VAE is not one: the fp16-fix VAE is)."""
    suffix = f".{base.variant}" if base.variant else ""
    needs = [FileNeed(f"{folder}/{name}") for folder in ("tokenizer", "tokenizer_2") for name in TOKENIZER_FILES]
    for folder in ("text_encoder", "text_encoder_2"):
        needs += [FileNeed(f"{folder}/config.json"), FileNeed(f"{folder}/model{suffix}.safetensors")]
    needs += [FileNeed("scheduler/scheduler_config.json"), FileNeed("unet/config.json")]
    if with_unet_weights:
        needs.append(FileNeed(f"unet/diffusion_pytorch_model{suffix}.safetensors"))
    return needs


VAE_FILES = [FileNeed("config.json"), FileNeed("diffusion_pytorch_model.safetensors")]
SAFETY_CHECKER_FILES = [FileNeed("config.json"), FileNeed("model.safetensors"), FileNeed("preprocessor_config.json")]
EXPANSION_FILES = [
    FileNeed("config.json"),
    FileNeed("model.safetensors"),
    FileNeed("tokenizer_config.json"),
    FileNeed("vocab.json"),
    FileNeed("merges.txt"),
    FileNeed("special_tokens_map.json", optional=True),
    FileNeed("tokenizer.json", optional=True),
    FileNeed("generation_config.json", optional=True),
]


def _missing(repo: str, revision: str, file: str, resolver: Resolver, reason: str, key: str) -> ModelFileError:
    where = f"cache {resolver.cache_dir}" if resolver.cache_dir else f"HF cache {hf_constants.HF_HUB_CACHE}"
    return ModelFileError(
        f"model file '{file}' of {repo} (revision {revision[:12]}) is missing from the {where} and could "
        f"not be fetched ({reason}). Fetch it with `{resolver.fetch_hint}`, or point "
        f"`--model-path {key}=PATH` at a local copy."
    )


def _hub_file(repo: str, revision: str, file: str, resolver: Resolver, key: str) -> Path | None:
    try:
        return Path(
            hf_hub_download(
                repo_id=repo,
                filename=file,
                revision=revision,
                cache_dir=resolver.cache_dir,
                local_files_only=resolver.offline,
            )
        )
    except LocalEntryNotFoundError as exc:  # a subclass of EntryNotFoundError: check it first
        reason = "offline: HF_HUB_OFFLINE or local-only mode" if resolver.offline else str(exc).splitlines()[0]
        raise _missing(repo, revision, file, resolver, reason, key) from exc
    except EntryNotFoundError:
        return None
    except (HfHubHTTPError, OSError, ValueError) as exc:
        raise _missing(repo, revision, file, resolver, str(exc).splitlines()[0], key) from exc


def resolve_repo(repo: RepoSpec, needs: Iterable[FileNeed], resolver: Resolver, key: str) -> Path:
    """Make sure every needed file of a repo is present; return the folder holding them."""
    if repo.path is not None:
        folder = repo.path
        for need in needs:
            if not need.optional and not (folder / need.path).is_file():
                raise ModelFileError(
                    f"local override {key}={folder} has no '{need.path}' (expected the layout of {repo.repo})"
                )
        return folder
    folder: Path | None = None
    for need in needs:
        try:
            path = _hub_file(repo.repo, repo.revision, need.path, resolver, key)
        except ModelFileError:
            if need.optional:  # offline, an optional file that is not cached may simply not exist
                continue
            raise
        if path is None:
            if need.optional:
                continue
            raise _missing(repo.repo, repo.revision, need.path, resolver, "no such file in the repo", key)
        root = path
        for _ in Path(need.path).parts:
            root = root.parent
        folder = root
    if folder is None:
        raise ModelFileError(f"{repo.repo}: no files requested")
    return folder


def resolve_checkpoint(ckpt: CheckpointSpec, resolver: Resolver, key: str) -> Path:
    """The local path of one checkpoint file (override, or the Hub cache)."""
    if ckpt.path is not None:
        if not ckpt.path.is_file():
            raise ModelFileError(f"local override {key}={ckpt.path} is not a file")
        if ckpt.path.suffix != ".safetensors":
            raise ModelFileError(f"local override {key}={ckpt.path}: only .safetensors files are loaded")
        return ckpt.path
    path = _hub_file(ckpt.repo, ckpt.revision, ckpt.file, resolver, key)
    if path is None:
        raise _missing(ckpt.repo, ckpt.revision, ckpt.file, resolver, "no such file in the repo", key)
    return path


def download_all(
    spec: ServingSpec,
    apps: Iterable[AppSpec] | None = None,
    resolver: Resolver | None = None,
    with_safety_checker: bool = True,
    with_prompt_expansion: bool = True,
) -> list[Path]:
    """Fetch (or verify in the cache) every file the given apps need; returns the resolved paths.

    ``huggingface_hub`` shows a progress bar per file on stderr.
    """
    resolver = resolver or Resolver()
    chosen = list(apps) if apps is not None else list(spec.apps.values())
    done: list[Path] = []
    seen: set[tuple] = set()
    for app in chosen:
        for variant in app.variants.values():
            needs_unet = variant.checkpoint.kind == "lora"
            base_key = (*variant.base.key, needs_unet)
            if base_key not in seen:
                seen.add(base_key)
                done.append(resolve_repo(variant.base, base_files(variant.base, needs_unet), resolver, "base"))
            if variant.vae.key not in seen:
                seen.add(variant.vae.key)
                done.append(resolve_repo(variant.vae, VAE_FILES, resolver, "vae"))
            if variant.checkpoint.key not in seen:
                seen.add(variant.checkpoint.key)
                done.append(resolve_checkpoint(variant.checkpoint, resolver, variant.override_key))
    if with_safety_checker:
        done.append(resolve_repo(spec.engine.safety_checker, SAFETY_CHECKER_FILES, resolver, "safety_checker"))
    if with_prompt_expansion:
        done.append(resolve_repo(spec.engine.prompt_expansion.model, EXPANSION_FILES, resolver, "prompt_expansion"))
    return done
