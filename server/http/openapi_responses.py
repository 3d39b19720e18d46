"""What the routes answer, for the OpenAPI document (``responses=`` of each route).

Routes build their JSON by hand (fal's exact shapes), so FastAPI cannot infer these; they are
declared here so that the schema states every status code and body a client can get, and
schemathesis can hold the server to it (tests/api/test_schemathesis.py).
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from .schemas import Output


class ErrorBody(BaseModel):
    """Every refusal and failed request: ``detail`` (text, or FastAPI's list for invalid fields) and ``error_type``."""

    model_config = ConfigDict(extra="allow")

    detail: Any = Field(None, description="What went wrong: a message, or a list of {loc, msg, type} per bad field.")
    error_type: str | None = Field(None, description="Machine-readable reason; also in the X-Fal-Error-Type header.")
    message: str | None = Field(None, description="The detail as one line (what the JS clients show).")


class LogEntry(BaseModel):
    message: str
    level: str
    source: str
    timestamp: str


class Submitted(BaseModel):
    """The answer to a queue submit."""

    status: Literal["IN_QUEUE"]
    request_id: str
    response_url: str
    status_url: str
    cancel_url: str
    queue_position: int = Field(ge=0)
    gateway_request_id: str


class QueueStatus(BaseModel):
    """A request's status: ``IN_QUEUE`` (with ``queue_position``), ``IN_PROGRESS`` or ``COMPLETED``."""

    model_config = ConfigDict(extra="allow")

    status: Literal["IN_QUEUE", "IN_PROGRESS", "COMPLETED"]
    request_id: str
    response_url: str
    status_url: str
    cancel_url: str
    queue_position: int | None = Field(None, ge=0)
    logs: list[LogEntry] | None
    metrics: dict[str, Any] | None = None
    error: str | None = Field(None, description="Set when the request failed or was cancelled.")
    error_type: str | None = None


class CancelAccepted(BaseModel):
    status: Literal["CANCELLATION_REQUESTED"]


class AlreadyCompletedBody(BaseModel):
    model_config = ConfigDict(extra="allow")

    status: Literal["ALREADY_COMPLETED"]


def _error(description: str, model: type[BaseModel] = ErrorBody, **extra: Any) -> dict[str, Any]:
    return {"model": model, "description": description, **extra}


_RETRY_AFTER = {"Retry-After": {"description": "Seconds to wait before retrying.", "schema": {"type": "string"}}}

BAD_REQUEST = {400: _error("A bad header or query parameter.")}
UNAUTHORIZED = {401: _error("Missing, invalid or expired API key or temporary token (only when the server has keys).")}
# What a temporary token gets on the routes of an app it was not minted for.
FORBIDDEN = {403: _error("A temporary token for another app.")}
NOT_FOUND = {404: _error("No such request for this API key (or it expired).")}
TOO_LARGE = {413: _error("The body is over the size limit.")}
TOO_MANY = {429: _error("Over the rate limit, or the queue is full; retry after Retry-After.", headers=_RETRY_AFTER)}
UNAVAILABLE = {500: _error("The models failed to load; see /health/ready and the server log.")}
DRAINING = {503: _error("The server is shutting down; retry after Retry-After.", headers=_RETRY_AFTER)}
DISK_FULL = {507: _error("The server's disk is full: nothing was stored; retry once space is freed.")}
# What a finished request answers at its result URL (or a sync run answers) when it did not succeed.
JOB_FAILED = {
    499: _error("The request was cancelled."),
    500: _error("The request failed (engine error, interrupted, ...)."),
    503: _error("A sync run the server could not start because it is shutting down; retry it.", headers=_RETRY_AFTER),
    504: _error("The request did not start before its X-Fal-Request-Timeout."),
    507: _error("The request's images could not be saved: the server's disk was full."),
}

SUBMIT = {
    200: {"model": Submitted},
    **BAD_REQUEST,
    **UNAUTHORIZED,
    **FORBIDDEN,
    **TOO_LARGE,
    **TOO_MANY,
    **UNAVAILABLE,
    **DRAINING,
    **DISK_FULL,
}
RUN = {
    **BAD_REQUEST,
    **UNAUTHORIZED,
    **FORBIDDEN,
    404: _error("The result is gone."),
    **TOO_LARGE,
    **TOO_MANY,
    **JOB_FAILED,
}
RUN[500] = _error("The request failed, or the models failed to load.")
RUN[507] = _error("The server's disk is full (nothing was stored), or this request's images could not be saved.")
# A step-preview stream: the sync run's refusals and failures (before the stream opens), else the events.
STREAM_RUN = {
    200: {
        "content": {"text/event-stream": {"schema": {"type": "string"}}},
        "description": "Server-sent events: a preview per step, then the run's output (docs/streaming.md).",
    },
    **{code: value for code, value in RUN.items() if code != 404},
}
STATUS = {
    200: {"model": QueueStatus, "description": "Completed (successfully or not)."},
    202: {"model": QueueStatus, "description": "In queue or in progress."},
    **UNAUTHORIZED,
    **FORBIDDEN,
    **NOT_FOUND,
}
STREAM = {
    200: {"content": {"text/event-stream": {"schema": {"type": "string"}}}, "description": "Status events (SSE)."},
    **UNAUTHORIZED,
    **FORBIDDEN,
    **NOT_FOUND,
}
RESULT = {
    200: {"model": Output},
    400: _error("The request is still in progress."),
    **UNAUTHORIZED,
    **FORBIDDEN,
    **NOT_FOUND,
    **JOB_FAILED,
}
CANCEL = {
    202: {"model": CancelAccepted, "description": "Cancellation requested."},
    400: _error("The request has already completed.", AlreadyCompletedBody),
    **UNAUTHORIZED,
    **FORBIDDEN,
    **NOT_FOUND,
}


class HealthBody(BaseModel):
    status: str = Field(
        description="ready, loading, warming, failed, draining, store_unavailable or insufficient_storage."
    )
    detail: str | None = None


READY = {
    503: {
        "model": HealthBody,
        "description": "Not ready: loading, warming, failed, draining (shutting down), store_unavailable or "
        "insufficient_storage (a disk is full).",
    }
}
JWKS = {404: _error("Webhook signing is off.")}
UPLOAD_INITIATE = {
    400: _error("Not a JSON object, or a content type uploads do not accept."),
    **UNAUTHORIZED,
    **DISK_FULL,
}
UPLOAD_TOKEN = {**UNAUTHORIZED}
FILES_UPLOAD = {
    400: _error("A content type uploads do not accept."),
    401: _error("Missing or expired upload token."),
    **TOO_LARGE,
    **DISK_FULL,
}
TOKENS = {
    200: {
        "content": {"application/json": {"schema": {"type": "string"}}},
        "description": "The token, as a JSON string (send it as 'Authorization: Bearer <token>').",
    },
    400: _error("A body that is not UTF-8 text."),
    **UNAUTHORIZED,
    403: _error("A temporary token asked for apps it may not use itself."),
    422: _error("An app this server does not serve, or a lifetime over token_max_lifetime_s."),
}
