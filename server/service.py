"""Jobs from submit to result: the queue, cancellation, timeouts, restarts, results and retention.

One :class:`JobService` per process; it owns the GPU lane, a :class:`~server.worker.GpuWorker` (batching,
input look-ahead, running the engine, GPU faults). Everything here runs on the event loop except the
engine calls (``prepare`` in a thread pool, ``run`` on the GPU worker's thread) and image encoding; the
engine's progress callbacks are marshalled back onto the loop.

Order of work for one job: submit (row committed) -> queued -> inputs fetched and decoded ahead of
time (a bounded look-ahead) -> the worker takes the oldest ready job and every queued job with the
same batch key (up to ``max_batch_size``) -> running -> the worker hands the results to a finalizer
and moves on -> encoding and file writes -> terminal state and webhook committed together.
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

from pipelines.errors import RequestCancelled

from .engine_host import EngineHost
from .errors import AlreadyCompleted, Draining, EngineUnavailable, IdempotencyKeyReused, NotFound, job_error
from .fetch import FetchGuard
from .files import FileStore
from .inputs import InputFetcher, batch_key_of, rows_of, slim_input
from .job_queue import JobQueue
from .jobs import Job, JobState
from .limits import RequestLimits
from .metrics import Metrics
from .redact import public_message
from .results import InlineResults, encode_output
from .settings import Settings
from .store import JobStore, StoreUnavailable, WebhookRow
from .webhooks import WebhookSender, webhook_body
from .worker import GpuWorker

log = logging.getLogger("inpaint-server.jobs")

TERMINAL_CACHE = 5000  # finished jobs kept in memory for fast status polls


class JobService:
    """Every job's life: submit, status, cancel, start timeouts, recovery after a restart, draining,
    terminal states (with their webhook), retention. The GPU lane is :attr:`worker`."""

    def __init__(
        self,
        settings: Settings,
        store: JobStore,
        files: FileStore,
        host: EngineHost,
        metrics: Metrics,
        webhooks: WebhookSender,
        clock: Callable[[], float] = time.time,
        fetch_guard: FetchGuard | None = None,
        exit_process: Callable[[int], None] | None = None,
    ) -> None:
        self.settings = settings
        self.store = store
        self.files = files
        self.host = host
        self.metrics = metrics
        self.webhooks = webhooks
        self.clock = clock
        self.fetcher = InputFetcher(
            files,
            settings.input_max_bytes,
            settings.input_timeout_s,
            guard=fetch_guard or FetchGuard(settings.fetch_allow, resolve_timeout_s=settings.fetch_connect_timeout_s),
            connect_timeout_s=settings.fetch_connect_timeout_s,
            retry_base_s=settings.fetch_retry_base_s,
        )
        self.limits = RequestLimits(settings, clock)
        self.queue = JobQueue()
        self.active: dict[str, Job] = {}  # queued and running
        self.finished: OrderedDict[str, Job] = OrderedDict()
        self.inline_results = InlineResults()
        self._tasks: list[asyncio.Task] = []
        self._saving: set[asyncio.Task] = set()  # terminal states waiting for the store to come back
        self._seq = store.next_seq()
        self.draining = False  # SIGTERM: no new work; see drain()
        # The GPU lane; ``exit_process`` ends the process after a GPU fault (replaced in in-process tests).
        self.worker = GpuWorker(self, exit_process)

    # ------------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        self.recover()
        self._tasks = [
            asyncio.create_task(self.worker.run(), name="gpu-worker"),
            asyncio.create_task(self._sweeper(), name="sweeper"),
            asyncio.create_task(self._collector(), name="collector"),
        ]

    async def stop(self) -> None:
        lookahead = self.worker.lookahead_tasks()
        pending = [*self._tasks, *lookahead, *self._saving]  # an unsaved outcome re-runs after the restart
        for task in pending:
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
        if self.worker.finalizers:
            await asyncio.gather(*self.worker.finalizers, return_exceptions=True)
        await self.fetcher.close()

    def recover(self) -> None:
        """Requeue what a previous process left: queued jobs in order, an interrupted job once more."""
        for job in self.store.unfinished():
            if job.state is JobState.RUNNING:
                if job.cancel_requested:  # the cancel was acknowledged (202); a restart must not undo it
                    self.finish_now(job, "cancelled", "the request was cancelled while running")
                    continue
                if job.sync:
                    self.finish_now(job, "interrupted", "the server restarted while this synchronous run was running")
                    continue
                if job.attempts >= self.settings.max_attempts:
                    self.finish_now(
                        job,
                        "interrupted",
                        f"the server stopped while this request was running, {job.attempts} times; not retried again",
                    )
                    continue
                job.state = JobState.QUEUED
                job.started_at = None
                job.add_log(f"Interrupted by a server restart; running again (attempt {job.attempts + 1})", "WARN")
                self.store.save(job)
                log.info("request %s requeued after restart (attempts so far %d)", job.id, job.attempts)
            elif job.sync:
                self.finish_now(job, "interrupted", "the server restarted before this synchronous run started")
                continue
            self.active[job.id] = job
            self.queue.push(job)
        self.worker.wake()
        self.update_gauges()

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
        if self.host.state == "failed":
            raise EngineUnavailable(self.unavailable_message())
        self.limits.check(payload, owner, len(self.queue))  # 422 / 413 / 429 before anything is stored
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
            seq=self._next_seq(),
            sync=sync,
            webhook_url=webhook_url,
            start_deadline=None if start_timeout is None else now + start_timeout,
            batch_key=batch_key_of(app_id, payload, job_id),
            rows=rows_of(payload),
        )
        job.add_log("Request queued", when=now)
        self.store.add(job, idempotency)
        self.active[job.id] = job
        self.queue.push(job)
        if self.host.ready:
            # Fetch and decode now (look-ahead), so the job can join the next batch as soon as the GPU is free.
            self.worker.ensure_prepared(self.host.engine)
        self.worker.wake()
        self.metrics.requests.labels(app_id, "sync" if sync else "queue").inc()
        self.update_gauges()
        log.info("request %s queued for %s (priority %d)", job.id, app_id, priority)
        return job

    def unavailable_message(self) -> str:
        """Why requests cannot run: the models failed to load (redacted for clients)."""
        return f"the models failed to load ({public_message(self.host.error or '')}); see the server log"

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
        job = self.active.get(job_id) or self.finished.get(job_id)
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
        job = self.active.get(job_id) or self.finished.get(job_id) or self.store.get(job_id)
        if job is None or (name is not None and name not in job.files):
            return False
        return job.expires_at is None or job.expires_at > self.clock()

    def position(self, job: Job) -> int | None:
        """Queued jobs ahead of ``job``, from the store: right whichever node answers."""
        return self.store.position(job.id) if job.state is JobState.QUEUED else None

    def result_of(self, job: Job) -> dict[str, Any] | None:
        return job.result if job.result is not None else self.inline_results.output(job.id)

    def release_inline(self, job_id: str) -> None:
        """Forget a sync_mode result (a sync run has returned it to its caller, or it expired)."""
        self.inline_results.release(job_id)

    def cancel(self, job: Job) -> None:
        """Cancel a queued job (it never runs) or ask a running one to stop at its next step."""
        if job.state.is_terminal():
            raise AlreadyCompleted("already completed", request_id=job.id)
        if job.state is JobState.QUEUED:
            self.fail_queued(job, "cancelled", "the request was cancelled before it started")
            return
        if not job.cancel_requested:
            job.cancel_requested = True
            job.add_log("Cancellation requested; stopping at the next step", "WARN", self.clock())
            self.store.save(job)  # durable before the 202
            job.notify()
            log.info("request %s cancellation requested while running", job.id)

    async def wait(self, job: Job, timeout: float | None = None) -> bool:
        """Wait until ``job`` changes (True) or ``timeout`` passes (False)."""
        if job.state.is_terminal():
            return True
        event = job.changed_event()
        try:
            await asyncio.wait_for(event.wait(), timeout)
            return True
        except TimeoutError:
            return False

    # ------------------------------------------------------------------ finishing

    async def finalize(self, job: Job, result: Any) -> None:
        """Make a job the GPU worker ran terminal: encode and save its images, or record its error."""
        try:
            for warning in getattr(result, "warnings", None) or ():
                job.add_log(warning, "WARN", self.clock())
            if result is None:
                self.finish_now(job, "engine_error", "the engine returned no result for this request")
            elif job.cancel_requested or isinstance(result.error, RequestCancelled):
                self.finish_now(job, "cancelled", "the request was cancelled while running")
            elif result.error is not None:
                field = getattr(result.error, "field", None)
                message = getattr(result.error, "message", None) or str(result.error)
                self.finish_now(job, result.error.error_type, message, field)
            else:
                output = await asyncio.to_thread(encode_output, job, result, self.files)
                self._succeed(job, output, result.timings)
        except Exception:
            log.exception("finalizing request %s failed", job.id)
            if not job.state.is_terminal():
                self.finish_now(job, "internal_error", "the result could not be saved")

    def _succeed(self, job: Job, output: dict[str, Any], timings: dict[str, float]) -> None:
        now = self.clock()
        job.inference_time = timings.get("inference")
        if job.sync_mode:
            self.inline_results.hold(job.id, output)
        else:
            job.result = output
        for stage, seconds in timings.items():
            self.metrics.latency.labels(job.app_id, stage).observe(seconds)
        job.add_log(f"Done in {now - (job.started_at or now):.2f} s", when=now)
        self._terminal(job, JobState.SUCCEEDED, 200, output, now)

    def finish_now(self, job: Job, error_type: str, message: str, field: str | None = None) -> None:
        """Make ``job`` terminal with an error (cancelled, timed out, failed)."""
        now = self.clock()
        message = public_message(message)
        status, body = job_error(error_type, message, field)
        job.error = f"{field}: {message}" if field else message
        job.error_type = error_type
        job.error_body = body
        state = JobState.CANCELLED if error_type == "cancelled" else JobState.FAILED
        job.add_log(job.error, "ERROR", now)
        self.metrics.failures.labels(job.app_id, error_type).inc()
        self._terminal(job, state, status, body, now)

    def _terminal(self, job: Job, state: JobState, status: int, payload: dict[str, Any], now: float) -> None:
        slim_input(job)
        job.state = state
        job.http_status = status
        job.finished_at = now
        job.expires_at = now + self.settings.result_retention_s
        webhook = None
        if job.webhook_url:
            body = webhook_body(job.id, state is JobState.SUCCEEDED, payload, status)
            webhook = WebhookRow(job.id, job.webhook_url, body, job.owner, 0, now)
        try:
            self.store.save(job, webhook)
        except StoreUnavailable as exc:  # keep the outcome in memory and write it when the store is back
            log.warning("request %s %s, but the job store is unavailable; saving it later: %s", job.id, state, exc)
            task = asyncio.create_task(self._save_when_back(job, webhook), name=f"save-{job.id}")
            self._saving.add(task)
            task.add_done_callback(self._saving.discard)
        if webhook is not None:
            self.webhooks.wake()
        self.active.pop(job.id, None)
        self._remember(job)
        self.metrics.completed.labels(job.app_id, state.value).inc()
        self.metrics.latency.labels(job.app_id, "total").observe(max(now - job.created_at, 0.0))
        self.update_gauges()
        job.notify()
        log.info("request %s %s%s", job.id, state.value, f" ({job.error_type}: {job.error})" if job.error else "")

    async def _save_when_back(self, job: Job, webhook: WebhookRow | None) -> None:
        """A terminal state reached while the store was down: retried until written. Until then the job is
        still running in the store, so a crash meanwhile runs it again (same seed) rather than losing it."""
        delay = 0.5
        while True:
            await asyncio.sleep(delay)
            try:
                self.store.save(job, webhook)
            except StoreUnavailable:
                delay = min(delay * 2, 2.0)
                continue
            if webhook is not None:
                self.webhooks.wake()
            log.info("request %s: its %s state is saved now that the store is back", job.id, job.state)
            return

    def _remember(self, job: Job) -> None:
        self.finished[job.id] = job
        self.finished.move_to_end(job.id)
        while len(self.finished) > TERMINAL_CACHE:
            old_id, _ = self.finished.popitem(last=False)
            self.release_inline(old_id)

    # ------------------------------------------------------------------ draining (SIGTERM)

    async def drain(self, grace_s: float) -> bool:
        """Stop taking work and give the running batch up to ``grace_s`` seconds to finish (results saved).

        From now on submits answer 503 (:class:`Draining`) and no batch starts. Queued requests stay queued
        in the store for the next start; synchronous runs still waiting are answered with a retryable 503,
        since after a restart nobody would be waiting for them. Returns whether the batch finished in time;
        if not, it is asked to stop at its next step and its rows stay ``running``, so ``recover()`` runs it
        again after the restart (within ``max_attempts``).
        """
        if not self.draining:
            self.draining = True
            log.info("draining: %d queued requests stay queued for the next start", len(self.queue))
            for job_id in self.queue.head(len(self.queue)):
                job = self.active[job_id]
                if job.sync:
                    self.fail_queued(job, "draining", "the server is shutting down; this run did not start, retry it")
            self.worker.wake()
        deadline = time.monotonic() + grace_s
        try:
            while (self.worker.running or self.worker.finalizers) and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
        finally:
            if self.worker.running:
                self._abandon_running(grace_s)
        if self.worker.finalizers:  # the batch finished in time; its results are being written
            await asyncio.gather(*self.worker.finalizers, return_exceptions=True)
        return not self.worker.abandoned

    def _abandon_running(self, grace_s: float) -> None:
        self.worker.abandon()
        now = self.clock()
        for job_id in self.worker.running:
            job = self.active.get(job_id)
            if job is not None:
                job.add_log(
                    f"The server shut down before this request finished ({grace_s:g} s grace period); "
                    "it runs again when the server restarts (within max_attempts)",
                    "WARN",
                    now,
                )
                self.store.save(job)
        running = len(self.worker.running)
        log.warning("drain grace over (%g s); %d running requests run again on restart", grace_s, running)

    # ------------------------------------------------------------------ clocks and housekeeping

    def fail_queued(self, job: Job, error_type: str, message: str, field: str | None = None) -> None:
        """Take a job that has not started out of the queue (dropping its input look-ahead) and fail it."""
        self.queue.remove(job.id)
        self.worker.drop_prepared(job.id)
        self.finish_now(job, error_type, message, field)
        self.worker.wake()

    def timed_out(self, job: Job) -> bool:
        """Fail a queued job whose start deadline (X-Fal-Request-Timeout) has passed."""
        if job.state is JobState.QUEUED and job.start_deadline is not None and self.clock() >= job.start_deadline:
            self.fail_queued(job, "request_timeout", "the request did not start before its start timeout")
            return True
        return False

    async def _sweeper(self, interval: float = 0.1) -> None:
        while True:
            await asyncio.sleep(interval)
            for job_id in list(self.queue.head(len(self.queue))):
                job = self.active.get(job_id)
                if job is not None:
                    self.timed_out(job)

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
                self.release_inline(job.id)
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

    def _next_seq(self) -> int:
        seq = self._seq
        self._seq += 1
        return seq

    def update_gauges(self) -> None:
        """Set the queue depth and in-progress gauges from the queue and the GPU lane."""
        self.metrics.queue_depth.set(len(self.queue))
        self.metrics.in_progress.set(len(self.worker.running))
