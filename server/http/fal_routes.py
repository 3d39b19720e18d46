"""fal's model API: sync run, queue submit, status (polling and SSE), result and cancel.

Status, result and cancel URLs carry only ``owner/alias`` (fal drops the sub-path there); the
sub-path forms and trailing slashes are accepted too, without redirects. Only the three wire states
appear; failures and cancels are ``COMPLETED`` with ``error`` and ``error_type``.
"""

from __future__ import annotations

import contextlib
import functools
import json
import math
from collections.abc import AsyncIterator, Callable
from typing import Annotated, Any

from fastapi import APIRouter, Body, Depends, Header, Query, Request
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel

from pipelines.specs import AppSpec

from ..inputs.url_guard import FetchError, FetchGuard
from ..jobs.job import PRIORITIES, Job, JobState
from ..jobs.service import JobService
from .auth import Caller
from .bodies import OffLoopJsonRoute, off_loop_if_large
from .errors import (
    REQUEST_ID_HEADER,
    TIMEOUT_TYPE_HEADER,
    AlreadyCompleted,
    BadRequest,
    Draining,
    NotFound,
    StillInProgress,
    error_response,
)
from .idempotency import HEADER as IDEMPOTENCY_HEADER
from .idempotency import KEY_PATTERN as IDEMPOTENCY_KEY_PATTERN
from .idempotency import REPLAYED_HEADER, fingerprint
from .lifecycle import requested_lifetime
from .openapi_responses import CANCEL, RESULT, RUN, STATUS, STREAM, STREAM_RUN, SUBMIT
from .routing import QUEUE_PREFIX_KEY
from .schemas import Output, input_model
from .sse import KEEP_ALIVE, Pacer, sse_headers
from .stream_routes import stream_response

TRUE_FLAGS = ("1", "true", "yes", "on")
# fal's request headers: x-fal-no-retry is honoured (see JobService.submit); X-Fal-Runner-Hint and X-Fal-Store-IO
# (which runner, how fal's runners store files) mean nothing for one self-hosted server and are ignored.
NO_RETRY_HEADER = "x-fal-no-retry"
IdempotencyKey = Annotated[
    str | None,
    Header(
        alias=IDEMPOTENCY_HEADER,
        pattern=IDEMPOTENCY_KEY_PATTERN,
        description="Send a submit again with the same key and body (after a timeout, say) to get the same "
        "request_id back instead of a second request. Printable ASCII, at most 255 characters.",
    ),
]
FOLLOW_UPS = ("request_status", "request_result", "cancel_request")  # operation ids a submit links to


def _flag(value: str | None) -> bool:
    return value is not None and value.strip().lower() in TRUE_FLAGS


def _priority(request: Request) -> int:
    value = request.headers.get("x-fal-queue-priority")
    if value is None:
        return PRIORITIES["normal"]
    try:
        return PRIORITIES[value.strip().lower()]
    except KeyError:
        raise BadRequest(f"X-Fal-Queue-Priority must be 'normal' or 'low', not {value!r}") from None


def _start_timeout(request: Request) -> float | None:
    value = request.headers.get("x-fal-request-timeout")
    if value is None:
        return None
    try:
        seconds = float(value)
    except ValueError:
        seconds = math.nan
    if not math.isfinite(seconds) or seconds <= 0:
        raise BadRequest(f"X-Fal-Request-Timeout must be a positive number of seconds, not {value!r}")
    return seconds


async def _check_webhook_url(url: str, guard: FetchGuard) -> None:
    """The SSRF guard of input URLs (case S17): the URL's shape, then every address its host resolves to now.

    Delivery connects through the same guard again, so a name that resolves elsewhere later is refused then.
    """
    try:
        await guard.check(url)
    except FetchError as exc:
        raise BadRequest(f"fal_webhook {exc}") from None


