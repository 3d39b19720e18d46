"""The FastAPI app factory: ``create_app(settings, engine=..., clock=...)``.

Tests build the real app with tiny real models; production builds it from settings and loads the
engine in the background (``/health/ready`` is 503 until it is loaded and warm).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import time
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.middleware.cors import CORSMiddleware

from pipelines.specs import load_serving_spec

from . import __version__
from .delivery.file_store import FilesUnavailable, file_response
from .delivery.webhooks import WebhookSender, WebhookSigner, new_key_pem
from .disk_space import watch_disks
from .http.access_tokens import AccessTokens
from .http.auth import Auth, KeyAuth
from .http.docs import add_offline_docs
from .http.errors import (
    ERROR_TYPE_HEADER,
    ApiError,
    FilesDown,
    InsufficientStorage,
    NotFound,
    StoreDown,
    UnexpectedErrors,
    error_response,
    unexpected_error_response,
    validation_errors_body,
)
from .http.fal_routes import fal_router
from .http.health import add_health_routes, engine_readiness
from .http.limits import BodyLimit
from .http.openapi_responses import JWKS
from .http.playground import add_playground
from .http.request_list import request_list_router
from .http.routing import FalRouting
from .http.token_routes import token_router
from .http.upload_routes import UploadTokens, storage_router
from .inputs.url_guard import FetchGuard, HostResolver, resolve_host
from .jobs.nodes import Node
from .jobs.service import JobService
from .jobs.store import JobStore, StoreFull, StoreUnavailable
from .jobs.store.base import NodeRow, this_host
from .jobs.supervisor import WorkerSupervisor
from .metrics import Metrics
from .redact import public_message
from .settings import Settings
from .worker_app import build_gpu_lane, open_stores

log = logging.getLogger("inpaint-server")

CORS_EXPOSE = ["x-fal-request-id", "x-fal-request-timeout-type", "x-fal-error-type"]
IMAGE_TYPES = {"jpeg": "image/jpeg", "jpg": "image/jpeg", "png": "image/png"}


PRIME_PATH = "/.well-known/inpaint-server/prime-routes"


async def _prime_routes(app: FastAPI) -> None:
    """FastAPI builds the routes of included routers on the first request that walks them (~80 ms here,
    paid by the first user request: reliability case R18). One in-process request for a path that no
    route matches walks them all at start instead; one call into anyio's worker threads loads its
    backend, which the first route with a sync dependency would otherwise import. The request is a bare
    ASGI call, not an HTTP client's, so nothing logs it as if it went out on the network."""
    import anyio.to_thread

    await anyio.to_thread.run_sync(lambda: None)
    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "GET",
        "scheme": "http",
        "path": PRIME_PATH,
        "raw_path": PRIME_PATH.encode(),
        "query_string": b"",
        "root_path": "",
        "headers": [(b"host", b"localhost")],
        "client": ("127.0.0.1", 0),
        "server": ("127.0.0.1", 0),
    }

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: dict[str, Any]) -> None:  # the 404 is not needed, only the walk
        pass

    await app(scope, receive, send)


