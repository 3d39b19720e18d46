"""What the server needs of the engine, and how an engine is built from the server's settings.

The server (``server/``) never imports torch: it talks to an engine through :class:`ServingEngine`,
and gets one from :func:`build_engine` (run in the engine's own thread, or its own process), given
any object with the settings' attribute names (:class:`EngineSettings` lists them).
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

from .types import InpaintRequest, InpaintResult

ShouldStop = Callable[[str], bool]
# on_progress(request_id, step, total); for a request with ``previews`` a 4th argument, the step's StepPreview.
OnProgress = Callable[..., None]


@runtime_checkable
class ServingEngine(Protocol):
    """The engine as the server uses it (``pipelines.engine.Engine`` is one; tests pass fakes)."""

    device: Any
    max_batch_rows: int

    def prepare(self, request: InpaintRequest) -> Any:
        """Decode and check one request's inputs (host work, any thread); raises ``InputError``."""
        ...

    def batch_key(self, request: Any) -> Hashable:
        """Prepared requests with equal keys can share one GPU batch."""
        ...

    def run(
        self, requests: Sequence[Any], should_stop: ShouldStop | None = None, on_progress: OnProgress | None = None
    ) -> list[InpaintResult]:
        """Run prepared requests on the GPU thread, one result per request."""
        ...


@dataclass(frozen=True)
class EngineSettings:
    """The server settings that shape the engine (the same names as ``server.settings.Settings``)."""

    data_dir: Path
    models: str = "hub"
    config_dir: Path | None = None
    model_paths: dict[str, str] = field(default_factory=dict)
    apps: list[str] = field(default_factory=list)
    device: str | None = None
    compile: bool | None = None
    compile_mode: str = "default"
    cuda_graphs: bool | None = None
    attention: str = "auto"
    fp8: bool = False
    fp8_max_error: float = 0.05
    compile_cache_dir: Path | None = None
    prompt_cache_size: int = 512

    @classmethod
    def of(cls, settings: Any) -> EngineSettings:
        """Take these fields from any settings object (``server.settings.Settings``)."""
        return cls(**{f.name: getattr(settings, f.name) for f in fields(cls) if hasattr(settings, f.name)})


def quiet_model_libraries() -> None:
    """diffusers and transformers: errors only, no progress bars (the server logs its own progress)."""
    from diffusers.utils import logging as dlog
    from transformers.utils import logging as tlog

    for lib in (dlog, tlog):
        lib.set_verbosity_error()
        lib.disable_progress_bar()


def pick_device(requested: str | None) -> str:
    """``requested``, or cuda when a GPU is there, else cpu."""
    if requested:
        return requested
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def resolver_for(models: str, data_dir: Path, config_dir: Path | None = None, fetch_hint: str | None = None) -> Any:
    """Where model files come from: the HF cache (``hub``), or tiny stand-ins generated under the data
    directory (``tiny``)."""
    from .hub import Resolver

    if models == "tiny":
        from .tiny import ensure_tiny_models

        cache = ensure_tiny_models(data_dir, config_dir=config_dir)
        return Resolver(cache_dir=cache, local_files_only=True, fetch_hint=f"inpaint-server models make-tiny {cache}")
    return Resolver(fetch_hint=fetch_hint or "inpaint-server download")


def download_command(apps: Sequence[str] = (), config_dir: Path | None = None) -> str:
    """The command that fetches the model files of ``apps`` (``APP`` or ``APP:STEPS`` items; every app when
    empty), for messages about missing files."""
    names = dict.fromkeys(item.partition(":")[0] for item in apps)
    words = ["inpaint-server download", *(f"--app {name}" for name in names)]
    if config_dir is not None:
        words.append(f"--config-dir {config_dir}")
    return " ".join(words)


def served_variants(spec: Any, apps: list[str]) -> list[tuple[str, int]] | None:
    """``APP`` or ``APP:STEPS`` items as (app id, steps); None (every variant) when empty. A
    :class:`~pipelines.errors.ConfigError` names an unknown app or step count."""
    if not apps:
        return None
    from .errors import ConfigError

    variants: list[tuple[str, int]] = []
    for item in apps:
        name, _, steps = item.partition(":")
        app = spec.app(name)
        if not steps:
            variants += [(app.app_id, n) for n in app.steps]
        elif steps.isdigit() and int(steps) in app.variants:
            variants.append((app.app_id, int(steps)))
        else:
            raise ConfigError(f"{item!r}: {app.app_id} offers {list(app.steps)} steps, not {steps!r}")
    return variants


def build_engine(config: EngineSettings) -> Any:
    """Load the engine the settings describe (weights, speed levers, prompt cache): minutes on a cold GPU."""
    from .hub import check_model_files, model_parts
    from .specs import load_serving_spec

    spec = load_serving_spec(config.config_dir, config.model_paths)
    hint = download_command(config.apps, config.config_dir)
    resolver = resolver_for(config.models, config.data_dir, config.config_dir, fetch_hint=hint)
    variants = served_variants(spec, config.apps)
    every = [v for app in spec.apps.values() for v in app.variants.values()]
    chosen = [spec.app(a).variants[n] for a, n in variants] if variants else every
    # Missing files fail before torch is imported; Engine.load looks again and says what it downloads.
    resolver = check_model_files(model_parts(spec, chosen), resolver, announce=False)

    from .engine import Engine
    from .optimize import SpeedOptions

    device = pick_device(config.device)
    speed = SpeedOptions.for_device(
        device,
        compile=config.compile,
        cache_dir=config.compile_cache_dir or config.data_dir / "compile-cache",
        compile_mode=None if config.compile_mode == "default" else config.compile_mode,
        attention=config.attention,
        fp8=config.fp8,
        fp8_max_error=config.fp8_max_error,
    )
    if config.cuda_graphs is not None:
        speed = replace(speed, cuda_graphs=config.cuda_graphs and speed.compile)
    return Engine.load(
        spec,
        device=device,
        resolver=resolver,
        variants=variants,
        speed=speed,
        prompt_cache_size=config.prompt_cache_size,
    )