def result_response(service: JobService, job: Job, with_message: bool = False) -> JSONResponse:
    """What the result route (and a sync run) answers for a terminal job. ``with_message``: a failure's body
    carries ``message`` (what the JS clients show) even where it is a list of field errors (``invalid_input``)."""
    if job.state is JobState.SUCCEEDED:
        output = service.result_of(job)
        if output is None:
            raise NotFound(
                "this result was returned inline (sync_mode) and is no longer held by the server", request_id=job.id
            )
        return JSONResponse(output, headers={REQUEST_ID_HEADER: job.id})
    headers = {TIMEOUT_TYPE_HEADER: "user"} if job.error_type == "request_timeout" else None
    if job.error_type == Draining.error_type:  # a sync run refused by a shutdown: worth retrying
        headers = {"Retry-After": str(Draining.retry_after_s), **Draining.headers_when_draining}
    body = job.error_body or {}
    if with_message and job.error is not None:
        body = {**body, "message": body.get("message", job.error)}
    return error_response(job.http_status, body, job.error_type, job.id, headers)


def fal_router(
    service: JobService,
    apps: list[AppSpec],
    caller_of: Callable[..., Caller],
    base_url_of: Callable[[Request], str],
) -> APIRouter:
    router = APIRouter()

    def submit_job(
        request: Request,
        app: AppSpec,
        payload: BaseModel,
        owner: str,
        sync: bool,
        webhook: str | None,
        idempotency: tuple[str, str] | None = None,
        previews: bool = False,
    ):
        endpoint = "/".join(app.app_id.split("/")[:2])
        return service.submit(
            app_id=app.app_id,
            endpoint=endpoint,
            payload=payload.model_dump(mode="json"),
            owner=owner,
            base_url=base_url_of(request),
            queue_prefix=request.scope.get(QUEUE_PREFIX_KEY, "/queue"),
            priority=_priority(request),
            start_timeout=_start_timeout(request),
            webhook_url=webhook,
            sync=sync,
            idempotency=idempotency,
            files_lifetime_s=requested_lifetime(request.headers),
            no_retry=_flag(request.headers.get(NO_RETRY_HEADER)),
            previews=previews,
        )

    for app in apps:
        model = input_model(app, service.settings.max_prompt_chars)
        _add_app_routes(router, app, model, submit_job, _app_owner(app.app_id, caller_of))

    # Status, stream, result and cancel. /queue first: "/queue/a/b/requests/x" must not be read as
    # owner "queue", alias "a", sub-path "b".
    request_routes = [  # (suffix, handler, method, summary, operation id, responses)
        ("/status", _status(service, caller_of), "GET", "Request status", "request_status", STATUS),
        ("/status/stream", _stream(service, caller_of), "GET", "Request status as server-sent events", None, STREAM),
        ("", _result(service, caller_of), "GET", "Request result", "request_result", RESULT),
        ("/cancel", _cancel(service, caller_of), "PUT", "Cancel a request", "cancel_request", CANCEL),
    ]
    for prefix in ("/queue", ""):
        for sub in ("/{owner}/{alias}", "/{owner}/{alias}/{path}"):
            for slash in ("", "/"):
                shown = prefix == "/queue" and sub == "/{owner}/{alias}" and slash == ""
                base = f"{prefix}{sub}/requests/{{request_id}}"
                for suffix, handler, method, summary, operation_id, responses in request_routes:
                    router.add_api_route(
                        f"{base}{suffix}{slash}",
                        handler,
                        methods=[method],
                        include_in_schema=shown,
                        tags=["queue"],
                        summary=summary,
                        operation_id=operation_id if shown else None,
                        responses=responses,
                        status_code=202 if suffix == "/cancel" else None,
                    )

    @router.api_route("/{path:path}", methods=["GET", "POST"], include_in_schema=False)
    async def unknown_route(path: str, request: Request) -> None:
        if request.method == "POST":
            caller_of(request)  # an unknown app answers 401 before 404 when keys are on, like a known one
            raise NotFound(f"no app at /{path}; this server serves: {', '.join(a.app_id for a in apps)}")
        raise NotFound(f"no route {request.method} /{path}")

    return router


