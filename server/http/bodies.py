"""Large request bodies are handled off the event loop.

A submit may carry tens of megabytes of JSON (images as data URIs, up to ``max_body_bytes``): parsing it, writing
it to the store and hashing it for an ``Idempotency-Key`` take about a second each at 40 MB. On the event loop that
second would stall every other request, ``/health/live`` included. The app routes use :class:`OffLoopJsonRoute`,
which parses a large body in a worker thread, and :func:`off_loop_if_large` runs the work that follows (storing the
request) in one too. Small bodies stay on the loop: a thread hop would cost them more than it saves.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

from fastapi import Request, Response
from fastapi.routing import APIRoute

LARGE_BODY_BYTES = 256 * 1024  # ~2 ms of parsing: above it, the work goes to a thread
T = TypeVar("T")


class _OffLoopJsonRequest(Request):
    async def json(self) -> Any:
        if not hasattr(self, "_json"):
            body = await self.body()
            self._json = await asyncio.to_thread(json.loads, body) if is_large(body) else json.loads(body)
        return self._json


class OffLoopJsonRoute(APIRoute):
    """An ``APIRoute`` whose JSON body, when large, is parsed in a worker thread (FastAPI parses on the loop)."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()

        async def route_handler(request: Request) -> Response:
            return await handler(_OffLoopJsonRequest(request.scope, request.receive, request._send))

        return route_handler


def is_large(body: bytes) -> bool:
    return len(body) >= LARGE_BODY_BYTES


async def off_loop_if_large(request: Request, work: Callable[..., T], *args: Any) -> T:
    """``work(*args)``: in a worker thread when the request's body is large, else here on the loop."""
    if is_large(await request.body()):
        return await asyncio.to_thread(work, *args)
    return work(*args)
