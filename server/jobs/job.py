"""The job: one request's life, its internal states and how they show on the wire.

Internal states are ``queued``, ``running``, ``succeeded``, ``failed`` and ``cancelled``. fal's clients
know only three wire states (``IN_QUEUE``, ``IN_PROGRESS``, ``COMPLETED``); a failure or a cancel is
``COMPLETED`` with ``error`` and ``error_type``. Anything else would crash the Python client
(``ValueError: Unknown status``) or make the JS client poll forever.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any


class JobState(StrEnum):
    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"

    @property
    def wire(self) -> str:
        """The status string fal's clients see."""
        return _WIRE[self]

    def is_terminal(self) -> bool:
        return self in (JobState.SUCCEEDED, JobState.FAILED, JobState.CANCELLED)


_WIRE = {
    JobState.QUEUED: "IN_QUEUE",
    JobState.RUNNING: "IN_PROGRESS",
    JobState.SUCCEEDED: "COMPLETED",
    JobState.FAILED: "COMPLETED",
    JobState.CANCELLED: "COMPLETED",
}

PRIORITIES = {"normal": 0, "low": 1}
LOG_LEVELS = ("STDERR", "STDOUT", "ERROR", "INFO", "WARN", "DEBUG")


def log_entry(message: str, level: str = "INFO", when: float | None = None) -> dict[str, str]:
    """A status log line in fal's shape."""
    stamp = dt.datetime.fromtimestamp(when, dt.UTC) if when is not None else dt.datetime.now(dt.UTC)
    return {"message": message, "level": level, "source": "USER", "timestamp": stamp.isoformat()}


@dataclass
class Job:
    """One request. Persistent fields are written to the job store; the rest lives in memory only.

    ``endpoint`` is ``owner/alias`` (what status/result/cancel URLs carry); ``app_id`` is the full id
    the request was made to. ``error_body``/``http_status`` are what the result route answers for a
    failed or cancelled job, verbatim.
    """

    id: str
    app_id: str
    endpoint: str
    owner: str
    input: dict[str, Any]
    seed: int
    created_at: float
    base_url: str
    queue_prefix: str = "/queue"
    priority: int = 0
    seq: int = 0
    state: JobState = JobState.QUEUED
    attempts: int = 0
    sync: bool = False
    webhook_url: str | None = None
    start_deadline: float | None = None
    started_at: float | None = None
    finished_at: float | None = None
    expires_at: float | None = None
    result: dict[str, Any] | None = None
    error: str | None = None
    error_type: str | None = None
    error_body: dict[str, Any] | None = None
    http_status: int = 200
    logs: list[dict[str, str]] = field(default_factory=list)
    inference_time: float | None = None
    files: list[str] = field(default_factory=list)
    cancel_requested: bool = False
    # Scheduling (the claim/lease protocol of server.jobs.store): which batches the job can join, the image rows
    # it adds to one, which worker holds it until when (once finished: which worker ran it), and the node whose
    # caller waits for a sync run.
    batch_key: str = ""
    rows: int = 1
    worker: str | None = None
    lease_until: float | None = None
    waiter: str | None = None
    version: int = 0  # the row's write count: a watcher sees a change by it alone
    # An object lifecycle the request asked for (X-Fal-Object-Lifecycle-Preference), when shorter than the result
    # retention: its files expire this long after it ends (``files_expire_at``), its result JSON with the retention.
    files_lifetime_s: float | None = None
    files_expire_at: float | None = None
    no_retry: bool = False  # x-fal-no-retry: never run again after a crash or a lost lease
    previews: bool = False  # a step-preview stream waits for it: the worker writes each step's preview

    @property
    def sync_mode(self) -> bool:
        return bool(self.input.get("sync_mode"))

    def urls(self) -> dict[str, str]:
        base = f"{self.base_url}{self.queue_prefix}/{self.endpoint}/requests/{self.id}"
        return {"response_url": base, "status_url": f"{base}/status", "cancel_url": f"{base}/cancel"}

    def add_log(self, message: str, level: str = "INFO", when: float | None = None) -> None:
        self.logs.append(log_entry(message, level, when))

    def status_body(self, queue_position: int | None, with_logs: bool, logs_from: int = 0) -> dict[str, Any]:
        """The status JSON for polling (all logs) or streaming (``logs_from`` onwards)."""
        body: dict[str, Any] = {"status": self.state.wire, "request_id": self.id, **self.urls()}
        if self.state is JobState.QUEUED:
            body["queue_position"] = queue_position if queue_position is not None else 0
        body["logs"] = self.logs[logs_from:] if with_logs else None
        if self.state.is_terminal():
            body["metrics"] = {"inference_time": self.inference_time}
            if self.error is not None:
                body["error"] = self.error
                body["error_type"] = self.error_type
        return body
