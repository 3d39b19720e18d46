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


def _positive_int(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None


def _float(text: str) -> float:
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
    sub = parser.add_subparsers(dest="command", required=True, parser_class=OneLineParser)

    gen = sub.add_parser("generate", parents=[models], help="inpaint one image and print fal-shaped JSON")
    gen.add_argument(
        "--app", required=True, help="fal-ai/fast-lightning-sdxl/inpainting or fal-ai/hyper-sdxl/inpainting"
    )
    gen.add_argument("--image", required=True, help="input image: path, http(s) URL or data URI")
    gen.add_argument("--mask", required=True, help="mask (white = repaint): path, http(s) URL or data URI")
    gen.add_argument("--prompt", required=True)
    gen.add_argument("--steps", type=_positive_int, default=None, help="num_inference_steps (default: the app's)")
    gen.add_argument("--strength", type=_float, default=None, help="in (0, 1]; default 0.95")
    gen.add_argument("--seed", type=_positive_int, default=None)
    gen.add_argument("--num-images", type=_positive_int, default=1)
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


def _add_shared(parser: argparse.ArgumentParser) -> None:
    """The options ``serve`` and ``worker`` share: the store, files, models, batching and logging."""
    parser.add_argument("--config", type=Path, help="TOML settings file (default $INPAINT_CONFIG)")
    parser.add_argument("--data-dir", type=Path, help="job store, files, keys (default $INPAINT_DATA_DIR)")
    parser.add_argument("--store", help="job store: sqlite:///PATH (default DATA_DIR/jobs.sqlite3) or postgresql://...")
    parser.add_argument(
        "--files", help="result files and uploads: a shared DIR (default DATA_DIR/files) or s3://BUCKET/PREFIX"
    )
    parser.add_argument("--lease-s", type=_float, help="seconds a worker's claim on a batch lasts unless renewed")
    parser.add_argument("--models", choices=("hub", "tiny"), help="hub (default) or tiny random-weight stand-ins")
    parser.add_argument("--device", help="cpu or cuda[:N] (default: cuda when available)")
    parser.add_argument("--config-dir", type=Path, help="app configs (default: the bundled configs/)")
    parser.add_argument("--model-path", dest="model_paths", action="append", type=_key_value, metavar="KEY=PATH")
    parser.add_argument(
        "--app", dest="apps", action="append", metavar="APP[:STEPS]", help="load only these (repeatable)"
    )
    parser.add_argument("--max-batch-size", type=int, help="most requests per GPU batch (default 4)")
    parser.add_argument(
        "--compile",
        type=_compile_flag,
        metavar="{true,false,auto}",
        help="torch.compile the UNet and VAE (default auto: on with CUDA)",
    )
    parser.add_argument("--log-level", choices=("debug", "info", "warning", "error"))


def _add_serve(sub: argparse._SubParsersAction) -> None:
    """``serve``: every option is also an INPAINT_* variable and a config-file key (see server.settings)."""
    hidden = argparse.SUPPRESS  # only what is given on the command line overrides env and config file
    srv = sub.add_parser(
        "serve",
        help="run the fal-compatible HTTP server",
        description="Serve both apps over fal's HTTP protocol. Each option can also be set as an INPAINT_* "
        "environment variable (e.g. INPAINT_PORT) or in a TOML file given with --config.",
        argument_default=hidden,
    )
    _add_shared(srv)
    srv.add_argument("--host", help="address to listen on (default 127.0.0.1; 0.0.0.0 for all)")
    srv.add_argument("--port", type=int, help="port (default 8000)")
    srv.add_argument("--devices", help="one GPU worker process per device: all, or a list such as 0,2 or cuda:0,cuda:1")
    srv.add_argument(
        "--workers", type=int, help="GPU worker processes to start (0: an API node only, workers run elsewhere)"
    )
    srv.add_argument("--node-name", help="this node's name in the store, metrics and logs (default: the host name)")
    srv.add_argument("--public-url", help="base URL clients reach this server at (default: from each request)")
    srv.add_argument("--api-key", dest="api_keys", action="append", help="accepted API key (repeatable)")
    srv.add_argument("--tls-cert", type=Path, help="PEM certificate chain (serves HTTPS with --tls-key)")
    srv.add_argument("--tls-key", type=Path, help="PEM private key")


def _add_worker(sub: argparse._SubParsersAction) -> None:
    """``worker``: a GPU worker attached to a job store (started by ``serve --devices`` or by an operator)."""
    wrk = sub.add_parser(
        "worker",
        help="run one GPU worker attached to a job store (one per GPU; serve --devices starts them for you)",
        description="Load the models on one device and run batches from the job store's queue. Settings come "
        "from the same INPAINT_* variables and config file as serve; --store and --files must be the API nodes'.",
        argument_default=argparse.SUPPRESS,
    )
    _add_shared(wrk)
    wrk.add_argument("--node-name", help="this worker's name in the store, metrics and logs (default: HOST/DEVICE)")
    wrk.add_argument(
        "--port", dest="worker_port", type=int, help="port for /health and /metrics (default 8001; 0: none)"
    )
    wrk.add_argument("--host", help="address the health port listens on (default 127.0.0.1)")


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
        "--wait", type=_float, default=0.0, metavar="SECONDS", help="keep asking this long, printing each new reason"
    )
    hc.add_argument("--timeout", type=_float, default=3.0, metavar="SECONDS", help="per request (default 3)")


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
        print(f"{PROG}: {url}{path}: {answer.message}", file=sys.stderr)
        return 1
    print(answer.message)
    return 0