def create_app(
    settings: Settings,
    engine: Any = None,
    engine_loader: Callable[[], Any] | None = None,
    clock: Callable[[], float] = time.time,
    webhook_transport: httpx.AsyncBaseTransport | None = None,
    fetch_resolver: HostResolver | None = None,
    exit_process: Callable[[int], None] | None = None,
) -> FastAPI:
    """The server (an API node). Its GPU worker runs in this process when ``engine`` (loaded) or
    ``engine_loader`` (called on a thread at start) is given, or by default (loaded from ``settings``:
    ``models``, ``device``, ``apps``...); ``devices`` or ``workers`` start worker processes instead, and
    ``workers = 0`` none (they run elsewhere: ``inpaint-server worker``). ``fetch_resolver`` replaces DNS for
    user URLs (tests: fake names, DNS rebinding). ``exit_process(status)`` ends the process after a GPU fault
    (default ``os._exit``; tests record it)."""
    spec = load_serving_spec(settings.config_dir, settings.model_paths)
    apps = list(spec.apps.values())
    data_dir = settings.data_dir
    store, files = open_stores(settings)
    disk = watch_disks(store, files, settings.disk_reserve_bytes)
    metrics = Metrics()
    auth = Auth(KeyAuth(settings.api_keys), AccessTokens(store.shared_key("access-tokens", _new_key)), clock)
    fetch_guard = FetchGuard(
        settings.fetch_allow, fetch_resolver or resolve_host, resolve_timeout_s=settings.fetch_connect_timeout_s
    )
    embedded = engine is not None or engine_loader is not None or settings.embedded_worker
    node = Node(store, settings.node_name or this_host(), "api+worker" if embedded else "api", settings.lease_s, clock)
    signer = _webhook_signer(settings, store) if settings.webhook_signing else None
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
        claimant=node.id,
    )
    host = worker = supervisor = lane = None
    if embedded:
        lane = build_gpu_lane(
            settings, store, files, metrics, node, clock, fetch_guard, engine, engine_loader, exit_process, disk
        )
        host, worker = lane.host, lane.worker
        node.row.device = settings.device
    elif settings.workers != 0:
        supervisor = WorkerSupervisor(settings, node.row.name)
    service = JobService(settings, store, files, metrics, webhooks, node, clock, fetch_guard, worker, host, disk)
    if lane is not None:
        lane.leases.on_terminal = service.terminal_written
        node.state_of = lambda: "draining" if service.draining else host.state
    else:
        node.state_of = lambda: "draining" if service.draining else "ready"
    metrics.export_workers(lambda: live_nodes(service), settings.lease_s)
    store.subscribe(webhooks.wake_threadsafe)  # a terminal state another node wrote may carry a webhook

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        if not auth.enabled:
            log.warning("no API keys configured: anyone who can reach this port can use the server (set --api-key)")
        if host is not None:
            host.start()
        node.register()
        await service.start()
        webhooks.start()
        heartbeat = asyncio.create_task(node.run(), name="heartbeat")
        disk_watch = asyncio.create_task(disk.run(), name="disk-space")
        if supervisor is not None:
            supervisor.start()
        await _prime_routes(app)
        try:
            yield
        finally:
            if supervisor is not None:
                await supervisor.stop()
            if host is not None:
                host.stop()
            await service.stop()
            await webhooks.stop()
            heartbeat.cancel()
            disk_watch.cancel()
            node.deregister()
            store.close()
            files.close()

    app = FastAPI(
        title="inpaint-server",
        version=__version__,
        description="Self-hosted, fal-compatible few-step SDXL inpainting.",
        redirect_slashes=False,
        lifespan=lifespan,
        docs_url=None,  # add_offline_docs serves /docs and /redoc
        redoc_url=None,
    )
    add_offline_docs(app)
    if settings.playground:
        add_playground(app, settings)
    app.state.settings = settings
    app.state.service = service
    app.state.store = store
    app.state.files = files
    app.state.host = host
    app.state.node = node
    app.state.metrics = metrics
    app.state.webhooks = webhooks
    app.state.supervisor = supervisor

    # Called on SIGTERM by `inpaint-server serve` (server.http.draining.DrainingServer) before uvicorn shuts down.
    async def drain() -> bool:
        if host is not None:
            host.stop()  # no more background warm-up: the GPU finishes the running batch and stops
        if supervisor is not None:
            supervisor.drain()
        return await service.drain(settings.drain_grace_s)

    app.state.drain = drain

    def owner_of(request: Request) -> str:
        return auth.caller(request).owner

    def base_url_of(request: Request) -> str:
        if settings.public_url:
            return settings.public_url
        host_header = request.headers.get("host") or f"{settings.host}:{settings.port}"
        return f"{request.url.scheme}://{host_header}"

    _install_error_handlers(app)
    _add_operations(app, service, signer)

    @app.get("/files/{request_id}/{name}", include_in_schema=False)
    async def result_file(request_id: str, name: str) -> Response:
        media = IMAGE_TYPES.get(name.rpartition(".")[2].lower())
        if media is None:
            raise NotFound("no such file")
        if not service.files_live(request_id, name):
            raise NotFound("no such file (or expired)")
        body = await asyncio.to_thread(files.open_result, request_id, name)  # a directory: no symlinks followed
        if body is None:
            raise NotFound("no such file")
        return file_response(body, media, {"X-Content-Type-Options": "nosniff"})

    tokens = UploadTokens(store.shared_key("upload-tokens", lambda: _legacy_key(data_dir / "upload-secret.key")))
    app.include_router(
        storage_router(
            store,
            files,
            tokens,
            owner_of,
            base_url_of,
            settings.upload_max_bytes,
            settings.result_retention_s,
            clock,
            disk,
        )
    )
    app.include_router(
        token_router(auth.tokens, auth.caller, [a.app_id for a in apps], settings.token_max_lifetime_s, clock)
    )
    app.include_router(request_list_router(service, auth.caller))
    app.include_router(fal_router(service, apps, auth.caller, base_url_of))

    # Innermost: an unexpected exception answers 500 and the kept-alive connection stays usable.
    app.add_middleware(UnexpectedErrors)
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


