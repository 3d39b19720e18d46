"""Every error the server answers with, mapped to HTTP status, ``error_type`` and headers in one place.

Route bodies raise :class:`ApiError` subclasses; the handlers in :mod:`server.app` turn them into
JSON. Status codes that make fal's clients retry (408, 409, 429, 502-504) are never used for
permanent failures; 504 appears only for the user's own start timeout, marked so clients do not retry.
"""

from __future__ import annotations

import logging
import math
import re
from typing import Any, ClassVar

from fastapi.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

log = logging.getLogger("inpaint-server")

REQUEST_ID_HEADER = "x-fal-request-id"
ERROR_TYPE_HEADER = "X-Fal-Error-Type"
TIMEOUT_TYPE_HEADER = "X-Fal-Request-Timeout-Type"

# Engine and job error types -> HTTP status of the stored result.
STATUS_FOR_ERROR_TYPE = {
    "invalid_input": 422,
    "input_fetch_error": 422,
    "input_fetch_timeout": 422,
    "cancelled": 499,
    "request_timeout": 504,
    "draining": 503,
    "interrupted": 500,
    "nan_output": 500,
    "insufficient_storage": 507,  # the result could not be written: the disk was full
    "gpu_oom": 500,  # not 503/504: clients retry those, and the same request would run out of memory again
    "engine_error": 500,
    "engine_unavailable": 500,
    "model_file_error": 500,
    "config_error": 500,
    "internal_error": 500,
}


class ApiError(Exception):
    """An error answered as ``{"detail", "error_type"}`` with ``X-Fal-Error-Type``."""

    status = 500
    error_type = "internal_error"

    def __init__(self, detail: Any, request_id: str | None = None, headers: dict[str, str] | None = None) -> None:
        super().__init__(detail)
        self.detail = detail
        self.request_id = request_id
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        # `message` is what the JS clients show as the error text (they read body.message).
        return {"detail": self.detail, "error_type": self.error_type, "message": str(self.detail)}

    def response(self) -> JSONResponse:
        return error_response(self.status, self.body(), self.error_type, self.request_id, self.headers)


class BadRequest(ApiError):
    status = 400
    error_type = "bad_request"


class Unauthorized(ApiError):
    status = 401
    error_type = "unauthorized"

    def __init__(self, detail: str = "missing or invalid API key; send 'Authorization: Key <key>'") -> None:
        super().__init__(detail, headers={"WWW-Authenticate": "Key"})


class Forbidden(ApiError):
    """A valid credential that may not do this (a temporary token used for another app)."""

    status = 403
    error_type = "forbidden"


class NotFound(ApiError):
    status = 404
    error_type = "not_found"


class PayloadTooLarge(ApiError):
    status = 413
    error_type = "payload_too_large"


class TooManyRequests(ApiError):
    """429 with Retry-After: the queue is full (``queue_full``) or the key's rate is spent (``rate_limited``).

    fal's clients retry 429, so it is used for these two transient refusals and nothing else.
    """

    status = 429
    error_type = "rate_limited"

    def __init__(self, detail: str, retry_after_s: float, error_type: str = "rate_limited") -> None:
        super().__init__(detail, headers={"Retry-After": str(max(1, math.ceil(retry_after_s)))})
        self.error_type = error_type


class ValidationFailed(ApiError):
    """422 in FastAPI's ``detail`` list shape, so JS raises ``ValidationError`` with ``fieldErrors``."""

    status = 422
    error_type = "invalid_input"

    def __init__(self, field: str, message: str, request_id: str | None = None) -> None:
        super().__init__(validation_detail(field, message), request_id)

    def body(self) -> dict[str, Any]:
        return {"detail": self.detail}


class EngineUnavailable(ApiError):
    """The models failed to load. 500, not 503: retrying cannot help until an operator fixes the server."""

    status = 500
    error_type = "engine_unavailable"