def _compile_flag(text: str) -> bool | None:
    value = text.strip().lower()
    if value not in ("true", "false", "auto"):
        raise argparse.ArgumentTypeError("use true, false or auto")
    return None if value == "auto" else value == "true"


def _settings_from(args: argparse.Namespace):
    """The settings a serve or worker command line gives (over INPAINT_* variables and the config file)."""
    from .settings import SettingsError, load_settings

    overrides = {k: v for k, v in vars(args).items() if k not in ("command", "config", "verbose")}
    if "model_paths" in overrides:
        overrides["model_paths"] = dict(overrides["model_paths"])
    try:
        settings = load_settings(overrides, getattr(args, "config", None))
    except SettingsError as exc:
        _fail(str(exc), 2)
    logging.getLogger().setLevel(settings.log_level.upper())
    return settings


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
    """The spec and resolver for ``--models``/``--model-path``/``--config-dir``."""
    from pipelines.serving import resolver_for
    from pipelines.specs import load_serving_spec

    spec = load_serving_spec(args.config_dir, dict(args.model_path))
    app = getattr(args, "app", None)
    app = app[0] if isinstance(app, list) and len(app) == 1 else app
    hint = f"{PROG} download" + (f" --app {app}" if isinstance(app, str) else "")
    resolver = resolver_for(args.models, args.data_dir or default_data_dir(), args.config_dir, fetch_hint=hint)
    return spec, resolver


def _embedding(text: str):
    from pipelines import Embedding

    source, _, tokens = text.partition("::")
    data = read_source(source)
    name = Path(source).name if not source.startswith("data:") else "embedding"
    if tokens:
        return Embedding(data=data, tokens=[t.strip() for t in tokens.split(",")], name=name)
    return Embedding(data=data, name=name)


def cmd_generate(args: argparse.Namespace) -> int:
    from pipelines import InpaintRequest
    from pipelines.encode import CONTENT_TYPES, encode_image
    from pipelines.engine import Engine
    from pipelines.optimize import SpeedOptions
    from pipelines.serving import pick_device

    try:
        image = read_source(args.image)
        mask = read_source(args.mask)
        embeddings = [_embedding(args.embedding)] if args.embedding else []
    except SourceError as exc:
        _fail(str(exc), 2)
    spec, resolver = _serving(args)
    app = spec.app(args.app)
    steps = app.default_steps if args.steps is None else args.steps
    if steps not in app.variants:
        _fail(f"num_inference_steps: {app.app_id} offers {list(app.steps)}, not {steps}", 2)
    device = pick_device(args.device)
    request = InpaintRequest(
        app_id=app.app_id,
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
        variants=[(app.app_id, steps)],
        safety_checker=request.enable_safety_checker,
        prompt_expansion=request.expand_prompt,
        # One image: compiling would take longer than it saves; the other levers are free.
        speed=SpeedOptions.for_device(device, compile=False),
    )
    prepared = engine.prepare(request)
    result = engine.run([prepared], on_progress=lambda rid, i, n: log.info("step %d/%d", i, n))[0]
    if result.error is not None:
        raise result.error
    args.out.mkdir(parents=True, exist_ok=True)
    images = []
    for k, img in enumerate(result.images):
        data = encode_image(img, args.format)
        path = (args.out / f"{request.request_id}-{k}.{args.format}").resolve()
        path.write_bytes(data)
        images.append(
            {
                "url": str(path),
                "content_type": CONTENT_TYPES[args.format],
                "file_name": path.name,
                "file_size": len(data),
                "width": img.width,
                "height": img.height,
            }
        )
    return _emit(
        {
            "images": images,
            "timings": result.timings,
            "seed": result.seed,
            "has_nsfw_concepts": result.has_nsfw_concepts,
            "prompt": result.prompt,
        }
    )


def cmd_download(args: argparse.Namespace) -> int:
    from pipelines.hub import download_all

    spec, resolver = _serving(args)
    apps = [spec.app(a) for a in args.app] if args.app else None
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

    if args.command in ("generate", "download", "models"):
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
