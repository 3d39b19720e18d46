"""Jobs as the API sees them: submit, status, cancel, waiting for a change, draining, sweeping and retention.

The store is the truth on every node: a job is written before its id is returned, status and results are
read from it, and a cancel is a flag in it that the worker running the job reads between steps. The GPU
workers (:mod:`.worker`) take the queue from the store; one may run in this process (the embedded
default), which :class:`JobService` then wakes on a submit and drains with the server, or they run as
processes of their own on this host or others. Every API node also sweeps (:class:`~.nodes.Sweeper`): it
takes back the leases of workers that stopped and fails requests past their start timeout.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
import uuid
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

from ..delivery.file_store import FileStore
from ..delivery.webhooks import WebhookSender
from ..http.errors import AlreadyCompleted, Draining, EngineUnavailable, IdempotencyKeyReused, NotFound
from ..http.limits import RequestLimits
from ..inputs.input_fetch import batch_key_of, rows_of
from ..inputs.url_guard import FetchGuard
from ..metrics import Metrics
from ..redact import public_message
from ..settings import Settings
from . import outcomes
from .engine_host import EngineHost
from .job import Job, JobState
from .nodes import Node, Sweeper
from .store import JobStore, StoreUnavailable
from .watcher import JobWatcher
from .worker import GpuWorker

log = logging.getLogger("inpaint-server.jobs")

TERMINAL_CACHE = 5000  # finished jobs kept in memory for fast status polls (terminal rows never change)
SWEEP_EVERY = 10  # sweeper ticks (of 0.1 s) between lease sweeps; start deadlines are checked every tick


class JobService:
    """Every job's life as the API sees it (see the module). ``worker`` is the GPU lane running in this process,
    if any (``host`` is its engine's host)."""

    def __init__(
        self,
        settings: Settings,
        store: JobStore,
        files: FileStore,
        metrics: Metrics,
        webhooks: WebhookSender,
        node: Node,
        clock: Callable[[], float] = time.time,
        fetch_guard: FetchGuard | None = None,
        worker: GpuWorker | None = None,
        host: EngineHost | None = None,
    ) -> None:
        self.settings = settings
        self.store = store
        self.files = files
        self.metrics = metrics
        self.webhooks = webhooks
        self.node = node
        self.clock = clock
        self.fetch_guard = fetch_guard or FetchGuard(
            settings.fetch_allow, resolve_timeout_s=settings.fetch_connect_timeout_s
        )
        self.worker = worker
        self.host = host
        self.limits = RequestLimits(settings, clock)
        self.watcher = JobWatcher(store)
        self.sweeper = Sweeper(
            store, settings.lease_s, settings.max_attempts, settings.result_retention_s, clock, self.terminal_written
        )
        self.finished: OrderedDict[str, Job] = OrderedDict()
        self._tasks: list[asyncio.Task] = []
        self.draining = False  # SIGTERM: no new work; see drain()

    # ------------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        """Take back what stopped nodes left (this node's previous run among them), then start the lane."""
        self.watcher.start()
        try:
            self.sweeper.sweep()
        except StoreUnavailable as exc:
            log.warning("job store unavailable at start (the sweeper tries again): %s", exc)
        self._tasks = [
            asyncio.create_task(self._sweep(), name="sweeper"),
            asyncio.create_task(self._collector(), name="collector"),
        ]
        if self.worker is not None:
            self.worker.start()

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self.worker is not None:
            await self.worker.stop()
        await self.watcher.stop()

    # ------------------------------------------------------------------ requests from the API

    def submit(
        self,
        app_id: str,
        endpoint: str,
        payload: dict[str, Any],
        owner: str,
        base_url: str,
        queue_prefix: str,
        priority: int = 0,
        start_timeout: float | None = None,
        webhook_url: str | None = None,
        sync: bool = False,
        idempotency: tuple[str, str] | None = None,
    ) -> Job:
        """Create a job; it is durable when this returns (with its ``(Idempotency-Key, fingerprint)``, if given)."""
        if self.draining:
            raise Draining()
        if self.host is not None and self.host.state == "failed" and self.worker is not None:
            raise EngineUnavailable(self.unavailable_message())
        self.limits.check(payload, owner, self.store.queued_count())  # 422 / 413 / 429 before anything is stored
        now = self.clock()
        seed = payload.get("seed")
        if seed is None:
            seed = secrets.randbelow(2**32)  # drawn once, so a re-run after a restart gives the same image
        job_id = str(uuid.uuid4())
        job = Job(
            id=job_id,
            app_id=app_id,
            endpoint=endpoint,
            owner=owner,
            input=payload,
            seed=int(seed),
            created_at=now,
            base_url=base_url,
            queue_prefix=queue_prefix,
            priority=priority,
            sync=sync,
            webhook_url=webhook_url,
            start_deadline=None if start_timeout is None else now + start_timeout,
            batch_key=batch_key_of(app_id, payload, job_id),
            rows=rows_of(payload),
            waiter=self.node.id if sync else None,
        )
        job.add_log("Request queued", when=now)
        self.store.add(job, idempotency)
        job.input = {}  # the store has it; the worker that runs the job reads it from there
        if self.worker is not None:
            self.worker.wake_threadsafe()  # a large submit is stored from a worker thread (http/bodies.py)
        self.metrics.requests.labels(app_id, "sync" if sync else "queue").inc()
        log.info("request %s queued for %s (priority %d)", job.id, app_id, priority)
        return job

    def unavailable_message(self) -> str:
        """Why requests cannot run: the models failed to load (redacted for clients)."""
        error = self.host.error if self.host is not None else None
        return f"the models failed to load ({public_message(error or '')}); see the server log"

    def find_idempotent(self, owner: str, key: str, fingerprint: str) -> Job | None:
        """The live job an earlier submit with this ``Idempotency-Key`` created, or None if the key is free.

        The same key with another request is refused; a key whose job has expired is free again.
        """
        found = self.store.idempotent(owner, key)
        if found is None:
            return None
        stored_fingerprint, job_id = found
        try:
            job = self.get(job_id, owner)
        except NotFound:
            return None
        if stored_fingerprint != fingerprint:
            raise IdempotencyKeyReused(
                "this Idempotency-Key was already used for a different request (other input, app or webhook); "
                "use a new key for a new request"
            )
        return job

    def get(self, job_id: str, owner: str, endpoint: str | None = None) -> Job:
        """The job if it exists and belongs to ``owner`` (and ``endpoint`` when given); else NotFound."""
        job = self.finished.get(job_id)
        if job is None:
            job = self.store.get(job_id)
            if job is not None and job.state.is_terminal():
                self._remember(job)
        if job is None or job.owner != owner or (endpoint is not None and job.endpoint != endpoint):
            raise NotFound(f"request {job_id} not found", request_id=None)
        if job.expires_at is not None and job.expires_at <= self.clock():  # expired, not yet collected
            raise NotFound(f"request {job_id} not found (expired)", request_id=None)
        return job

    def files_live(self, job_id: str, name: str | None = None) -> bool:
        """Whether a request's generated files (or its file ``name``) may still be served (not expired)."""
        job = self.finished.get(job_id) or self.store.get(job_id)
        if job is None or (name is not None and name not in job.files):
            return False
        return job.expires_at is None or job.expires_at > self.clock()

    def position(self, job: Job) -> int | None:
        """Queued jobs ahead of ``job``, from the store: right whichever node answers."""
        return self.store.position(job.id) if job.state is JobState.QUEUED else None

    def result_of(self, job: Job) -> dict[str, Any] | None:
        """A finished job's output; None once a sync run has handed its inline (``sync_mode``) output over."""
        return job.result if job.result is not None else self.store.result(job.id)

    def release_inline(self, job: Job) -> None:
        """A sync run has returned its ``sync_mode`` output (data URIs) to its caller: the store keeps none."""
        if any(str(image.get("url", "")).startswith("data:") for image in (job.result or {}).get("images", [])):
            self.store.clear_result(job.id)
            job.result = None
            self.finished.pop(job.id, None)

    def cancel(self, job: Job) -> None:
        """Cancel a queued job (it never runs) or ask a running one to stop at its next step, on whichever
        worker runs it: a flag in the store that the worker reads between steps."""
        if job.state.is_terminal():
            raise AlreadyCompleted("already completed", request_id=job.id)
        if self.worker is not None:  # running here: stop at the next step without waiting for the store's feed
            self.worker.stop_running(job.id)
        if not self.store.request_cancel(job.id):
            raise AlreadyCompleted("already completed", request_id=job.id)
        fresh = self.store.get(job.id)
        if fresh is not None and fresh.state is JobState.QUEUED:
            # The flag keeps workers from claiming it; fail it unless a worker claimed it a moment before.
            self.finish_queued(fresh, "cancelled", "the request was cancelled before it started")
        else:
            log.info("request %s cancellation requested while running", job.id)
        if self.worker is not None:
            self.worker.wake()

    async def wait(self, job: Job, timeout: float | None = None) -> Job:
        """``job`` as it is after its next change, or ``job`` itself after ``timeout`` seconds without one."""
        if job.state.is_terminal():
            return job
        fresh = await self.watcher.changed(job, timeout)
        if fresh is None:
            return job
        if fresh.state.is_terminal():
            self._remember(fresh)
        return fresh

    # ------------------------------------------------------------------ terminal states written here

    def finish_queued(self, job: Job, error_type: str, message: str, field: str | None = None) -> bool:
        """Fail a job that has not started; False (nothing written) if a worker claimed it meanwhile."""
        return self.sweeper.fail(job, error_type, message, self.clock(), field=field)

    def terminal_written(self, job: Job) -> None:
        """A terminal state this process wrote: count it, deliver its webhook, answer polls from memory."""
        outcomes.count(self.metrics, job)
        if job.webhook_url:
            self.webhooks.wake()
        self._remember(job)
        self.watcher.poke()

    def _remember(self, job: Job) -> None:
        if any(str(image.get("url", "")).startswith("data:") for image in (job.result or {}).get("images", [])):
            return  # inline outputs (megabytes) stay in the store only
        self.finished[job.id] = job
        self.finished.move_to_end(job.id)
        while len(self.finished) > TERMINAL_CACHE:
            self.finished.popitem(last=False)

    # ------------------------------------------------------------------ draining (SIGTERM)

    async def drain(self, grace_s: float) -> bool:
        """Stop taking work and give the running batch (of this process's worker) up to ``grace_s`` seconds.

        From now on submits answer 503 (:class:`Draining`). Queued requests stay queued in the store (for the
        next start, or another worker); synchronous runs this node's callers wait for and that have not started
        are answered with a retryable 503, since after a restart nobody would be waiting for them. Returns
        whether the batch finished in time (see :meth:`GpuWorker.drain`).
        """
        if not self.draining:
            self.draining = True
            log.info("draining: %d queued requests stay queued", self.store.queued_count())
            for job_id, waiter in self.store.waiting_sync():
                job = self.store.get(job_id) if waiter == self.node.id else None
                if job is not None and job.state is JobState.QUEUED:
                    self.finish_queued(job, "draining", "the server is shutting down; this run did not start, retry it")
        if self.worker is None:
            return True
        return await self.worker.drain(grace_s)

    # ------------------------------------------------------------------ housekeeping

    async def _sweep(self, interval: float = 0.1) -> None:
        tick = 0
        while True:
            await asyncio.sleep(interval)
            tick += 1
            try:
                if tick % SWEEP_EVERY == 0:
                    self.sweeper.sweep()
                else:
                    self.sweeper.overdue()
            except StoreUnavailable:
                pass  # the requests that answer meanwhile say so
            except Exception:
                log.exception("sweeping failed")

    async def _collector(self) -> None:
        while True:
            try:
                self.collect_garbage()
            except Exception:
                log.exception("garbage collection failed")
            await asyncio.sleep(self.settings.gc_interval_s)

    def collect_garbage(self) -> int:
        """Delete expired requests, their files and expired uploads. Returns how many requests went."""
        now = self.clock()
        removed = 0
        while True:
            expired = self.store.expired(now)
            if not expired:
                break
            for job in expired:
                self.files.delete_results(job.id)
                self.finished.pop(job.id, None)
            self.store.delete([j.id for j in expired])
            removed += len(expired)
        tokens = self.store.expired_uploads(now)
        for token in tokens:
            self.files.delete_upload(token)
        if tokens:
            self.store.delete_uploads(tokens)
        if removed or tokens:
            log.info("collected %d expired requests and %d uploads", removed, len(tokens))
        return removed

    def update_gauges(self) -> None:
        """Set the queue depth and in-progress gauges from the store (every node's work, not just this one's)."""
        counts = self.store.counts()
        self.metrics.queue_depth.set(counts.get(JobState.QUEUED.value, 0))
        self.metrics.in_progress.set(counts.get(JobState.RUNNING.value, 0))
