"""``inpaint-server worker``: a GPU worker in a process of its own, attached to a job store.

It loads and warms the engine for one device, then runs batches from the store's queue (the same
:class:`~server.jobs.worker.GpuWorker` as the embedded default), so it can run on this host next to the API
(``serve --devices``) or on another host sharing a PostgreSQL store. On ``worker_port`` it answers
``/health/live``, ``/health/ready`` (200 once the weights are loaded and warm, 503 with the reason otherwise)
and ``/metrics``. SIGTERM drains it: no new batch, the running one gets ``drain_grace_s``, then it exits 0.
A fatal GPU error or a hung GPU exits it with status 75 for a supervisor to restart; the store's other
nodes take its batch back and run it again.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

from fastapi import FastAPI

from . import __version__
from .delivery.file_store import FileStore, open_files
from .disk_space import DiskSpace, watch_disks
from .http.docs import add_offline_docs
from .http.health import add_health_routes, engine_readiness
from .inputs.input_fetch import InputFetcher
from .inputs.url_guard import FetchGuard, HostResolver, resolve_host
from .jobs.engine_host import EngineHost
from .jobs.leases import Leases
from .jobs.nodes import Node
from .jobs.store import JobStore, StoreUnavailable, open_store
from .jobs.store.base import this_host
from .jobs.worker import GpuWorker
from .metrics import Metrics
from .redact import public_message
from .settings import Settings

log = logging.getLogger("inpaint-server.worker")


@dataclass
class GpuLane:
    """A node's GPU worker and what it runs on: the engine's host, the input fetcher, its leases."""

    host: EngineHost
    fetcher: InputFetcher
    leases: Leases
    worker: GpuWorker


def build_gpu_lane(
    settings: Settings,
    store: JobStore,
    files: FileStore,
    metrics: Metrics,
    node: Node,
    clock: Callable[[], float],
    guard: FetchGuard,
    engine: Any = None,
    engine_loader: Callable[[], Any] | None = None,
    exit_process: Callable[[int], None] | None = None,
    disk: DiskSpace | None = None,
) -> GpuLane:
    """The GPU worker of a node (a worker process, or the embedded default's API process), holding leases as
    ``node``; the engine is ``engine``, or built by ``engine_loader`` (default: from the settings). While ``disk``
    says a disk is full, it starts no new batch."""
    if engine is None and engine_loader is None:
        engine_loader = default_loader(settings)
    host = EngineHost(engine=engine, loader=engine_loader, warmup=settings.warmup, warmup_sizes=settings.warmup_sizes)
    fetcher = InputFetcher(
        files,
        settings.input_max_bytes,
        settings.input_timeout_s,
        guard=guard,
        connect_timeout_s=settings.fetch_connect_timeout_s,
        retry_base_s=settings.fetch_retry_base_s,
    )
    leases = Leases(store, node.id, settings.lease_s, settings.result_retention_s, clock, metrics)
    worker = GpuWorker(leases, host, fetcher, files, settings, metrics, exit_process, disk)
    node.stats = worker.stats.as_dict
    return GpuLane(host, fetcher, leases, worker)


def open_stores(settings: Settings) -> tuple[JobStore, FileStore]:
    """The job store and the file store the settings name (the data directory made if missing)."""
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    return open_store(settings.store, settings.data_dir), open_files(settings.files, settings.data_dir)


def default_loader(settings: Settings) -> Callable[[], Any]:
    """Builds the engine the settings describe, in the engine's thread (``pipelines.serving``: torch stays there)."""
    from pipelines.serving import EngineSettings, build_engine

    config = EngineSettings.of(settings)
    return lambda: build_engine(config)


def create_worker_app(
    settings: Settings,
    engine: Any = None,
    engine_loader: Callable[[], Any] | None = None,
    clock: Callable[[], float] = time.time,
    fetch_resolver: HostResolver | None = None,
    exit_process: Callable[[int], None] | None = None,
) -> FastAPI:
    """A worker process's app: the GPU lane in its lifespan, health and metrics as routes."""
    store, files = open_stores(settings)
    disk = watch_disks(store, files, settings.disk_reserve_bytes)
    metrics = Metrics()
    from pipelines.serving import pick_device  # a worker process imports torch anyway

    device = pick_device(settings.device)
    node = Node(store, settings.node_name or f"{this_host()}/{device}", "worker", settings.lease_s, clock)
    node.row.device = device
    guard = FetchGuard(
        settings.fetch_allow, fetch_resolver or resolve_host, resolve_timeout_s=settings.fetch_connect_timeout_s
    )
    parts = build_gpu_lane(
        settings, store, files, metrics, node, clock, guard, engine, engine_loader, exit_process, disk
    )
    host, fetcher, worker = parts.host, parts.fetcher, parts.worker
    node.state_of = lambda: "draining" if worker.draining else host.state

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        host.start()
        node.register()
        worker.start()
        heartbeat = asyncio.create_task(node.run(), name="heartbeat")
        disk_watch = asyncio.create_task(disk.run(), name="disk-space")
        log.info("worker %s (device %s) attached to the job store", node.id, device or "auto")
        try:
            yield
        finally:
            host.stop()
            await worker.stop()
            heartbeat.cancel()
            disk_watch.cancel()
            await fetcher.close()
            node.deregister()
            store.close()
            files.close()

    app = FastAPI(
        title="inpaint-server worker",
        version=__version__,
        lifespan=lifespan,
        redirect_slashes=False,
        docs_url=None,  # add_offline_docs serves /docs and /redoc
        redoc_url=None,
    )
    add_offline_docs(app)
    app.state.settings = settings
    app.state.worker = worker
    app.state.host = host
    app.state.node = node
    app.state.store = store

    async def drain() -> bool:
        host.stop()
        return await worker.drain(settings.drain_grace_s)

    app.state.drain = drain

    def readiness() -> tuple[int, dict[str, Any]]:
        body: dict[str, Any] = {"status": "ready", "node": node.id, "device": device}
        if worker.draining:
            return 503, {**body, "status": "draining", "detail": "the worker is shutting down"}
        try:
            store.ping()
        except StoreUnavailable as exc:
            return 503, {**body, "status": "store_unavailable", "detail": public_message(str(exc))}
        if disk.problem is not None:
            return 503, {**body, "status": "insufficient_storage", "detail": disk.problem}
        return engine_readiness(host, body)

    add_health_routes(app, readiness, metrics)
    return app


def run_worker(settings: Settings) -> int:
    """Run a worker until SIGTERM (drained) or a second signal; with ``worker_port`` 0, without HTTP."""
    app = create_worker_app(settings)
    if settings.worker_port:
        from .http.draining import run as run_server

        run_server(app, host=settings.host, port=settings.worker_port, log_config=None, log_level=settings.log_level)
        return 0
    asyncio.run(_headless(app))
    return 0


async def _headless(app: FastAPI) -> None:
    """The app's lifespan without a web server: runs until SIGTERM or SIGINT, which drain first."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    signals = 0

    def on_signal() -> None:
        nonlocal signals
        signals += 1
        stop.set()
        if signals > 1:  # a second signal: stop now (the running batch runs again elsewhere)
            raise SystemExit(1)

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, on_signal)
    async with app.router.lifespan_context(app):
        await stop.wait()
        log.info("signal received: draining (send it again to stop at once)")
        with contextlib.suppress(Exception):
            await app.state.drain()
