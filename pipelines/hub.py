"""Finding model files: the Hugging Face Hub cache (``HF_HOME``, ``HF_HUB_OFFLINE``) or local overrides.

Every file is resolved through ``huggingface_hub.hf_hub_download`` at the pinned revision, so a warm
cache is used as is and a cold one is filled (unless offline). Only ``.safetensors`` weights are
ever named here; pickle-based formats are never fetched or read.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable
from dataclasses import dataclass, replace
from pathlib import Path

from huggingface_hub import constants as hf_constants
from huggingface_hub import hf_hub_download, try_to_load_from_cache
from huggingface_hub.errors import EntryNotFoundError, HfHubHTTPError, LocalEntryNotFoundError
from huggingface_hub.utils import get_session

from .errors import ModelFileError
from .specs import AppSpec, CheckpointSpec, RepoSpec, ServingSpec, VariantSpec

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


@dataclass(frozen=True)
class ModelPart:
    """One thing the engine reads: a folder of a repo (``needs`` its files) or one checkpoint file."""

    spec: RepoSpec | CheckpointSpec
    needs: tuple[FileNeed, ...]
    key: str  # the --model-path key that replaces it

    @property
    def local(self) -> bool:
        return self.spec.path is not None


def model_parts(
    spec: ServingSpec,
    variants: Iterable[VariantSpec],
    with_safety_checker: bool = True,
    with_prompt_expansion: bool = True,
) -> list[ModelPart]:
    """Every folder and file the given variants (and the shared models asked for) read, once each."""
    parts: list[ModelPart] = []
    seen: set[tuple] = set()

    def add(part: ModelPart, identity: tuple) -> None:
        if identity not in seen:
            seen.add(identity)
            parts.append(part)

    for variant in variants:
        needs_unet = variant.checkpoint.kind == "lora"
        base = variant.base
        add(ModelPart(base, tuple(base_files(base, needs_unet)), "base"), (*base.key, needs_unet))
        add(ModelPart(variant.vae, tuple(VAE_FILES), "vae"), variant.vae.key)
        ckpt = variant.checkpoint
        add(ModelPart(ckpt, (FileNeed(ckpt.file),), variant.override_key), ckpt.key)
    if with_safety_checker:
        checker = spec.engine.safety_checker
        add(ModelPart(checker, tuple(SAFETY_CHECKER_FILES), "safety_checker"), checker.key)
    if with_prompt_expansion:
        model = spec.engine.prompt_expansion.model
        add(ModelPart(model, tuple(EXPANSION_FILES), "prompt_expansion"), model.key)
    return parts


def _resolve(part: ModelPart, resolver: Resolver) -> Path:
    if isinstance(part.spec, CheckpointSpec):
        return resolve_checkpoint(part.spec, resolver, part.key)
    return resolve_repo(part.spec, part.needs, resolver, part.key)


def download_all(
    spec: ServingSpec,
    apps: Iterable[AppSpec] | None = None,
    resolver: Resolver | None = None,
    with_safety_checker: bool = True,
    with_prompt_expansion: bool = True,
) -> list[Path]:
    """Fetch (or verify in the cache) every file the given apps need; returns the resolved paths.

    ``huggingface_hub`` shows a progress bar per file on stderr. With files missing and the Hub out of
    reach, fails at once naming them (see :func:`check_model_files`).
    """
    chosen = list(apps) if apps is not None else list(spec.apps.values())
    variants = [variant for app in chosen for variant in app.variants.values()]
    parts = model_parts(spec, variants, with_safety_checker, with_prompt_expansion)
    resolver = check_model_files(parts, resolver or Resolver(), announce=False)  # progress bars say it
    return [_resolve(part, resolver) for part in parts]


# ---------------------------------------------------------------------------------------------- before loading

HUB_PROBE_TIMEOUT_S = 5.0
_COMMIT = re.compile(r"[0-9a-f]{40}")
_LISTED_PER_REPO = 4


@dataclass(frozen=True)
class MissingFile:
    repo: str
    revision: str
    file: str


def cache_survey(parts: Iterable[ModelPart], resolver: Resolver) -> tuple[list[MissingFile], bool]:
    """The required Hub files that are not in the cache, and whether anything else would ask the Hub (an
    optional file neither cached nor known to be absent, or a revision that is not a commit)."""
    missing: list[MissingFile] = []
    asks_hub = False
    for part in parts:
        if part.local:
            continue
        spec = part.spec
        for need in part.needs:
            found = try_to_load_from_cache(spec.repo, need.path, cache_dir=resolver.cache_dir, revision=spec.revision)
            cached, pinned = isinstance(found, str), bool(_COMMIT.fullmatch(spec.revision))
            if not cached and not need.optional:
                missing.append(MissingFile(spec.repo, spec.revision, need.path))
            elif not pinned or found is None:  # an optional file recorded as absent in the repo asks nothing
                asks_hub = True
    return missing, asks_hub


def hub_unreachable(timeout: float = HUB_PROBE_TIMEOUT_S) -> str | None:
    """None when the Hub (``HF_ENDPOINT``) answers HTTP at all, else why not: one try, no retries."""
    url = hf_constants.ENDPOINT
    try:
        get_session().head(url, timeout=timeout, follow_redirects=False)
    except Exception as exc:  # DNS, refused, TLS, timeout...: each means the same here
        return f"{url}: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}".rstrip(": ")
    return None


def check_model_files(parts: Iterable[ModelPart], resolver: Resolver, announce: bool = True) -> Resolver:
    """Before loading anything: the resolver the load should use, or a :class:`ModelFileError` at once.

    Everything cached: ``resolver`` unchanged (the load asks the Hub nothing). Files missing and no way to
    fetch them (offline, or the Hub out of reach: one quick probe instead of ``huggingface_hub``'s half a
    minute of retries per file): an error naming every missing file and the command that fetches them.
    Files missing and the Hub reachable: a warning naming them (unless ``announce`` is false: a look ahead
    of a load that says it again, or a download); the load downloads them. Only optional files unknown and
    the Hub out of reach: a local-only resolver (they are skipped).
    """
    parts = list(parts)
    absent = [part for part in parts if part.local and not Path(str(part.spec.path)).exists()]
    if absent:  # a path the operator gave: no download replaces it
        listing = "; ".join(f"{part.key}={part.spec.path} (to hold {_needed(part)})" for part in absent)
        raise ModelFileError(f"--model-path points at nothing: {listing}; fix the path or drop the override")
    missing, asks_hub = cache_survey(parts, resolver)
    if not missing and not asks_hub:
        return resolver
    if resolver.offline:
        if missing:
            raise _missing_files_error(missing, parts, resolver, "offline: HF_HUB_OFFLINE or local-only mode")
        return resolver
    why = hub_unreachable()
    if why is not None:
        if missing:
            raise _missing_files_error(missing, parts, resolver, f"the Hub cannot be reached: {why}")
        log.info("the Hub cannot be reached (%s); using the cached model files only", why)
        return replace(resolver, local_files_only=True)
    if missing and announce:
        log.warning(
            "%d model files are not in the %s; downloading them now (`%s` fetches them ahead of a start): %s",
            len(missing),
            _cache_name(resolver),
            resolver.fetch_hint,
            _listing(missing),
        )
    return resolver


def _needed(part: ModelPart) -> str:
    """The files a local model part must hold, the first few named."""
    files = [need.path for need in part.needs if not need.optional]
    more = len(files) - _LISTED_PER_REPO
    return ", ".join(files[:_LISTED_PER_REPO]) + (f" and {more} more" if more > 0 else "")


def _cache_name(resolver: Resolver) -> str:
    return f"cache {resolver.cache_dir}" if resolver.cache_dir else f"HF cache {hf_constants.HF_HUB_CACHE}"


def _listing(missing: list[MissingFile]) -> str:
    """``repo (revision abc): a, b, c, d and 3 more; repo2: ...``."""
    by_repo: dict[tuple[str, str], list[str]] = {}
    for item in missing:
        by_repo.setdefault((item.repo, item.revision), []).append(item.file)
    groups = []
    for (repo, revision), files in by_repo.items():
        shown = ", ".join(files[:_LISTED_PER_REPO])
        more = len(files) - _LISTED_PER_REPO
        groups.append(f"{repo} (revision {revision[:12]}): {shown}" + (f" and {more} more" if more > 0 else ""))
    return "; ".join(groups)


def _missing_files_error(
    missing: list[MissingFile], parts: list[ModelPart], resolver: Resolver, reason: str
) -> ModelFileError:
    repos = {item.repo for item in missing}
    keys = sorted({part.key for part in parts if part.spec.repo in repos})
    return ModelFileError(
        f"{len(missing)} model files are missing from the {_cache_name(resolver)} and cannot be fetched ({reason}): "
        f"{_listing(missing)}. Fetch them with `{resolver.fetch_hint}`, or point `--model-path KEY=PATH` "
        f"(keys: {', '.join(keys)}) at local copies."
    )
