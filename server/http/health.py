"""The operations routes every process serves (``/health/live``, ``/health/ready``, ``/metrics``), and the part of
readiness that is the engine's, shared by the API app and the worker app."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from fastapi import FastAPI
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST

from ..jobs.engine_host import EngineHost
from ..metrics import Metrics
from ..redact import public_message
from .openapi_responses import READY

Readiness = Callable[[], tuple[int, dict[str, Any]]]


def engine_readiness(host: EngineHost, body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
    """``body`` as this process's engine leaves it: 503 with the reason until the models are loaded and warm (or
    after they failed), else 200, saying how many background warm-up runs are left (other sizes run meanwhile,
    a little slower until done)."""
    if not host.ready:
        return 503, {**body, "status": host.state, "detail": public_message(host.error or f"models are {host.state}")}
    if host.warming_later:
        body = {**body, "warming": {"runs_left": host.warming_later}}
    return 200, body


def add_health_routes(
    app: FastAPI, readiness: Readiness, metrics: Metrics, before_scrape: Callable[[], None] = lambda: None
) -> None:
    """``/health/live`` (the process answers), ``/health/ready`` (``readiness()``) and ``/metrics`` (after
    ``before_scrape()`` refreshed what is read at scrape time), with the ``inpaint_ready`` gauge kept current."""

    @app.get("/health/live", tags=["operations"])
    async def live() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/health/ready", tags=["operations"], responses=READY)
    async def ready() -> JSONResponse:
        status, body = readiness()
        metrics.ready.set(1 if status == 200 else 0)
        return JSONResponse(body, status_code=status)

    @app.get("/metrics", tags=["operations"], response_class=PlainTextResponse)
    async def prometheus() -> Response:
        metrics.ready.set(1 if readiness()[0] == 200 else 0)
        before_scrape()
        return Response(metrics.render(), media_type=CONTENT_TYPE_LATEST)