def _add_app_routes(router: APIRouter, app: AppSpec, model: type[BaseModel], submit_job, owner_of) -> None:
    async def run(request: Request, payload: model = Body(...), owner: str = Depends(owner_of)):  # type: ignore[valid-type]
        job = await off_loop_if_large(request, submit_job, request, app, payload, owner, True, None)
        service: JobService = request.app.state.service
        while not job.state.is_terminal():
            fresh = await service.wait(job, 1.0)
            if fresh is job and await request.is_disconnected():
                with contextlib.suppress(AlreadyCompleted):
                    service.cancel(job)
                return JSONResponse({}, status_code=499)  # the caller has gone
            job = fresh
        response = result_response(service, job)
        service.release_inline(job)  # a sync run's data URIs go to its caller only
        return response

    async def stream(request: Request, payload: model = Body(...), owner: str = Depends(owner_of)):  # type: ignore[valid-type]
        job = submit_job(request, app, payload, owner, True, None, previews=True)
        failed = functools.partial(result_response, with_message=True)
        return await stream_response(request, request.app.state.service, job, failed)

    async def submit(
        request: Request,
        payload: model = Body(...),  # type: ignore[valid-type]
        fal_webhook: str | None = Query(None, description="URL to POST the result to when the request completes."),
        owner: str = Depends(owner_of),
        idempotency_key: IdempotencyKey = None,
    ) -> JSONResponse:
        service: JobService = request.app.state.service
        if fal_webhook is not None:
            await _check_webhook_url(fal_webhook, service.fetch_guard)

        def accept() -> tuple[Job, bool]:
            """The job this submit creates, or the one an earlier submit with its Idempotency-Key created (True)."""
            idempotency = None
            if idempotency_key is not None:
                idempotency = (idempotency_key, fingerprint(app.app_id, payload.model_dump(mode="json"), fal_webhook))
                job = service.find_idempotent(owner, *idempotency)
                if job is not None:
                    return job, True
            return submit_job(request, app, payload, owner, False, fal_webhook, idempotency), False

        job, replayed = await off_loop_if_large(request, accept)
        headers = {REPLAYED_HEADER: "true"} if replayed else {}
        body = {
            "status": "IN_QUEUE",
            "request_id": job.id,
            **job.urls(),
            "queue_position": service.position(job) or 0,
            "gateway_request_id": job.id,
        }
        return JSONResponse(body, headers={REQUEST_ID_HEADER: job.id, **headers})

    # The body type is this app's model; annotations are strings under `from __future__ import annotations`.
    run.__annotations__["payload"] = model
    stream.__annotations__["payload"] = model
    submit.__annotations__["payload"] = model
    router.add_api_route(
        f"/{app.app_id}",
        run,
        methods=["POST"],
        response_model=Output,
        tags=[app.app_id],
        summary=f"Run {app.app_id} and wait for the result",
        responses=RUN,
        route_class_override=OffLoopJsonRoute,
    )
    for prefix in ("", "/queue"):  # fal.stream() posts to {run host}/{app}/stream; the queue host's path works too
        router.add_api_route(
            f"{prefix}/{app.app_id}/stream",
            stream,
            methods=["POST"],
            include_in_schema=prefix == "",
            tags=[app.app_id],
            summary=f"Run {app.app_id} with a preview of every step (server-sent events)",
            description="One `data:` event per denoising step with a small JPEG preview of each image, then the "
            "run's output as the last event (docs/streaming.md).",
            responses=STREAM_RUN,
            route_class_override=OffLoopJsonRoute,
        )
    # The links say where a submit's request_id goes next (and let schemathesis test those steps in order).
    owner, alias = app.app_id.split("/")[:2]
    follow = {"owner": owner, "alias": alias, "request_id": "$response.body#/request_id"}
    links = {op: {"operationId": op, "parameters": follow} for op in FOLLOW_UPS}
    router.add_api_route(
        f"/queue/{app.app_id}",
        submit,
        methods=["POST"],
        tags=[app.app_id],
        summary=f"Queue a request to {app.app_id}",
        responses={**SUBMIT, 200: {**SUBMIT[200], "links": links}},
        route_class_override=OffLoopJsonRoute,
    )


