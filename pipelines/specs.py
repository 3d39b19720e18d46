"""What is served: the app specs in ``configs/`` (one TOML file per app, plus ``engine.toml``).

Every model file is named by a Hugging Face repo, a pinned revision and a file name, and can be
overridden with a local path (``path = ...`` in the TOML, or ``--model-path KEY=PATH`` on the CLI).
"""

from __future__ import annotations

import os
import tomllib
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

from .errors import ConfigError

CheckpointKind = Literal["unet", "lora"]
ScheduleRule = Literal["trailing", "tcd", "fixed"]
SCHEDULER_CLASSES = ("EulerDiscreteScheduler", "LCMScheduler", "TCDScheduler")
ENGINE_FILE = "engine.toml"


@dataclass(frozen=True)
class RepoSpec:
    """A model folder on the Hub (diffusers/transformers layout), or a local folder laid out the same."""

    repo: str
    revision: str
    variant: str | None = None
    path: Path | None = None

    @property
    def key(self) -> tuple[str, str, str | None, str | None]:
        """Identity used to share one loaded copy between apps and variants."""
        return (self.repo, self.revision, self.variant, str(self.path) if self.path else None)


@dataclass(frozen=True)
class CheckpointSpec:
    """One safetensors file: a full SDXL UNet state dict or a LoRA fused onto the base UNet."""

    repo: str
    revision: str
    file: str
    kind: CheckpointKind
    lora_scale: float = 1.0
    path: Path | None = None

    @property
    def key(self) -> tuple[str, str, str, str, float, str | None]:
        return (self.repo, self.revision, self.file, self.kind, self.lora_scale, str(self.path) if self.path else None)


@dataclass(frozen=True)
class VariantSpec:
    """One (app, step count) variant: the weights, the scheduler and how timesteps are chosen."""

    app_id: str
    app_name: str
    steps: int
    base: RepoSpec
    vae: RepoSpec
    checkpoint: CheckpointSpec
    scheduler_class: str
    scheduler_options: tuple[tuple[str, Any], ...]
    schedule: ScheduleRule
    fixed_timesteps: tuple[int, ...] = ()
    eta: float | None = None

    @property
    def override_key(self) -> str:
        return f"{self.app_name}:{self.steps}"


@dataclass(frozen=True)
class AppSpec:
    app_id: str
    name: str
    default_steps: int
    default_strength: float
    variants: dict[int, VariantSpec]
    unified_lora: bool = False
    source: str = ""

    @property
    def steps(self) -> tuple[int, ...]:
        return tuple(sorted(self.variants))


@dataclass(frozen=True)
class ExpansionSpec:
    model: RepoSpec
    max_new_tokens: int = 48
    top_k: int = 50


@dataclass(frozen=True)
class EngineSpec:
    """Components shared by every app, and engine-wide settings."""

    safety_checker: RepoSpec
    prompt_expansion: ExpansionSpec
    work_pixels: int = 1024 * 1024


@dataclass(frozen=True)
class ServingSpec:
    apps: dict[str, AppSpec]
    engine: EngineSpec
    overrides: dict[str, str] = field(default_factory=dict)

    def app(self, app_id: str) -> AppSpec:
        """The app with this fal id (``fal-ai/hyper-sdxl/inpainting``) or short name (``hyper-sdxl``)."""
        for spec in self.apps.values():
            if app_id in (spec.app_id, spec.name):
                return spec
        known = ", ".join(sorted(self.apps))
        raise ConfigError(f"unknown app {app_id!r}; this server serves: {known}")


def default_config_dir() -> Path:
    """``$INPAINT_CONFIG_DIR`` if set, else the ``configs/`` shipped with the package."""
    env = os.environ.get("INPAINT_CONFIG_DIR")
    if env:
        return Path(env)
    source_tree = Path(__file__).resolve().parent.parent / "configs"
    if source_tree.is_dir():  # running from a checkout
        return source_tree
    # Installed wheel: configs/ ships as the data folder pipelines/configs (a namespace package, so
    # importlib.resources would hand back a MultiplexedPath rather than a real path).
    return Path(__file__).resolve().parent / "configs"


def _table(doc: dict[str, Any], key: str, where: str) -> dict[str, Any]:
    value = doc.get(key)
    if not isinstance(value, dict):
        raise ConfigError(f"{where}: missing table [{key}]")
    return value


