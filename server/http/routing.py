"""How one port answers fal's several hosts: the JS proxy protocol, ``queue.`` hosts and ``/rest``.

* ``/api/fal/proxy`` (any method): the request is re-dispatched, inside this process, to the route
  the ``x-fal-target-url`` header names: ``fal.run`` -> sync run, ``queue.fal.run`` -> ``/queue``,
  ``rest.fal.ai`` / ``rest.alpha.fal.ai`` -> the storage emulation and ``/tokens/``. The answer is exactly the
  direct route's (status, JSON, SSE, headers).
* A ``Host`` starting with ``queue.`` is the queue host: its paths are served as ``/queue/...``.
* ``/rest/...`` is the REST host for clients that rewrite ``https://rest.fal.ai/`` to ``<base>/rest/``.
"""

from __future__ import annotations

import json
from urllib.parse import urlsplit

from starlette.types import ASGIApp, Receive, Scope, Send

PROXY_PATHS = ("/api/fal/proxy", "/api/fal/proxy/")
TARGET_HEADER = b"x-fal-target-url"
QUEUE_PREFIX_KEY = "inpaint.queue_prefix"
# Served as they are on every host (a queue host's file URLs, health checks...).
NOT_QUEUE_PATHS = (
    "/files/",
    "/uploads/",
    "/storage/",
    "/health/",
    "/metrics",
    "/docs",
    "/redoc",
    "/openapi.json",
    "/.well-known/",
    "/ui/",
)
REST_HOSTS = ("rest.fal.ai", "rest.alpha.fal.ai")
REST_PATHS = ("/storage/", "/tokens")  # of the REST hosts, only storage and temporary tokens are served here
_TARGETS = {"fal.run": "", "queue.fal.run": "/queue", "rest.fal.ai": "", "rest.alpha.fal.ai": ""}


class FalRouting:
    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path: str = scope["path"]
        headers = dict(scope["headers"])
        if path in PROXY_PATHS:
            target = headers.get(TARGET_HEADER)
            if target is None:
                await _reject(send, "the proxy needs the x-fal-target-url header")
                return
            parts = urlsplit(target.decode("latin-1"))
            prefix = _TARGETS.get((parts.hostname or "").lower())
            if parts.scheme != "https" or prefix is None:
                await _reject(send, f"proxy target {target.decode('latin-1')!r} is not a fal URL this server answers")
                return
            if parts.hostname in REST_HOSTS and not (parts.path or "").startswith(REST_PATHS):
                await _reject(send, f"proxy target {parts.path!r} on {parts.hostname} is not served here")
                return
            new_path = prefix + (parts.path or "/")
            scope = {
                **scope,
                "path": new_path,
                "raw_path": new_path.encode(),
                "query_string": parts.query.encode(),
                QUEUE_PREFIX_KEY: "/queue",
            }
        elif path.startswith("/rest/"):
            scope = {**scope, "path": path[len("/rest") :], "raw_path": path[len("/rest") :].encode()}
        else:
            host = headers.get(b"host", b"").decode("latin-1").lower()
            if host.startswith("queue.") and path != "/" and not path.startswith(("/queue/", *NOT_QUEUE_PATHS)):
                scope = {**scope, "path": "/queue" + path, "raw_path": ("/queue" + path).encode(), QUEUE_PREFIX_KEY: ""}
        await self.app(scope, receive, send)


async def _reject(send: Send, detail: str) -> None:
    body = json.dumps({"detail": detail, "error_type": "bad_request", "message": detail}).encode()
    await send(
        {
            "type": "http.response.start",
            "status": 400,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode()),
                (b"x-fal-error-type", b"bad_request"),
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})
