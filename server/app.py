"""The FastAPI app factory: ``create_app(settings, engine=..., clock=...)``.

Tests build the real app with tiny real models; production builds it from settings and loads the
engine in the background (``/health/ready`` is 503 until it is loaded and warm).
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

import httpx
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, PlainTextResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.middleware.cors import CORSMiddleware

from pipelines.specs import load_serving_spec

from . import __version__
from .api import fal_router
from .auth import KeyAuth
from .engine_host import EngineHost
from .errors import ERROR_TYPE_HEADER, ApiError, NotFound, StoreDown, error_response
from .fetch import FetchGuard, HostResolver, resolve_host
from .files import FileStore
from .limits import BodyLimit
from .metrics import Metrics
from .redact import public_message
from .responses import JWKS, READY
from .routing import FalRouting
from .service import JobService
from .settings import Settings
from .storage import UploadTokens, storage_router
from .store import StoreUnavailable, open_store
from .webhooks import WebhookSender, WebhookSigner

log = logging.getLogger("inpaint-server")

CORS_EXPOSE = ["x-fal-request-id", "x-fal-request-timeout-type", "x-fal-error-type"]
IMAGE_TYPES = {"jpeg": "image/jpeg", "jpg": "image/jpeg", "png": "image/png"}


async def _prime_routes(app: FastAPI) -> None:
    """FastAPI builds the routes of included routers on the first request that walks them (~80 ms here,
    paid by the first user request: reliability case R18). One in-process request for a path that no
    route matches walks them all at start instead; one call into anyio's worker threads loads its
    backend, which the first route with a sync dependency would otherwise import."""
    import anyio.to_thread
    import httpx

    await anyio.to_thread.run_sync(lambda: None)
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://prime.invalid") as client:
        await client.get("/.well-known/inpaint-server/prime-routes")


def create_app(
    settings: Settings,
    engine: Any = None,
    engine_loader: Callable[[], Any] | None = None,
    clock: Callable[[], float] = time.time,
    webhook_transport: httpx.AsyncBaseTransport | None = None,
    fetch_resolver: HostResolver | None = None,
    exit_process: Callable[[int], None] | None = None,
) -> FastAPI:
    """The server. Give ``engine`` (loaded) or ``engine_loader`` (called on a thread at start);
    with neither, the engine is loaded from ``settings`` (``models``, ``device``, ``apps``...).
    ``fetch_resolver`` replaces DNS for user URLs (tests: fake names, DNS rebinding).
    ``exit_process(status)`` ends the process after a GPU fault (default ``os._exit``; tests record it)."""
    spec = load_serving_spec(settings.config_dir, settings.model_paths)
    apps = list(spec.apps.values())
    data_dir = settings.data_dir
    data_dir.mkdir(parents=True, exist_ok=True)
    store = open_store(settings.store, data_dir)
    files = FileStore(data_dir)
    metrics = Metrics()
    auth = KeyAuth(settings.api_keys)
    signer = None
    if settings.webhook_signing:
        signer = WebhookSigner(settings.webhook_key_file or data_dir / "webhook-ed25519.pem")
    fetch_guard = FetchGuard(
        settings.fetch_allow, fetch_resolver or resolve_host, resolve_timeout_s=settings.fetch_connect_timeout_s
    )
    webhooks = WebhookSender(
        store,
        metrics,
        signer,
        max_attempts=settings.webhook_max_attempts,
        retry_base_s=settings.webhook_retry_base_s,
        retry_max_s=settings.webhook_retry_max_s,
        timeout_s=settings.webhook_timeout_s,
        clock=clock,
        transport=webhook_transport,
        guard=fetch_guard,
    )
    if engine is None and engine_loader is None:
        engine_loader = _default_loader(settings)
    host = EngineHost(engine=engine, loader=engine_loader, warmup=settings.warmup, warmup_sizes=settings.warmup_sizes)
    service = JobService(
        settings, store, files, host, metrics, webhooks, clock=clock, fetch_guard=fetch_guard, exit_process=exit_process
    )

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        if not auth.enabled:
            log.warning("no API keys configured: anyone who can reach this port can use the server (set --api-key)")
        host.start()
        await service.start()
        webhooks.start()
        await _prime_routes(app)
        try:
            yield
        finally:
            host.stop()
            await service.stop()
            await webhooks.stop()
            store.close()

    app = FastAPI(
        title="inpaint-server",
        version=__version__,
        description="Self-hosted, fal-compatible few-step SDXL inpainting.",
        redirect_slashes=False,
        lifespan=lifespan,
    )
    app.state.settings = settings
    app.state.service = service
    app.state.store = store
    app.state.host = host
    app.state.metrics = metrics
    app.state.webhooks = webhooks

    # Called on SIGTERM by `inpaint-server serve` (server.draining.DrainingServer) before uvicorn shuts down.
    def drain() -> Any:
        host.stop()  # no more background warm-up: the GPU finishes the running batch and stops
        return service.drain(settings.drain_grace_s)

    app.state.drain = drain

    def owner_of(request: Request) -> str:
        return auth.owner(request.headers.get("authorization"))

    def base_url_of(request: Request) -> str:
        if settings.public_url:
            return settings.public_url
        host_header = request.headers.get("host") or f"{settings.host}:{settings.port}"
        return f"{request.url.scheme}://{host_header}"

    _install_error_handlers(app)

    @app.get("/health/live", tags=["operations"])
    async def live() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/health/ready", tags=["operations"], responses=READY)
    async def ready() -> JSONResponse:
        metrics.ready.set(1 if host.ready and not service.draining else 0)
        if service.draining:
            return JSONResponse({"status": "draining", "detail": "the server is shutting down"}, status_code=503)
        if host.ready:
            body: dict[str, Any] = {"status": "ready"}
            if host.warming_later:  # other sizes still being warmed: they run, a little slower until done
                body["warming"] = {"runs_left": host.warming_later}
            return JSONResponse(body)
        body = {"status": host.state, "detail": public_message(host.error or f"models are {host.state}")}
        return JSONResponse(body, status_code=503)

    @app.get("/metrics", tags=["operations"], response_class=PlainTextResponse)
    async def prometheus() -> Response:
        metrics.ready.set(1 if host.ready and not service.draining else 0)
        return Response(metrics.render(), media_type=CONTENT_TYPE_LATEST)

    @app.get("/.well-known/jwks.json", tags=["operations"], responses=JWKS)
    async def jwks() -> dict[str, Any]:
        if signer is None:
            raise NotFound("webhook signing is off")
        return signer.jwks()

    @app.get("/files/{request_id}/{name}", include_in_schema=False)
    async def result_file(request_id: str, name: str) -> FileResponse:
        path = files.served_result(request_id, name)  # symlinks resolved: only files the server wrote there
        media = IMAGE_TYPES.get(name.rpartition(".")[2].lower())
        if path is None or media is None:
            raise NotFound("no such file")
        if not service.files_live(request_id, name):
            raise NotFound("no such file (expired)")
        return FileResponse(path, media_type=media, headers={"X-Content-Type-Options": "nosniff"})

    tokens = UploadTokens(data_dir / "upload-secret.key")
    app.include_router(
        storage_router(
            store, files, tokens, owner_of, base_url_of, settings.upload_max_bytes, settings.result_retention_s, clock
        )
    )
    app.include_router(fal_router(service, apps, owner_of, base_url_of))

    # Innermost of the three: it sees the path FalRouting rewrote (proxy, queue host, /rest).
    app.add_middleware(BodyLimit, max_bytes=settings.max_body_bytes, upload_max_bytes=settings.upload_max_bytes)
    app.add_middleware(FalRouting)
    app.add_middleware(
        CORSMiddleware,
        allow_origins=settings.cors_origins,
        allow_methods=["GET", "POST", "PUT", "OPTIONS"],
        allow_headers=["*"],
        expose_headers=CORS_EXPOSE,
    )
    return app


def _install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ApiError)
    async def api_error(request: Request, exc: ApiError) -> JSONResponse:
        return exc.response()

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        detail = []
        for err in exc.errors():
            item = {k: v for k, v in err.items() if k in ("loc", "msg", "type", "input", "ctx", "url")}
            if "ctx" in item:
                item["ctx"] = {k: str(v) for k, v in item["ctx"].items()}
            detail.append(item)
        # A request id even for a refused request: the JS client reports it as error.requestId.
        return error_response(422, {"detail": _jsonable(detail)}, "invalid_input", str(uuid.uuid4()))

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        kind = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
        return JSONResponse(
            {"detail": exc.detail, "error_type": kind, "message": str(exc.detail)},
            status_code=exc.status_code,
            headers={ERROR_TYPE_HEADER: kind},
        )

    @app.exception_handler(StoreUnavailable)
    async def store_down(request: Request, exc: StoreUnavailable) -> JSONResponse:
        log.warning("%s %s: %s", request.method, request.url.path, exc)
        return StoreDown().response()

    @app.exception_handler(Exception)
    async def unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error on %s %s", request.method, request.url.path)
        return JSONResponse(
            {"detail": "internal server error", "error_type": "internal_error", "message": "internal server error"},
            status_code=500,
            headers={ERROR_TYPE_HEADER: "internal_error"},
        )


def _jsonable(value: Any) -> Any:
    from fastapi.encoders import jsonable_encoder

    return jsonable_encoder(value)


def _default_loader(settings: Settings) -> Callable[[], Any]:
    """Builds the engine the settings describe, in the engine's thread (``pipelines.serving``: torch stays there)."""
    from pipelines.serving import EngineSettings, build_engine

    config = EngineSettings.of(settings)
    return lambda: build_engine(config)
