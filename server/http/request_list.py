"""``GET /queue/requests``: the caller's own recent requests (newest first), for the operations page and scripts.

Owner-scoped like status: a key sees the requests made with it (or with tokens it minted), a temporary token only
those of the apps it may use. No input, result or logs: a request's status and result routes have those.
"""

from __future__ import annotations

import asyncio
import datetime as dt
from collections.abc import Callable

from fastapi import APIRouter, Depends, Query
from pydantic import BaseModel, Field

from ..jobs.service import JobService
from ..jobs.store import RequestSummary
from .auth import Caller

DEFAULT_LIMIT = 20
MAX_LIMIT = 100


class RecentRequest(BaseModel):
    request_id: str
    app_id: str = Field(description="The app the request was made to, e.g. fal-ai/hyper-sdxl/inpainting.")
    status: str = Field(description="The wire status: IN_QUEUE, IN_PROGRESS or COMPLETED.")
    state: str = Field(description="queued, running, succeeded, failed or cancelled.")
    error_type: str | None = Field(description="Why a failed or cancelled request ended (as its status says).")
    created_at: str = Field(description="When it was submitted (ISO 8601, UTC).")
    started_at: str | None = Field(description="When a GPU worker started it (its last attempt).")
    finished_at: str | None = Field(description="When it ended.")
    inference_time: float | None = Field(description="Seconds of inference, once completed.")
    status_url: str = Field(description="Its status route, relative to this server.")


class RecentRequests(BaseModel):
    requests: list[RecentRequest]


def request_list_router(service: JobService, caller_of: Callable[..., Caller]) -> APIRouter:
    router = APIRouter(tags=["queue"])

    @router.get("/queue/requests", summary="Your recent requests", response_model=RecentRequests)
    async def recent_requests(
        limit: int = Query(DEFAULT_LIMIT, ge=1, le=MAX_LIMIT, description="How many, newest first."),
        caller: Caller = Depends(caller_of),
    ) -> RecentRequests:
        rows = await asyncio.to_thread(service.store.recent, caller.owner, limit, service.clock())
        if caller.grant is not None:
            rows = [row for row in rows if caller.grant.allows(row.app_id)]
        return RecentRequests(requests=[_summary(row) for row in rows])

    return router


def _summary(row: RequestSummary) -> RecentRequest:
    endpoint = "/".join(row.app_id.split("/")[:2])
    return RecentRequest(
        request_id=row.id,
        app_id=row.app_id,
        status=row.state.wire,
        state=row.state.value,
        error_type=row.error_type,
        created_at=_iso(row.created_at),
        started_at=_iso(row.started_at),
        finished_at=_iso(row.finished_at),
        inference_time=row.inference_time,
        status_url=f"/queue/{endpoint}/requests/{row.id}/status",
    )


def _iso(when: float | None) -> str | None:
    return None if when is None else dt.datetime.fromtimestamp(when, dt.UTC).isoformat()
