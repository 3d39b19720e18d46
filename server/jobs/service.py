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
from ..disk_space import DiskSpace
from ..http.errors import AlreadyCompleted, Draining, EngineUnavailable, IdempotencyKeyReused, NotFound
from ..http.lifecycle import shorter_than_retention
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
from .queue_bound import QueueBound
from .store import JobStore, NodeRow, StoreUnavailable
from .watcher import JobWatcher
from .worker import GpuWorker

log = logging.getLogger("inpaint-server.jobs")

DRAINING_SYNC = (
    "the server is shutting down and takes no new synchronous runs; retry shortly (another instance, or this one "
    "after its restart), or submit to the queue, which takes requests while the server drains"
)
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
        disk: DiskSpace | None = None,
    ) -> None:
        self.settings = settings
        self.disk = disk  # while a disk is full, submits are refused (507) before anything is written
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
        self.queue_bound = QueueBound(store, settings, self.live_nodes, clock)
        self.watcher = JobWatcher(store)
        self.sweeper = Sweeper(
            store, settings.lease_s, settings.max_attempts, settings.result_retention_s, clock, self.terminal_written
        )
        self.finished: OrderedDict[str, Job] = OrderedDict()
        self._tasks: list[asyncio.Task] = []
        self.draining = False  # SIGTERM: no new sync runs, no new batches; see drain()

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
        files_lifetime_s: float | None = None,
        no_retry: bool = False,
        previews: bool = False,
    ) -> Job:
        """Create a job; it is durable when this returns (with its ``(Idempotency-Key, fingerprint)``, if given).

        While draining, a queue submit is still taken (a durable write: it runs after the restart, or on another
        worker); a sync run is refused with a retryable 503, since its caller waits on this process, which is
        about to exit. ``files_lifetime_s`` (an object lifecycle preference) makes its files expire that long
        after it ends, when that is shorter than the result retention (never longer). ``no_retry``: never run
        again after a crash or a lost lease (``x-fal-no-retry``). ``previews``: the worker writes each step's
        preview (a step-preview stream waits for the job).
        """
        if self.draining and sync:
            raise Draining(DRAINING_SYNC)
        if self.host is not None and self.host.state == "failed" and self.worker is not None:
            raise EngineUnavailable(self.unavailable_message())
        if self.disk is not None:
            self.disk.check()
        # 422 / 413 / 429 before anything is stored
        rows = rows_of(payload)
        self.limits.check_input(payload)
        self.queue_bound.admit(rows)
        self.limits.check_rate(owner)
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
            rows=rows,
            waiter=self.node.id if sync else None,
            files_lifetime_s=shorter_than_retention(files_lifetime_s, self.settings.result_retention_s),
            no_retry=no_retry,
            previews=previews,
        )
        job.add_log("Request queued", when=now)
        self.store.add(job, idempotency)
        self.queue_bound.added(rows)
        job.input = {}  # the store has it; the worker that runs the job reads it from there
        if self.worker is not None:
            self.worker.wake_threadsafe()  # a large submit is stored from a worker thread (http/bodies.py)
        self.metrics.requests.labels(app_id, "sync" if sync else "queue").inc()
        log.info("request %s queued for %s (priority %d)", job.id, app_id, priority)
        return job

    def live_nodes(self) -> list[NodeRow]:
        """The store's node rows, this node's own as it is now (its row is only written every heartbeat)."""
        me = self.node.current()
        return [me if n.id == me.id else n for n in self.store.nodes()]

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
        now = self.clock()
        return all(t is None or t > now for t in (job.expires_at, job.files_expire_at))

    def position(self, job: Job) -> int | None:
        """Queued jobs ahead of ``job``, from the store: right whichever node answers."""
        return self.store.position(job.id) if job.state is JobState.QUEUED else None

    def preview(self, job: Job) -> dict[str, Any] | None:
        """A running job's newest step preview (only jobs submitted with ``previews`` have one)."""
        return self.store.preview(job.id) if job.previews and job.state is JobState.RUNNING else None

    def result_of(self, job: Job) -> dict[str, Any] | None:
        """A finished job's output; None once a sync run has handed its inline (``sync_mode``) output over."""
        return job.result if job.result is not None else self.store.result(job.id)

    def release_inline(self, job: Job) -> None:
        """A sync run has returned its ``sync_mode`` output (data URIs) to its caller: the store keeps none."""
        if any(str(image.get("url", "")).startswith("data:") for image in (job.result or {}).get("images", [])):
            try:
                self.store.clear_result(job.id)
            except StoreUnavailable as exc:  # its caller has the answer already; it stays until the retention ends
                log.warning("request %s: its inline result is kept (%s)", job.id, exc)
                return
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

        From now on queue submits are still taken (they stay queued in the store, like the requests queued
        before, for the next start or another worker), status, result, cancel and streams still answer, and sync
        runs answer 503 (:class:`Draining`). Sync runs this node's callers wait for and that have not started
        are answered with the same retryable 503, since after a restart nobody would be waiting for them.
        Returns whether the batch finished in time (see :meth:`GpuWorker.drain`).
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
                await asyncio.to_thread(self.collect_garbage)  # file deletions (a bucket's too) off the event loop
            except StoreUnavailable as exc:
                log.warning("garbage collection waits for the job store: %s", exc)
            except Exception:
                log.exception("garbage collection failed")
            await asyncio.sleep(self.settings.gc_interval_s)

    def collect_garbage(self) -> int:
        """Delete expired requests and their files, files whose own lifecycle ended, and expired uploads (an
        unfinished multipart upload's parts too). Returns how many requests went."""
        now = self.clock()
        removed = files = uploads = 0
        while expired := self.store.expired(now):
            for job in expired:
                self.files.delete_results(job.id)
                self.finished.pop(job.id, None)
            self.store.delete([j.id for j in expired])
            removed += len(expired)
        while due := self.store.expired_files(now):
            for job_id in due:
                self.files.delete_results(job_id)
                self.finished.pop(job_id, None)
            self.store.forget_files(due)
            files += len(due)
        while rows := self.store.expired_uploads(now):
            for row in rows:
                self.files.delete_upload(row.token, row.parts_ref if row.size is None or row.size < 0 else None)
            self.store.delete_uploads([row.token for row in rows])
            uploads += len(rows)
        if removed or files or uploads:
            log.info("collected %d expired requests, the files of %d requests and %d uploads", removed, files, uploads)
        return removed

    def update_gauges(self) -> None:
        """Set the queue depth and in-progress gauges from the store (every node's work, not just this one's)."""
        counts = self.store.counts()
        self.metrics.queue_depth.set(counts.get(JobState.QUEUED.value, 0))
        self.metrics.in_progress.set(counts.get(JobState.RUNNING.value, 0))