def _app_owner(app_id: str, caller_of: Callable[..., Caller]) -> Callable[[Request], str]:
    """The dependency of an app's run and submit: the caller's owner, if it may use this app (403 otherwise)."""

    def owner(request: Request) -> str:
        caller = caller_of(request)
        caller.check_app(app_id)
        return caller.owner

    return owner


def _job_for(service: JobService, request: Request, caller: Caller, request_id: str) -> Job:
    params = request.path_params
    endpoint = f"{params['owner']}/{params['alias']}"
    caller.check_endpoint(endpoint)  # a token for another app: 403 whether or not the request exists
    job = service.get(request_id, caller.owner, endpoint)
    caller.check_app(job.app_id)
    return job


def _status(service: JobService, caller_of):
    async def status(request: Request, request_id: str, logs: str | None = None, caller: Caller = Depends(caller_of)):
        job = _job_for(service, request, caller, request_id)
        body = job.status_body(service.position(job), _flag(logs))
        code = 200 if job.state.is_terminal() else 202
        return JSONResponse(body, status_code=code, headers={REQUEST_ID_HEADER: job.id})

    return status


def _stream(service: JobService, caller_of):
    async def stream(request: Request, request_id: str, logs: str | None = None, caller: Caller = Depends(caller_of)):
        job = _job_for(service, request, caller, request_id)
        events = status_events(service, job, _flag(logs), service.settings.stream_keepalive_s)
        return StreamingResponse(events, media_type="text/event-stream", headers=sse_headers(job))

    return stream


async def status_events(service: JobService, job: Job, with_logs: bool, keepalive_s: float) -> AsyncIterator[str]:
    """A request's status as server-sent events: one event per change of state, queue position or logs, and a
    ``: keep-alive`` comment after ``keepalive_s`` without one, so proxies with an idle timeout keep the stream
    open while the request waits; ends with the terminal state."""
    sent_logs = 0
    last: Any = None
    current = job
    pacer = Pacer(keepalive_s)
    while True:
        position = service.position(current)
        state = (current.state, position)
        if state != last or (with_logs and len(current.logs) > sent_logs):
            body = current.status_body(position, with_logs, sent_logs)
            if with_logs:
                sent_logs = len(current.logs)
            last = state
            pacer.sent()
            yield f"data: {json.dumps(body)}\n\n"
        if current.state.is_terminal():
            return
        if pacer.keep_alive_due():
            yield KEEP_ALIVE
        current = await service.wait(current, pacer.wait_s(current))


def _result(service: JobService, caller_of):
    async def result(request: Request, request_id: str, caller: Caller = Depends(caller_of)):
        job = _job_for(service, request, caller, request_id)
        if not job.state.is_terminal():
            raise StillInProgress("the request is still in progress; poll its status", request_id=job.id)
        return result_response(service, job)

    return result


def _cancel(service: JobService, caller_of):
    async def cancel(request: Request, request_id: str, caller: Caller = Depends(caller_of)):
        job = _job_for(service, request, caller, request_id)
        try:
            service.cancel(job)
        except AlreadyCompleted as exc:
            exc.request_id = job.id
            raise
        return JSONResponse({"status": "CANCELLATION_REQUESTED"}, status_code=202, headers={REQUEST_ID_HEADER: job.id})

    return cancel


__all__ = ["fal_router", "result_response"]