class AlreadyCompleted(ApiError):
    """Cancel of a finished request: fal answers 400 ``{"status": "ALREADY_COMPLETED"}``."""

    status = 400
    error_type = "already_completed"

    def body(self) -> dict[str, Any]:
        detail = "the request has already completed"
        return {"status": "ALREADY_COMPLETED", "detail": detail, "message": detail}


class StillInProgress(ApiError):
    """Result asked for before completion. Not 202: JS ``queue.result()`` would read it as success."""

    status = 400
    error_type = "still_in_progress"


class RetryLater(ApiError):
    """503 with ``Retry-After``: nothing was written, so clients retry (fal's clients do on 503)."""

    status = 503
    retry_after_s = 2
    default_detail = "the server cannot take this request for a moment; retry shortly"

    def __init__(self, detail: str | None = None) -> None:
        super().__init__(detail or self.default_detail, headers={"Retry-After": str(self.retry_after_s)})


class Draining(RetryLater):
    """SIGTERM was received: no new sync runs (retry on another instance, or this one after its restart).

    ``Connection: close``, so the client's retry opens a new connection, which a load balancer sends to another
    instance (this one's readiness is 503 by now)."""

    error_type = "draining"
    retry_after_s = 10
    default_detail = "the server is shutting down and takes no new synchronous runs; retry shortly"
    headers_when_draining: ClassVar[dict[str, str]] = {"Connection": "close"}

    def __init__(self, detail: str | None = None) -> None:
        super().__init__(detail)
        self.headers.update(self.headers_when_draining)


class StoreDown(RetryLater):
    """The job store cannot be reached (PostgreSQL restarting, a network cut): the request was not
    acknowledged, so nothing is lost."""

    error_type = "store_unavailable"
    default_detail = "the job store is unavailable for a moment; nothing was written, retry shortly"


class FilesDown(RetryLater):
    """The file store (a bucket) cannot be reached; the file is not lost."""

    error_type = "files_unavailable"
    default_detail = "the file store is unavailable for a moment; retry shortly"


class InsufficientStorage(ApiError):
    """507: the disk is full, so nothing can be stored (a job, an upload). Not 503: the JS client would retry it
    for seconds and then fail anyway (freeing space takes an operator), and the Python client would not; 507 is
    retried by neither, so every client shows this message at once."""

    status = 507
    error_type = "insufficient_storage"


class IdempotencyKeyReused(ApiError):
    """An ``Idempotency-Key`` sent again with a different request. 422, not 409: fal's clients retry 409."""

    status = 422
    error_type = "idempotency_key_reused"

    def body(self) -> dict[str, Any]:
        detail = [{"loc": ["header", "idempotency-key"], "msg": str(self.detail), "type": self.error_type}]
        return {"detail": detail, "error_type": self.error_type, "message": str(self.detail)}


# How much of a refused input a 422 echoes back in ``detail[].input``: a missing ``mask_url`` must not send
# 29 KB of base64 back. Longer strings keep a prefix and their length; longer lists and objects their first items.
ECHO_MAX_CHARS = 100
ECHO_PREFIX_CHARS = 40
ECHO_MAX_ITEMS = 20
ECHO_MAX_DEPTH = 8
UNPAIRED_SURROGATE = re.compile("[\ud800-\udfff]")  # text no UTF-8 encoder (nor tokenizer) takes
_NON_FINITE = {math.inf: "Infinity", -math.inf: "-Infinity"}


