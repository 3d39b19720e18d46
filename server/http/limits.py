"""Request limits: body size while it streams, input sizes at submit and per-key rate.

* :class:`BodyLimit` (ASGI middleware) answers 413 as soon as a declared ``Content-Length`` or the bytes
  received so far pass the cap, before anything parses the body, and closes the connection so the rest
  is never read. The upload routes get ``upload_max_bytes``; every other route ``max_body_bytes``.
* :class:`RequestLimits` checks a submit: ``num_images`` and ``image_size`` (422 naming the field), data
  URIs by their length (413), and the key's token bucket (429 + Retry-After). 429 is used only for this and
  a full queue (:mod:`server.jobs.queue_bound`): fal's clients retry it.
"""

from __future__ import annotations

import math
import re
import uuid
from collections.abc import Callable
from typing import Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from ..inputs.data_uris import data_uri_min_bytes
from ..inputs.input_fetch import image_size_of_json
from ..settings import Settings
from .errors import PayloadTooLarge, TooManyRequests, ValidationFailed

MULTIPART_PART = re.compile(r"^/uploads/[^/]+/[^/]+/multipart/[^/]+/[0-9]+$")  # its route caps the body itself


class BodyLimit:
    def __init__(self, app: ASGIApp, max_bytes: int, upload_max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes
        self.upload_max_bytes = upload_max_bytes

    def limit_for(self, scope: Scope) -> int | None:
        """The cap on this request's body; None where the route itself caps it (a multipart upload's part: the
        room its upload has left, so that a part past it discards the whole upload)."""
        method, path = scope["method"], scope["path"]
        if method == "PUT" and MULTIPART_PART.match(path):
            return None
        if (method == "PUT" and path.startswith("/uploads/")) or (method == "POST" and path == "/files/upload"):
            return self.upload_max_bytes
        return self.max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit = self.limit_for(scope)
        if limit is None:
            await self.app(scope, receive, send)
            return
        declared = _content_length(scope)
        if declared is not None and declared > limit:
            await _too_large(limit)(scope, receive, send)
            return
        received = 0
        exceeded = False  # the body passed the limit: the app sees a disconnect from then on
        answered = False  # ... and this middleware has answered 413 for it
        started = False  # the app began its own response

        async def limited_receive() -> Message:
            nonlocal received, exceeded, answered
            if exceeded:
                return {"type": "http.disconnect"}
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    exceeded = True
                    if not started:
                        await _too_large(limit)(scope, receive, send)
                        answered = True
                    return {"type": "http.disconnect"}
            return message

        async def guarded_send(message: Message) -> None:
            nonlocal started
            if answered:  # the app's answer to the disconnect: the client already has its 413
                return
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, limited_receive, guarded_send)
        except Exception:
            if not answered:
                raise
            # The app failed on the disconnect it was handed; the 413 has been sent.


def _content_length(scope: Scope) -> int | None:
    for name, value in scope["headers"]:
        if name == b"content-length":
            try:
                return int(value)
            except ValueError:
                return None
    return None


def _too_large(limit: int) -> Any:
    detail = f"the request body is larger than {limit} bytes; send large images as URLs or through the upload routes"
    # Connection: close, so the server stops reading the rest of the body instead of draining it.
    return PayloadTooLarge(detail, headers={"Connection": "close"}).response()


class RateLimiter:
    """A token bucket per owner: ``burst`` submits at once, refilled at ``per_minute`` per minute."""

    def __init__(self, per_minute: int, burst: int, clock: Callable[[], float]) -> None:
        self.rate = per_minute / 60.0
        self.capacity = float(burst or per_minute)
        self.clock = clock
        self._buckets: dict[str, tuple[float, float]] = {}  # owner -> (tokens, time of last update)

    @property
    def enabled(self) -> bool:
        return self.rate > 0

    def wait_time(self, owner: str) -> float:
        """Take a token for ``owner``: 0 when one was free, else the seconds until one will be (none taken)."""
        if not self.enabled:
            return 0.0
        now = self.clock()
        tokens, last = self._buckets.get(owner, (self.capacity, now))
        now = max(now, last)  # a wall clock stepping back neither adds nor takes tokens
        tokens = min(self.capacity, tokens + (now - last) * self.rate)
        if tokens >= 1.0:
            self._buckets[owner] = (tokens - 1.0, now)
            return 0.0
        self._buckets[owner] = (tokens, now)
        return (1.0 - tokens) / self.rate


class RequestLimits:
    def __init__(self, settings: Settings, clock: Callable[[], float]) -> None:
        self.settings = settings
        self.rate = RateLimiter(settings.rate_limit_per_minute, settings.rate_limit_burst, clock)

    def check_input(self, payload: dict[str, Any]) -> None:
        s = self.settings
        n = payload.get("num_images", 1)
        if isinstance(n, int) and n > s.max_num_images:
            raise _invalid("num_images", f"at most {s.max_num_images} images per request on this server, got {n}")
        if payload.get("image_size") is not None:
            width, height = image_size_of_json(payload["image_size"])
            if width * height > s.max_output_pixels:
                raise _invalid(
                    "image_size",
                    f"{width}x{height} is {width * height} pixels; this server makes at most {s.max_output_pixels}",
                )
        sources = [("image_url", payload.get("image_url")), ("mask_url", payload.get("mask_url"))]
        sources += [(f"embeddings.{i}.path", e.get("path")) for i, e in enumerate(payload.get("embeddings") or [])]
        for field, value in sources:
            if isinstance(value, str) and value.startswith("data:") and data_uri_min_bytes(value) > s.input_max_bytes:
                raise PayloadTooLarge(f"{field}: the data URI holds more than {s.input_max_bytes} bytes")

    def check_rate(self, owner: str) -> None:
        """Take one of ``owner``'s tokens, or refuse with 429 and the seconds until the next one."""
        wait = self.rate.wait_time(owner)
        if wait > 0:
            raise TooManyRequests(
                f"rate limit of {self.settings.rate_limit_per_minute} requests per minute for this key; "
                f"retry in {math.ceil(wait)} s",
                wait,
            )


def _invalid(field: str, message: str) -> ValidationFailed:
    return ValidationFailed(field, message, request_id=str(uuid.uuid4()))
