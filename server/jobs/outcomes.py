"""How a job ends, decided in one place for every node: the API (cancelled before it started, a start timeout,
a sync run nobody waits for), the sweepers (a lease lost too often) and the GPU workers (results and errors).

A terminal state carries the answer the result route gives (``http_status`` and the output or the error body),
an expiry (the result retention; for its files a shorter one when the request asked for it) and, when the
request asked for one, its webhook, which the store writes in the same transaction as the state.
"""

from __future__ import annotations

from typing import Any

from ..delivery.webhooks import webhook_body
from ..http.errors import job_error
from ..inputs.input_fetch import slim_input
from ..metrics import Metrics
from ..redact import public_message
from .job import Job, JobState
from .store import WebhookRow


def fail(
    job: Job, error_type: str, message: str, field: str | None, now: float, retention_s: float
) -> WebhookRow | None:
    """Make ``job`` terminal with an error (cancelled, timed out, failed); its webhook row, if it asked for one."""
    message = public_message(message)
    status, body = job_error(error_type, message, field)
    job.error = f"{field}: {message}" if field else message
    job.error_type = error_type
    job.error_body = body
    job.add_log(job.error, "ERROR", now)
    state = JobState.CANCELLED if error_type == "cancelled" else JobState.FAILED
    return _terminal(job, state, status, body, now, retention_s)


def succeed(
    job: Job, output: dict[str, Any], timings: dict[str, float], now: float, retention_s: float
) -> WebhookRow | None:
    """Make ``job`` terminal with its output (fal's output JSON); its webhook row, if it asked for one."""
    job.inference_time = timings.get("inference")
    job.result = output
    job.add_log(f"Done in {now - (job.started_at or now):.2f} s", when=now)
    return _terminal(job, JobState.SUCCEEDED, 200, output, now, retention_s)


def _terminal(
    job: Job, state: JobState, status: int, payload: dict[str, Any], now: float, retention_s: float
) -> WebhookRow | None:
    slim_input(job)
    job.state = state
    job.http_status = status
    job.finished_at = now
    job.expires_at = now + retention_s
    if job.files_lifetime_s is not None and job.files_lifetime_s < retention_s:
        job.files_expire_at = now + job.files_lifetime_s
    job.lease_until = None  # ``worker`` stays: which worker ran it
    if not job.webhook_url:
        return None
    body = webhook_body(job.id, state is JobState.SUCCEEDED, payload, status)
    return WebhookRow(job.id, job.webhook_url, body, job.owner, 0, now)


def count(metrics: Metrics, job: Job) -> None:
    """Count a terminal state in this process's metrics (once: by the node that wrote it)."""
    metrics.completed.labels(job.app_id, job.state.value).inc()
    if job.error_type is not None:
        metrics.failures.labels(job.app_id, job.error_type).inc()
    if job.finished_at is not None:
        metrics.latency.labels(job.app_id, "total").observe(max(job.finished_at - job.created_at, 0.0))
