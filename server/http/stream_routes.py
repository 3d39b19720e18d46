"""Step previews as server-sent events: ``POST /{app}/stream`` (the contract is docs/streaming.md).

The request is queued like a sync run (this node is its waiter), with ``previews`` on, so its worker writes
each step's preview to the store with the step's progress; this node follows the job through the store's
change feed, as a status stream does, and sends one event per step preview it reads, then the result.

The response head waits until the first preview, the end of the request or ``stream_keepalive_s``: a request
that fails before then is answered like a sync run (its HTTP status and JSON error), which the JS client turns
into an ``ApiError`` with the server's message; once the stream is open a failure can only be its last event.
"""

from __future__ import annotations

import contextlib
import json
import logging
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.requests import Request

from ..jobs.job import Job, JobState
from ..jobs.service import JobService
from ..jobs.store import StoreUnavailable
from .errors import AlreadyCompleted
from .sse import KEEP_ALIVE, Pacer, sse_headers

log = logging.getLogger("inpaint-server.http")

HEAD_POLL_S = 1.0  # while the head is held and nothing changes, the client's disconnect is checked this often


async def stream_response(
    request: Request, service: JobService, job: Job, failed: Callable[[JobService, Job], Response]
) -> Response:
    """The answer to a stream request whose job was just submitted (see the module); ``failed`` answers for a
    request that failed before the stream opened (the sync run's answer)."""
    keepalive_s = service.settings.stream_keepalive_s
    deadline = time.monotonic() + keepalive_s
    preview = None
    while not job.state.is_terminal():
        preview = _newest_preview(service, job)
        left = deadline - time.monotonic()
        if preview is not None or left <= 0:
            break
        fresh = await service.wait(job, min(left, HEAD_POLL_S))
        if fresh is job and await request.is_disconnected():
            _cancel(service, job)
            return JSONResponse({}, status_code=499)  # the caller has gone
        job = fresh
    if job.state in (JobState.FAILED, JobState.CANCELLED):
        return failed(service, job)
    events = step_events(service, job, preview, keepalive_s)
    return StreamingResponse(events, media_type="text/event-stream", headers=sse_headers(job))


async def step_events(
    service: JobService, job: Job, preview: dict[str, Any] | None, keepalive_s: float
) -> AsyncIterator[str]:
    """Queue positions while the request waits, one event per step preview read, then the result (or the error);
    a ``: keep-alive`` comment after ``keepalive_s`` without an event. A client that goes away cancels the
    request."""
    sent_step, sent_position = 0, None
    pacer = Pacer(keepalive_s)
    finished = False
    try:
        while True:
            event = None
            if job.state.is_terminal():
                finished = True
                yield _data(final_event(service, job))
                return
            if job.state is JobState.QUEUED:
                position = service.position(job) or 0
                if position != sent_position:
                    sent_position = position
                    event = {"request_id": job.id, "status": "IN_QUEUE", "queue_position": position}
            else:
                preview = preview or _newest_preview(service, job)
                if preview is not None and preview.get("step", 0) > sent_step:
                    sent_step = preview["step"]
                    event = {"request_id": job.id, **preview}
                preview = None
            if event is not None:
                pacer.sent()
                yield _data(event)
            elif pacer.keep_alive_due():
                yield KEEP_ALIVE
            job = await service.wait(job, pacer.wait_s(job))
    finally:
        if not finished:
            _cancel(service, job)


def final_event(service: JobService, job: Job) -> dict[str, Any]:
    """The last event: the run's output, exactly; or what went wrong (``error``, ``error_type``, ``detail``)."""
    if job.state is JobState.SUCCEEDED:
        output = service.result_of(job)
        if output is not None:
            service.release_inline(job)  # a sync_mode output (data URIs) goes to this caller only
            return output
    body = job.error_body or {}
    error = job.error or "the request failed"
    return {
        "request_id": job.id,
        "status": "COMPLETED",
        "error": error,
        "error_type": job.error_type or "internal_error",
        "detail": body.get("detail", error),
    }


def _newest_preview(service: JobService, job: Job) -> dict[str, Any] | None:
    """The job's newest step preview; None while the store cannot be read (a preview is only a nicety: the
    stream goes on, and the result comes once the store is back)."""
    try:
        return service.preview(job)
    except StoreUnavailable:
        return None


def _data(event: dict[str, Any]) -> str:
    return f"data: {json.dumps(event)}\n\n"


def _cancel(service: JobService, job: Job) -> None:
    """The client went away: its request is cancelled (as a sync run's is), wherever it is."""
    try:
        with contextlib.suppress(AlreadyCompleted):
            service.cancel(job)
            log.info("request %s cancelled: its stream's client disconnected", job.id)
    except StoreUnavailable as exc:
        log.warning("request %s: could not cancel after its stream's client left: %s", job.id, exc)


__all__ = ["final_event", "step_events", "stream_response"]