def _add_operations(app: FastAPI, service: JobService, signer: WebhookSigner | None) -> None:
    """``/health/live``, ``/health/ready``, ``/metrics`` and the webhook keys."""

    def refresh_gauges() -> None:
        with contextlib.suppress(StoreUnavailable):
            service.update_gauges()

    add_health_routes(app, lambda: readiness(service), service.metrics, refresh_gauges)

    @app.get("/.well-known/jwks.json", tags=["operations"], responses=JWKS)
    async def jwks() -> dict[str, Any]:
        if signer is None:
            raise NotFound("webhook signing is off")
        return signer.jwks()


def readiness(service: JobService) -> tuple[int, dict[str, Any]]:
    """/health/ready: 200 when this node can do its part. An API node: the store answers. With its worker in this
    process: the models are loaded and warm too. The body lists the workers the store knows."""
    if service.draining:
        return 503, {"status": "draining", "detail": "the server is shutting down"}
    try:
        service.store.ping()
        workers = _workers(service)
    except StoreUnavailable as exc:
        return 503, {"status": "store_unavailable", "detail": public_message(str(exc))}
    if service.disk is not None and service.disk.problem is not None:
        return 503, {"status": "insufficient_storage", "detail": service.disk.problem, "workers": workers}
    body: dict[str, Any] = {"status": "ready", "workers": workers}
    return engine_readiness(service.host, body) if service.host is not None else (200, body)


def _workers(service: JobService) -> list[dict[str, Any]]:
    now = service.clock()
    return [
        {"name": n.name, "device": n.device, "state": n.state, "host": n.host}
        for n in live_nodes(service)
        if n.is_worker and n.heartbeat_at >= now - service.settings.lease_s
    ]


def live_nodes(service: JobService) -> list[NodeRow]:
    """The store's node rows, this node's own as it is now (its row is only written every heartbeat, so a
    worker in this process that just became ready would otherwise show as loading for a few seconds)."""
    node = service.node
    if node.row.device is None and service.host is not None and service.host.ready:
        node.row.device = str(getattr(service.host.engine, "device", "") or "") or None
    return service.live_nodes()


def _webhook_signer(settings: Settings, store: JobStore) -> WebhookSigner:
    """The Ed25519 key webhooks are signed with: ``webhook_key_file`` if set, else the store's (one key for every
    API node; a key file an earlier version left in the data directory becomes it)."""
    if settings.webhook_key_file is not None:
        return WebhookSigner.from_file(settings.webhook_key_file)
    legacy = settings.data_dir / "webhook-ed25519.pem"
    pem = store.shared_key("webhook-ed25519", lambda: legacy.read_bytes() if legacy.is_file() else new_key_pem())
    return WebhookSigner.from_pem(pem, "the job store's webhook key")


def _new_key() -> bytes:
    return secrets.token_bytes(32)


def _legacy_key(path: Path) -> bytes:
    """A secret an earlier version kept in the data directory (so its tokens stay valid), or a new one."""
    return path.read_bytes() if path.is_file() else secrets.token_bytes(32)


def _install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ApiError)
    async def api_error(request: Request, exc: ApiError) -> JSONResponse:
        return exc.response()

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        # A request id even for a refused request: the JS client reports it as error.requestId.
        body = _jsonable(validation_errors_body(list(exc.errors())))
        return error_response(422, body, "invalid_input", str(uuid.uuid4()))

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        kind = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
        return JSONResponse(
            {"detail": exc.detail, "error_type": kind, "message": str(exc.detail)},
            status_code=exc.status_code,
            headers={ERROR_TYPE_HEADER: kind},
        )

    @app.exception_handler(StoreFull)
    async def store_full(request: Request, exc: StoreFull) -> JSONResponse:
        log.warning("%s %s: %s", request.method, request.url.path, exc)
        return InsufficientStorage(f"{public_message(str(exc))}; retry once space is freed").response()

    @app.exception_handler(StoreUnavailable)
    async def store_down(request: Request, exc: StoreUnavailable) -> JSONResponse:
        log.warning("%s %s: %s", request.method, request.url.path, exc)
        return StoreDown().response()

    @app.exception_handler(FilesUnavailable)
    async def files_down(request: Request, exc: FilesUnavailable) -> JSONResponse:
        log.warning("%s %s: %s", request.method, request.url.path, exc)
        return FilesDown().response()

    @app.exception_handler(Exception)
    async def unexpected(request: Request, exc: Exception) -> JSONResponse:
        # Only for an error outside UnexpectedErrors (in a middleware): Starlette raises it again after this
        # answer and uvicorn then drops the connection, so the answer says so.
        log.exception("unhandled error on %s %s", request.method, request.url.path)
        response = unexpected_error_response()
        response.headers["Connection"] = "close"
        return response


def _jsonable(value: Any) -> Any:
    from fastapi.encoders import jsonable_encoder

    return jsonable_encoder(value)
