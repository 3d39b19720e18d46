"""``inpaint-server``: one-shot generation, model download and tiny offline models.

stdout carries only the command's result (the fal-shaped JSON for ``generate``); logs and progress
bars go to stderr. A bad argument exits with status 2 and one line on stderr.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import sys
import uuid
from pathlib import Path
from typing import NoReturn

from . import __version__
from .inputs.data_uris import SourceError, read_source
from .inputs.image_sizes import parse_image_size

PROG = "inpaint-server"
log = logging.getLogger(PROG)


class OneLineParser(argparse.ArgumentParser):
    """argparse, but a usage error is a single line on stderr."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{PROG}: error: {message} (see {self.prog} --help)\n")


def default_data_dir() -> Path:
    env = os.environ.get("INPAINT_DATA_DIR")
    if env:
        return Path(env).expanduser()
    base = os.environ.get("XDG_DATA_HOME") or Path.home() / ".local" / "share"
    return Path(base) / "inpaint-server"


def _key_value(text: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    if not sep or not key or not value:
        raise argparse.ArgumentTypeError(f"expected KEY=PATH, got {text!r}")
    return key, value


def int_arg(text: str) -> int:
    """An argparse type: an integer, or a one-line usage error."""
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None


def float_arg(text: str) -> float:
    """An argparse type: a number, or a one-line usage error."""
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None


def _image_size(text: str) -> tuple[int, int]:
    try:
        return parse_image_size(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def build_parser() -> argparse.ArgumentParser:
    models = OneLineParser(add_help=False)
    models.add_argument("--data-dir", type=Path, default=None, help="data directory (default $INPAINT_DATA_DIR)")
    models.add_argument(
        "--models",
        choices=("hub", "tiny"),
        default="hub",
        help="hub: the real weights from the Hugging Face cache; tiny: tiny random-weight stand-ins "
        "(generated under the data directory on first use)",
    )
    models.add_argument("--config-dir", type=Path, default=None, help="app configs (default: the bundled configs/)")
    models.add_argument(
        "--model-path",
        action="append",
        type=_key_value,
        default=[],
        metavar="KEY=PATH",
        help="use a local file or folder instead of the Hub (keys: base, vae, safety_checker, "
        "prompt_expansion, APP:STEPS such as fast-lightning-sdxl:4)",
    )
    models.add_argument("-v", "--verbose", action="store_true", help="debug logging on stderr")

    parser = OneLineParser(prog=PROG, description="Self-hosted few-step SDXL inpainting, fal-compatible.")
    parser.add_argument("--version", action="version", version=f"{PROG} {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=OneLineParser)

    gen = sub.add_parser("generate", parents=[models], help="inpaint one image and print fal-shaped JSON")
    gen.add_argument(
        "--app", required=True, help="fal-ai/fast-lightning-sdxl/inpainting or fal-ai/hyper-sdxl/inpainting"
    )
    gen.add_argument("--image", required=True, help="input image: path, http(s) URL or data URI")
    gen.add_argument("--mask", required=True, help="mask (white = repaint): path, http(s) URL or data URI")
    gen.add_argument("--prompt", required=True)
    gen.add_argument("--steps", type=int_arg, default=None, help="num_inference_steps (default: the app's)")
    gen.add_argument("--strength", type=float_arg, default=None, help="in (0, 1]; default 0.95")
    gen.add_argument("--seed", type=int_arg, default=None)
    gen.add_argument("--num-images", type=int_arg, default=1)
    gen.add_argument("--image-size", type=_image_size, default=None, help="preset (square_hd, ...) or WxH")
    gen.add_argument("--format", choices=("jpeg", "png"), default="jpeg")
    gen.add_argument("--out", type=Path, default=Path("."), help="folder for the images (default: .)")
    gen.add_argument("--device", default=None, help="cpu or cuda[:N] (default: cuda when available)")
    gen.add_argument("--no-safety-checker", action="store_true", help="enable_safety_checker = false")
    gen.add_argument("--expand-prompt", action="store_true")
    gen.add_argument(
        "--embedding",
        default=None,
        metavar="SOURCE[::TOKENS]",
        help="textual inversion safetensors (path, URL or data URI), optional comma-separated tokens after '::'",
    )

    dl = sub.add_parser("download", parents=[models], help="pre-fetch every model file into the HF cache")
    dl.add_argument("--app", action="append", default=None, help="only this app (repeatable; default: all)")

    _add_serve(sub)
    _add_worker(sub)
    _add_health(sub)

    mdl = sub.add_parser("models", help="model utilities")
    msub = mdl.add_subparsers(dest="models_command", required=True, parser_class=OneLineParser)
    tiny = msub.add_parser("make-tiny", help="write tiny random-weight stand-ins as an HF cache in DIR")
    tiny.add_argument("dir", type=Path)
    tiny.add_argument("--config-dir", type=Path, default=None)
    return parser


def _add_serve(sub: argparse._SubParsersAction) -> None:
    """``serve``: one option per setting (server.settings, generated by server.cli_flags)."""
    from .cli_flags import HelpFormatter, add_settings_flags

    srv = sub.add_parser(
        "serve",
        formatter_class=HelpFormatter,
        help="run the fal-compatible HTTP server",
        description="Serve both apps over fal's HTTP protocol. Each option is also an INPAINT_* environment "
        "variable (shown in brackets), a file named after it in $INPAINT_SECRETS_DIR, and a key of the TOML file "
        "given with --config; the command line wins, then the environment, the secrets and the file.",
        argument_default=argparse.SUPPRESS,  # only what is given on the command line overrides the rest
    )
    srv.add_argument("--config", type=Path, metavar="PATH", help="TOML settings file (default $INPAINT_CONFIG)")
    add_settings_flags(srv)


def _add_worker(sub: argparse._SubParsersAction) -> None:
    """``worker``: a GPU worker attached to a job store (started by ``serve --devices`` or by an operator)."""
    from .cli_flags import WORKER_ALIASES, WORKER_SKIP, HelpFormatter, add_settings_flags

    wrk = sub.add_parser(
        "worker",
        formatter_class=HelpFormatter,
        help="run one GPU worker attached to a job store (one per GPU; serve --devices starts them for you)",
        description="Load the models on one device and run batches from the job store's queue. Settings come "
        "from the same INPAINT_* variables and config file as serve; --store and --files must be the API nodes'. "
        "--port is the worker's own /health and /metrics port (worker_port).",
        argument_default=argparse.SUPPRESS,
    )
    wrk.add_argument("--config", type=Path, metavar="PATH", help="TOML settings file (default $INPAINT_CONFIG)")
    add_settings_flags(wrk, skip=WORKER_SKIP, aliases=WORKER_ALIASES)


def _add_health(sub: argparse._SubParsersAction) -> None:
    hc = sub.add_parser(
        "health",
        help="ask a running server on this host whether it is live (or --ready); exit 0 if so, else 1 with why",
        description="The container's HEALTHCHECK, and a wait-until-ready for scripts. The URL comes from the "
        "same settings as serve (INPAINT_PORT, INPAINT_TLS_CERT, INPAINT_CONFIG...) unless --url is given.",
    )
    hc.add_argument("--ready", action="store_true", help="check /health/ready (models loaded and warm), not live")
    hc.add_argument("--url", help="the server's base URL (default: loopback, port and scheme from the settings)")
    hc.add_argument(
        "--wait",
        type=float_arg,
        default=0.0,
        metavar="SECONDS",
        help="keep asking this long, printing each new reason (stops at once if the models failed to load)",
    )
    hc.add_argument("--timeout", type=float_arg, default=3.0, metavar="SECONDS", help="per request (default 3)")


def cmd_health(args: argparse.Namespace) -> int:
    from .healthcheck import LIVE, READY, local_url, wait
    from .settings import SettingsError, load_settings

    url = args.url
    if url is None:
        try:
            url = local_url(load_settings())
        except SettingsError as exc:
            _fail(str(exc), 2)
    path = READY if args.ready else LIVE

    def report(message: str) -> None:
        print(f"{PROG}: not {'ready' if args.ready else 'live'} yet: {message}", file=sys.stderr, flush=True)

    answer = wait(url, path, timeout=args.timeout, wait_s=args.wait, report=report)
    if not answer.ok:
        verdict = "cannot become ready: " if answer.final else ""
        print(f"{PROG}: {url}{path}: {verdict}{answer.message}", file=sys.stderr)
        return 1
    print(answer.message)
    return 0


def _settings_from(args: argparse.Namespace):
    """The settings a serve or worker command line gives (over INPAINT_* variables and the config file)."""
    from .cli_flags import settings_overrides
    from .settings import SettingsError, load_settings

    try:
        settings = load_settings(settings_overrides(args), getattr(args, "config", None))
    except SettingsError as exc:
        _fail(str(exc), 2)
    _check_apps(settings)
    logging.getLogger().setLevel(settings.log_level.upper())
    return settings


def _check_apps(settings) -> None:
    """An unknown app or step count in ``apps`` is a bad argument (status 2), found before anything starts."""
    from pipelines.errors import ConfigError
    from pipelines.serving import served_variants
    from pipelines.specs import load_serving_spec

    spec = load_serving_spec(settings.config_dir, settings.model_paths)  # a broken config folder: status 1
    try:
        served_variants(spec, settings.apps)
    except ConfigError as exc:
        _fail(f"invalid settings:\n  apps: {exc} (--apps, INPAINT_APPS or 'apps' in the config file)", 2)


def cmd_worker(args: argparse.Namespace) -> int:
    from .worker_app import run_worker

    settings = _settings_from(args)
    _quiet_model_libraries()
    return run_worker(settings)


def cmd_serve(args: argparse.Namespace) -> int:
    from .app import create_app
    from .http.connections import slow_client_protocol
    from .http.draining import run as run_server

    settings = _settings_from(args)
    if settings.embedded_worker:
        _quiet_model_libraries()  # an API node or a supervisor never imports the model libraries
    app = create_app(settings)
    scheme = settings.scheme
    log.info("listening on %s://%s:%d (data in %s)", scheme, settings.host, settings.port, settings.data_dir)
    run_server(
        app,
        host=settings.host,
        port=settings.port,
        ssl_certfile=str(settings.tls_cert) if settings.tls_cert else None,
        ssl_keyfile=str(settings.tls_key) if settings.tls_key else None,
        log_config=None,
        log_level=settings.log_level,
        http=slow_client_protocol(settings.header_timeout_s, settings.body_timeout_s, settings.min_body_rate),
        # SIGTERM drains first (the running batch gets drain_grace_s); this is only for the connections
        # still open after that, such as status streams of queued requests.
        timeout_graceful_shutdown=5,
    )
    return 0


def _fail(message: str, code: int = 1) -> NoReturn:
    print(f"{PROG}: error: {message}", file=sys.stderr)
    raise SystemExit(code)


def _setup_logging(verbose: bool) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        stream=sys.stderr,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )


def _quiet_model_libraries() -> None:
    from pipelines.serving import quiet_model_libraries

    quiet_model_libraries()


def _serving(args: argparse.Namespace):
    """The spec, the apps ``--app`` names (checked first: an unknown one exits 2 before any model work; None
    for all) and the resolver for ``--models``/``--model-path``/``--config-dir``."""
    from pipelines.serving import download_command, resolver_for
    from pipelines.specs import load_serving_spec

    spec = load_serving_spec(args.config_dir, dict(args.model_path))
    names = args.app if isinstance(args.app, list) else [args.app] if args.app else []
    apps = [_app(spec, name) for name in names] or None
    hint = download_command(names, args.config_dir)
    resolver = resolver_for(args.models, args.data_dir or default_data_dir(), args.config_dir, fetch_hint=hint)
    return spec, apps, resolver


def _app(spec, name: str):
    """The app ``--app`` names; an unknown one is a bad argument (status 2)."""
    from pipelines.errors import ConfigError

    try:
        return spec.app(name)
    except ConfigError as exc:
        _fail(f"--app: {exc}", 2)


def _embedding(text: str):
    from pipelines import Embedding

    source, _, tokens = text.partition("::")
    data = read_source(source)
    name = Path(source).name if not source.startswith("data:") else "embedding"
    if tokens:
        return Embedding(data=data, tokens=[t.strip() for t in tokens.split(",")], name=name)
    return Embedding(data=data, name=name)


def cmd_generate(args: argparse.Namespace) -> int:
    from pipelines.hub import check_model_files, model_parts

    try:
        image = read_source(args.image)
        mask = read_source(args.mask)
        embeddings = [_embedding(args.embedding)] if args.embedding else []
    except SourceError as exc:
        _fail(str(exc), 2)
    spec, apps, resolver = _serving(args)
    app = apps[0]
    steps = app.default_steps if args.steps is None else args.steps
    if steps not in app.variants:
        _fail(f"num_inference_steps: {app.app_id} offers {list(app.steps)}, not {steps}", 2)
    # Missing model files fail before torch and diffusers are even imported (seconds on a small machine).
    parts = model_parts(spec, [app.variants[steps]], not args.no_safety_checker, args.expand_prompt)
    resolver = check_model_files(parts, resolver, announce=False)  # Engine.load says what it downloads
    _quiet_model_libraries()
    result, request_id = _generate(args, spec, resolver, app.app_id, steps, image, mask, embeddings)
    for warning in result.warnings:
        print(f"{PROG}: WARN {warning}", file=sys.stderr, flush=True)
    return _emit(
        {
            "images": _write_images(result.images, args.out, args.format, request_id),
            "timings": result.timings,
            "seed": result.seed,
            "has_nsfw_concepts": result.has_nsfw_concepts,
            "prompt": result.prompt,
        }
    )


def _generate(args: argparse.Namespace, spec, resolver, app_id: str, steps: int, image, mask, embeddings):
    """Load the one variant ``generate`` needs and run its request: the result (errors raised) and its id."""
    from pipelines import InpaintRequest
    from pipelines.engine import Engine
    from pipelines.optimize import SpeedOptions
    from pipelines.serving import pick_device

    device = pick_device(args.device)
    request = InpaintRequest(
        app_id=app_id,
        image=image,
        mask=mask,
        prompt=args.prompt,
        steps=steps,
        strength=args.strength,
        seed=args.seed,
        num_images=args.num_images,
        image_size=args.image_size,
        embeddings=embeddings,
        enable_safety_checker=not args.no_safety_checker,
        expand_prompt=args.expand_prompt,
        request_id=uuid.uuid4().hex,
    )
    engine = Engine.load(
        spec,
        device=device,
        resolver=resolver,
        variants=[(app_id, steps)],
        safety_checker=request.enable_safety_checker,
        prompt_expansion=request.expand_prompt,
        # One image: compiling would take longer than it saves; the other levers are free.
        speed=SpeedOptions.for_device(device, compile=False),
    )
    prepared = engine.prepare(request)
    result = engine.run([prepared], on_progress=lambda rid, i, n: log.info("step %d/%d", i, n))[0]
    if result.error is not None:
        raise result.error
    return result, request.request_id


def _write_images(images: list, out: Path, fmt: str, request_id: str) -> list[dict]:
    """Encode and write each image under ``out``; fal's image objects with local paths as URLs."""
    from pipelines.encode import CONTENT_TYPES, encode_image

    out.mkdir(parents=True, exist_ok=True)
    written = []
    for k, img in enumerate(images):
        data = encode_image(img, fmt)
        path = (out / f"{request_id}-{k}.{fmt}").resolve()
        path.write_bytes(data)
        written.append(
            {
                "url": str(path),
                "content_type": CONTENT_TYPES[fmt],
                "file_name": path.name,
                "file_size": len(data),
                "width": img.width,
                "height": img.height,
            }
        )
    return written


def cmd_download(args: argparse.Namespace) -> int:
    from pipelines.hub import download_all

    spec, apps, resolver = _serving(args)
    paths = download_all(spec, apps, resolver)
    log.info("%d model files/folders present", len(paths))
    return _emit({"files": sorted({str(p) for p in paths})})


def cmd_make_tiny(args: argparse.Namespace) -> int:
    from pipelines.tiny import make_tiny_models

    path = make_tiny_models(args.dir, config_dir=args.config_dir)
    return _emit({"cache_dir": str(Path(path).resolve())})


_result_stream = sys.stdout


def _emit(payload: dict) -> int:
    print(json.dumps(payload, indent=2), file=_result_stream)
    _result_stream.flush()
    return 0


def main(argv: list[str] | None = None) -> int:
    global _result_stream
    args = build_parser().parse_args(argv)
    _result_stream = sys.stdout
    if args.command == "health":  # runs every few seconds beside the server: no logging set-up, no torch
        return cmd_health(args)
    _setup_logging(getattr(args, "verbose", False))
    from pipelines.errors import ConfigError, EngineError, InputError, ModelFileError

    from .jobs.store import StoreUnavailable

    if args.command == "models":  # generate quiets them once its model files are known to be there
        _quiet_model_libraries()
    handlers = {"generate": cmd_generate, "download": cmd_download, "serve": cmd_serve, "worker": cmd_worker}
    handler = cmd_make_tiny if args.command == "models" else handlers[args.command]
    try:
        # Libraries sometimes print; keep stdout for the result alone.
        with contextlib.redirect_stdout(sys.stderr):
            return handler(args)
    except InputError as exc:
        _fail(str(exc), 2)
    except (ModelFileError, ConfigError) as exc:
        _fail(str(exc), 1)
    except EngineError as exc:
        _fail(f"{exc.error_type}: {exc}", 1)
    except StoreUnavailable as exc:  # at start: PostgreSQL out of reach, or the disk of the SQLite store full
        _fail(str(exc), 3)


if __name__ == "__main__":
    sys.exit(main())