def abridged(value: Any, depth: int = 0) -> Any:
    """``value`` (a refused input) cut to what an error answer should echo, and always JSON-encodable.

    Strings over :data:`ECHO_MAX_CHARS` become ``"<prefix>… (N chars)"``; lists and objects keep their first
    :data:`ECHO_MAX_ITEMS` items (a last entry says how many more), nested at most :data:`ECHO_MAX_DEPTH` deep;
    non-finite numbers become ``"NaN"``/``"Infinity"``/``"-Infinity"`` and unpaired UTF-16 surrogates U+FFFD (JSON
    allows neither in an answer).
    """
    if isinstance(value, float) and not math.isfinite(value):
        return _NON_FINITE.get(value, "NaN")
    if isinstance(value, bytes | bytearray):
        if len(value) > ECHO_MAX_CHARS:
            return f"{bytes(value[:ECHO_PREFIX_CHARS]).decode('utf-8', 'replace')}… ({len(value)} bytes)"
        value = bytes(value).decode("utf-8", "replace")
    if isinstance(value, str):
        if len(value) > ECHO_MAX_CHARS:
            value = f"{value[:ECHO_PREFIX_CHARS]}… ({len(value)} chars)"
        return UNPAIRED_SURROGATE.sub("\ufffd", value)
    if isinstance(value, dict | list | tuple) and depth >= ECHO_MAX_DEPTH:
        return "…"
    if isinstance(value, dict):
        out = {abridged(str(k), depth + 1): abridged(v, depth + 1) for k, v in list(value.items())[:ECHO_MAX_ITEMS]}
        if len(value) > ECHO_MAX_ITEMS:
            out["…"] = f"{len(value) - ECHO_MAX_ITEMS} more keys"
        return out
    if isinstance(value, list | tuple):
        items = [abridged(v, depth + 1) for v in value[:ECHO_MAX_ITEMS]]
        if len(value) > ECHO_MAX_ITEMS:
            items.append(f"… ({len(value) - ECHO_MAX_ITEMS} more items)")
        return items
    return value


def validation_errors_body(errors: list[dict[str, Any]]) -> dict[str, Any]:
    """A 422's body from pydantic's errors, in FastAPI's ``detail`` shape, with the echoed input abridged."""
    detail = []
    for err in errors:
        item = {k: abridged(v) for k, v in err.items() if k in ("loc", "msg", "type", "input", "url")}
        if "ctx" in err:
            item["ctx"] = {k: abridged(str(v)) for k, v in err["ctx"].items()}
        detail.append(item)
    return {"detail": detail}


def validation_detail(field: str, message: str) -> list[dict[str, Any]]:
    loc: list[str | int] = ["body", *[p for p in field.split(".") if p]]
    return [{"loc": loc, "msg": message, "type": "value_error"}]


def error_response(
    status: int,
    body: dict[str, Any],
    error_type: str | None,
    request_id: str | None = None,
    headers: dict[str, str] | None = None,
) -> JSONResponse:
    out = dict(headers or {})
    if error_type:
        out[ERROR_TYPE_HEADER] = error_type
    if request_id:
        out[REQUEST_ID_HEADER] = request_id
    return JSONResponse(body, status_code=status, headers=out)


def job_error(error_type: str, message: str, field: str | None = None) -> tuple[int, dict[str, Any]]:
    """HTTP status and body stored for a job that ended with this error."""
    status = STATUS_FOR_ERROR_TYPE.get(error_type, 500)
    if status == 422:
        return status, {"detail": validation_detail(field or "input", message), "error_type": error_type}
    return status, {"detail": message, "error_type": error_type, "message": message}


def unexpected_error_response() -> JSONResponse:
    """What an unexpected exception answers: no trace, no paths, only that it happened."""
    detail = "internal server error"
    return error_response(500, {"detail": detail, "error_type": "internal_error", "message": detail}, "internal_error")


class UnexpectedErrors:
    """ASGI middleware: an exception no handler took answers 500 ``internal_error`` and the connection stays usable.

    Starlette's own last-resort handler sends the answer and then raises the exception again, so uvicorn drops the
    kept-alive connection without a ``Connection: close`` (clients see a reset on their next request). Here the
    exception ends with the answer. Once a response has started nothing can be answered any more: the exception
    goes on and the server closes the connection, as it must.
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = False

        async def watched_send(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, receive, watched_send)
        except Exception:
            if started:
                raise
            log.exception("unhandled error on %s %s", scope.get("method"), scope.get("path"))
            await unexpected_error_response()(scope, receive, send)