def _str(table: dict[str, Any], key: str, where: str) -> str:
    value = table.get(key)
    if not isinstance(value, str) or not value:
        raise ConfigError(f"{where}: '{key}' must be a non-empty string")
    return value


def _repo(table: dict[str, Any], where: str) -> RepoSpec:
    path = table.get("path")
    return RepoSpec(
        repo=_str(table, "repo", where),
        revision=_str(table, "revision", where),
        variant=table.get("variant"),
        path=Path(path).expanduser() if path else None,
    )


def _checkpoint(table: dict[str, Any], where: str) -> CheckpointSpec:
    kind = table.get("kind")
    if kind not in ("unet", "lora"):
        raise ConfigError(f"{where}: checkpoint kind must be 'unet' or 'lora', not {kind!r}")
    file = _str(table, "file", where)
    if not file.endswith(".safetensors"):
        raise ConfigError(f"{where}: only .safetensors checkpoints are loaded, not {file!r}")
    path = table.get("path")
    return CheckpointSpec(
        repo=_str(table, "repo", where),
        revision=_str(table, "revision", where),
        file=file,
        kind=kind,
        lora_scale=float(table.get("lora_scale", 1.0)),
        path=Path(path).expanduser() if path else None,
    )


def _variant(app: dict[str, Any], table: dict[str, Any], steps: int, where: str) -> VariantSpec:
    base = _repo(table.get("base") or _table(app, "base", where), f"{where} base")
    vae = _repo(table.get("vae") or _table(app, "vae", where), f"{where} vae")
    checkpoint = _checkpoint(_table(table, "checkpoint", where), f"{where} checkpoint")
    scheduler = dict(_table(table, "scheduler", where))
    scheduler_class = scheduler.pop("class", None)
    if scheduler_class not in SCHEDULER_CLASSES:
        raise ConfigError(f"{where}: scheduler class must be one of {SCHEDULER_CLASSES}, not {scheduler_class!r}")
    schedule = table.get("schedule")
    if schedule not in ("trailing", "tcd", "fixed"):
        raise ConfigError(f"{where}: schedule must be 'trailing', 'tcd' or 'fixed', not {schedule!r}")
    fixed = tuple(int(t) for t in table.get("timesteps", ()))
    if schedule == "fixed" and len(fixed) != steps:
        raise ConfigError(f"{where}: schedule 'fixed' needs exactly {steps} timesteps, got {list(fixed)}")
    if schedule == "tcd" and scheduler_class != "TCDScheduler":
        raise ConfigError(f"{where}: schedule 'tcd' needs scheduler class TCDScheduler")
    eta = table.get("eta")
    return VariantSpec(
        app_id=_str(app, "app_id", where),
        app_name=_str(app, "name", where),
        steps=steps,
        base=base,
        vae=vae,
        checkpoint=checkpoint,
        scheduler_class=scheduler_class,
        scheduler_options=tuple(sorted(scheduler.items())),
        schedule=schedule,
        fixed_timesteps=fixed,
        eta=float(eta) if eta is not None else None,
    )


def parse_app(doc: dict[str, Any], source: str = "<app>") -> AppSpec:
    """Build an :class:`AppSpec` from one parsed app TOML document."""
    steps_table = _table(doc, "steps", source)
    try:
        step_counts = sorted(int(k) for k in steps_table)
    except ValueError as exc:
        raise ConfigError(f"{source}: [steps.N] keys must be integers") from exc
    unified = bool(doc.get("unified_lora", False))
    variants: dict[int, VariantSpec] = {}
    for n in step_counts:
        if unified:
            table = _table(doc, "unified", source)
            variants[n] = _variant(doc, table, n, f"{source} [unified] for {n} steps")
        else:
            variants[n] = _variant(doc, steps_table[str(n)], n, f"{source} [steps.{n}]")
    default_steps = int(doc.get("default_steps", step_counts[0]))
    if default_steps not in variants:
        raise ConfigError(f"{source}: default_steps {default_steps} is not one of {step_counts}")
    return AppSpec(
        app_id=_str(doc, "app_id", source),
        name=_str(doc, "name", source),
        default_steps=default_steps,
        default_strength=float(doc.get("default_strength", 0.95)),
        variants=variants,
        unified_lora=unified,
        source=source,
    )


