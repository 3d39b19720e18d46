"""What a GPU worker does to jobs, and nothing more: the narrow interface between :class:`~.worker.GpuWorker`
and the store (:class:`WorkSource`), and its implementation on the claim/lease protocol (:class:`Leases`).

The worker reads the head of the queue, claims the batch it picked, renews its leases while the batch runs,
writes progress and, as the holder of the lease, the terminal state. It never sees the API's job service,
so the same worker runs inside the API process (the embedded default) or in a process of its own
(``inpaint-server worker``) on another host.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Collection, Mapping, Sequence
from typing import Any, Protocol

from ..metrics import Metrics
from . import outcomes
from .job import Job
from .store import JobStore, NodeRow, QueuedRef

log = logging.getLogger("inpaint-server.jobs")


class WorkSource(Protocol):
    """The jobs as a GPU worker sees them."""

    holder: str  # this worker's id in the store's leases
    lease_s: float  # how long a lease lasts unless renewed

    def clock(self) -> float:
        """The time, as the store's deadlines count it."""
        ...

    def watch(self, listener: Callable[[], None]) -> None:
        """Call ``listener()`` (from any thread) whenever the jobs change, whichever node changed them."""
        ...

    def unwatch(self, listener: Callable[[], None]) -> None: ...

    def head(self, limit: int) -> list[QueuedRef]:
        """The first queued jobs, in queue order."""
        ...

    def load(self, job_id: str) -> Job | None:
        """A queued job with its input, to prepare it."""
        ...

    def claim(self, job_ids: Sequence[str], message: str) -> list[Job]:
        """Take these jobs (those still queued) as one batch; they are running from now on, leased to us."""
        ...

    def renew(self, job_ids: Collection[str]) -> set[str]:
        """Extend our leases; the ids still held."""
        ...

    def progress(self, jobs: Sequence[Job], previews: Mapping[str, dict[str, Any]] | None = None) -> None:
        """Write running jobs' logs (steps, warnings), and the newest step preview of those in ``previews``."""
        ...

    def cancel_flags(self, job_ids: Collection[str]) -> set[str]:
        """Which of these jobs some node was asked to cancel."""
        ...

    def succeed(self, job: Job, output: dict[str, Any], timings: dict[str, float]) -> bool:
        """Finish a job we hold with its output; False if the lease was lost (the result is not ours to give)."""
        ...

    def fail(self, job: Job, error_type: str, message: str, field: str | None = None) -> bool:
        """Finish a job we hold with an error; False if the lease was lost."""
        ...

    def fail_queued(self, job: Job, error_type: str, message: str, field: str | None = None) -> bool:
        """Fail a job that is still queued (its inputs could not be prepared, its start deadline passed)."""
        ...

    def others_can_run(self) -> bool:
        """Whether another worker is alive and not broken (a worker whose models failed leaves the queue to it)."""
        ...


class Leases:
    """:class:`WorkSource` on the store: claims, leases of ``lease_s``, writes as the holder ``holder``."""

    def __init__(
        self,
        store: JobStore,
        holder: str,
        lease_s: float,
        retention_s: float,
        clock: Callable[[], float],
        metrics: Metrics,
        on_terminal: Callable[[Job], None] | None = None,
    ) -> None:
        self.store = store
        self.holder = holder
        self.lease_s = lease_s
        self.retention_s = retention_s
        self.clock = clock
        self.metrics = metrics
        # What the node does after writing a terminal state: count it, and in the API's process also wake the
        # webhook sender and the watchers (the job service's terminal_written, which counts it itself).
        self.on_terminal = on_terminal or (lambda job: outcomes.count(metrics, job))

    def watch(self, listener: Callable[[], None]) -> None:
        self.store.subscribe(listener)

    def unwatch(self, listener: Callable[[], None]) -> None:
        self.store.unsubscribe(listener)

    def head(self, limit: int) -> list[QueuedRef]:
        return self.store.queue_head(limit)

    def load(self, job_id: str) -> Job | None:
        return self.store.get(job_id, with_input=True)

    def claim(self, job_ids: Sequence[str], message: str) -> list[Job]:
        return self.store.claim(self.holder, job_ids, self.clock(), self.lease_s, message)

    def renew(self, job_ids: Collection[str]) -> set[str]:
        return self.store.renew(self.holder, job_ids, self.clock(), self.lease_s)

    def progress(self, jobs: Sequence[Job], previews: Mapping[str, dict[str, Any]] | None = None) -> None:
        self.store.progress(self.holder, jobs, previews)

    def cancel_flags(self, job_ids: Collection[str]) -> set[str]:
        return self.store.cancel_requested(job_ids)

    def succeed(self, job: Job, output: dict[str, Any], timings: dict[str, float]) -> bool:
        for stage, seconds in timings.items():
            self.metrics.latency.labels(job.app_id, stage).observe(seconds)
        webhook = outcomes.succeed(job, output, timings, self.clock(), self.retention_s)
        return self._written(job, self.store.save(job, webhook, holder=self.holder))

    def fail(self, job: Job, error_type: str, message: str, field: str | None = None) -> bool:
        webhook = outcomes.fail(job, error_type, message, field, self.clock(), self.retention_s)
        return self._written(job, self.store.save(job, webhook, holder=self.holder))

    def fail_queued(self, job: Job, error_type: str, message: str, field: str | None = None) -> bool:
        webhook = outcomes.fail(job, error_type, message, field, self.clock(), self.retention_s)
        return self._written(job, self.store.save(job, webhook, queued=True))

    def others_can_run(self) -> bool:
        now = self.clock()
        return any(can_run(n, now, self.lease_s) for n in self.store.nodes() if n.id != self.holder)

    def _written(self, job: Job, saved: bool) -> bool:
        if saved:
            log.info(
                "request %s %s%s", job.id, job.state.value, f" ({job.error_type}: {job.error})" if job.error else ""
            )
            self.on_terminal(job)
        else:
            log.warning("request %s: not ours any more (its lease was taken back); this outcome is dropped", job.id)
        return saved


def can_run(node: NodeRow, now: float, lease_s: float) -> bool:
    """Whether a node is a GPU worker that is alive (a heartbeat within ``lease_s``) and not broken."""
    fresh = node.heartbeat_at >= now - lease_s
    return node.is_worker and fresh and node.state not in ("failed", "gpu_fault", "stopped")
