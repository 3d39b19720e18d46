"""What every server-sent-event stream of this server shares: its headers and the pacing of its keep-alives.

A stream that has sent nothing for ``keepalive_s`` sends a ``: keep-alive`` comment, so proxies with an idle
timeout keep it open while a request waits; a queued request's stream looks again every
:data:`POSITION_POLL_S`, since its queue position moves without the request itself changing.
"""

from __future__ import annotations

import time

from ..jobs.job import Job, JobState
from .errors import REQUEST_ID_HEADER

POSITION_POLL_S = 1.0  # a queued request's stream reads its queue position this often
KEEP_ALIVE = ": keep-alive\n\n"


def sse_headers(job: Job) -> dict[str, str]:
    """An event stream's response headers: the request id, and no caching or buffering on the way."""
    return {REQUEST_ID_HEADER: job.id, "Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


class Pacer:
    """When a stream is due a keep-alive, and how long it may wait for the job's next change meanwhile."""

    def __init__(self, keepalive_s: float) -> None:
        self.keepalive_s = keepalive_s
        self.quiet_since = time.monotonic()

    def sent(self) -> None:
        """An event went out: the silence starts again."""
        self.quiet_since = time.monotonic()

    def keep_alive_due(self) -> bool:
        """True (and the silence starts again) once nothing was sent for ``keepalive_s``."""
        if time.monotonic() - self.quiet_since < self.keepalive_s:
            return False
        self.sent()
        return True

    def wait_s(self, job: Job) -> float:
        """How long to wait for ``job`` to change before looking again."""
        timeout = self.keepalive_s - (time.monotonic() - self.quiet_since)
        if job.state is JobState.QUEUED:
            timeout = min(timeout, POSITION_POLL_S)
        return max(timeout, 0.0)