def parse_engine(doc: dict[str, Any], source: str = ENGINE_FILE) -> EngineSpec:
    expansion = _table(doc, "prompt_expansion", source)
    work_pixels = int(doc.get("work_pixels", 1024 * 1024))
    if work_pixels < 64 * 64:
        raise ConfigError(f"{source}: work_pixels must be at least 4096, got {work_pixels}")
    return EngineSpec(
        safety_checker=_repo(_table(doc, "safety_checker", source), f"{source} [safety_checker]"),
        prompt_expansion=ExpansionSpec(
            model=_repo(expansion, f"{source} [prompt_expansion]"),
            max_new_tokens=int(expansion.get("max_new_tokens", 48)),
            top_k=int(expansion.get("top_k", 50)),
        ),
        work_pixels=work_pixels,
    )


def _read(path: Path) -> dict[str, Any]:
    try:
        with path.open("rb") as fh:
            return tomllib.load(fh)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: {exc}") from exc


def override_keys(spec: ServingSpec) -> list[str]:
    """Every key accepted by ``--model-path KEY=PATH``."""
    keys = ["base", "vae", "safety_checker", "prompt_expansion"]
    for app in spec.apps.values():
        keys += [v.override_key for v in app.variants.values()]
    return keys


def apply_overrides(spec: ServingSpec, overrides: dict[str, str | Path]) -> ServingSpec:
    """Point components at local paths.

    Keys: ``base`` / ``vae`` / ``safety_checker`` / ``prompt_expansion`` (folders laid out like the
    Hub repo) and ``APP:STEPS`` such as ``fast-lightning-sdxl:4`` (one ``.safetensors`` file).
    """
    if not overrides:
        return spec
    unknown = sorted(set(overrides) - set(override_keys(spec)))
    if unknown:
        raise ConfigError(
            f"unknown --model-path key(s) {', '.join(unknown)}; valid keys: {', '.join(override_keys(spec))}"
        )
    paths = {k: Path(v).expanduser() for k, v in overrides.items()}
    apps = {}
    for app_id, app in spec.apps.items():
        variants = {}
        for n, v in app.variants.items():
            base = replace(v.base, path=paths["base"]) if "base" in paths else v.base
            vae = replace(v.vae, path=paths["vae"]) if "vae" in paths else v.vae
            ckpt = v.checkpoint
            if v.override_key in paths:
                ckpt = replace(ckpt, path=paths[v.override_key])
            variants[n] = replace(v, base=base, vae=vae, checkpoint=ckpt)
        apps[app_id] = replace(app, variants=variants)
    engine = spec.engine
    if "safety_checker" in paths:
        engine = replace(engine, safety_checker=replace(engine.safety_checker, path=paths["safety_checker"]))
    if "prompt_expansion" in paths:
        model = replace(engine.prompt_expansion.model, path=paths["prompt_expansion"])
        engine = replace(engine, prompt_expansion=replace(engine.prompt_expansion, model=model))
    merged = {**spec.overrides, **{k: str(v) for k, v in paths.items()}}
    return ServingSpec(apps=apps, engine=engine, overrides=merged)


def load_serving_spec(
    config_dir: Path | str | None = None, overrides: dict[str, str | Path] | None = None
) -> ServingSpec:
    """Read every app TOML and ``engine.toml`` from ``config_dir`` (default: :func:`default_config_dir`)."""
    directory = Path(config_dir) if config_dir else default_config_dir()
    if not directory.is_dir():
        raise ConfigError(f"config directory {directory} does not exist")
    apps: dict[str, AppSpec] = {}
    engine: EngineSpec | None = None
    for path in sorted(directory.glob("*.toml")):
        doc = _read(path)
        if path.name == ENGINE_FILE:
            engine = parse_engine(doc, str(path))
            continue
        app = parse_app(doc, str(path))
        if app.app_id in apps:
            raise ConfigError(f"{path}: app {app.app_id} is defined twice")
        apps[app.app_id] = app
    if engine is None:
        raise ConfigError(f"{directory}: missing {ENGINE_FILE}")
    if not apps:
        raise ConfigError(f"{directory}: no app configs (*.toml) found")
    return apply_overrides(ServingSpec(apps=apps, engine=engine), overrides or {})
