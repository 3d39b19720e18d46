"""Jobs from submit to result: the queue, the GPU worker, cancellation, timeouts, restarts.

One :class:`JobService` per process. Everything here runs on the event loop except the engine
calls (``prepare`` in a thread pool, ``run`` on the GPU worker's thread) and image encoding; the
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
from dataclasses import dataclass
from typing import Any

from pipelines import Embedding, InpaintRequest
from pipelines.errors import EngineError, GpuFatalError, InputError, RequestCancelled

from .engine_host import EngineHost
from .errors import AlreadyCompleted, Draining, EngineUnavailable, IdempotencyKeyReused, NotFound, job_error
from .fetch import FetchGuard
from .files import FileStore
from .gpu_exit import EXIT_GPU_FAULT, GpuHung, exit_for_restart
from .inputs import InputFetcher, InputFetchError, image_size_of_json, slim_input
from .job_queue import JobQueue
from .jobs import Job, JobState
from .limits import RequestLimits
from .metrics import Metrics
from .redact import public_message
from .results import InlineResults, encode_output
from .settings import Settings
from .store import JobStore, WebhookRow
from .webhooks import WebhookSender, webhook_body

log = logging.getLogger("inpaint-server.jobs")

TERMINAL_CACHE = 5000  # finished jobs kept in memory for fast status polls


@dataclass
class _Prepared:
    prepared: Any = None  # the engine's PreparedRequest
    key: Any = None
    error: tuple[str, str, str | None] | None = None  # (error_type, message, field)


class JobService:
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
        self._prep: dict[str, asyncio.Task[_Prepared]] = {}
        self._queue_changed = asyncio.Event()
        self._tasks: list[asyncio.Task] = []
        self._finalizers: set[asyncio.Task] = set()
        self._seq = store.next_seq()
        self.running: list[str] = []
        self.draining = False  # SIGTERM: no new work; see drain()
        self._abandoned = False  # the drain grace period ran out: the running batch stops and is not finalized
        # GPU faults: when the running batch last showed progress (time.monotonic, for the watchdog), and
        # how the process ends after a fault (replaced in tests that run the server in-process).
        self._last_progress = time.monotonic()
        self._exit_process = exit_process or exit_for_restart

    # ------------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        self.recover()
        self._tasks = [
            asyncio.create_task(self._worker(), name="gpu-worker"),
            asyncio.create_task(self._sweeper(), name="sweeper"),
            asyncio.create_task(self._collector(), name="collector"),
        ]

    async def stop(self) -> None:
        for task in [*self._tasks, *self._prep.values()]:
            task.cancel()
        await asyncio.gather(*self._tasks, *self._prep.values(), return_exceptions=True)
        if self._finalizers:
            await asyncio.gather(*self._finalizers, return_exceptions=True)
        await self.fetcher.close()

    def recover(self) -> None:
        """Requeue what a previous process left: queued jobs in order, an interrupted job once more."""
        for job in self.store.unfinished():
            if job.state is JobState.RUNNING:
                if job.cancel_requested:  # the cancel was acknowledged (202); a restart must not undo it
                    self._finish_now(job, "cancelled", "the request was cancelled while running")
                    continue
                if job.sync:
                    self._finish_now(job, "interrupted", "the server restarted while this synchronous run was running")
                    continue
                if job.attempts >= self.settings.max_attempts:
                    self._finish_now(
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
                self._finish_now(job, "interrupted", "the server restarted before this synchronous run started")
                continue
            self.active[job.id] = job
            self.queue.push(job)
        self._queue_changed.set()
        self._update_gauges()

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
            raise EngineUnavailable(self._unavailable())
        self.limits.check(payload, owner, len(self.queue))  # 422 / 413 / 429 before anything is stored
        now = self.clock()
        seed = payload.get("seed")
        if seed is None:
            seed = secrets.randbelow(2**32)  # drawn once, so a re-run after a restart gives the same image
        job = Job(
            id=str(uuid.uuid4()),
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
        )
        job.add_log("Request queued", when=now)
        self.store.add(job, idempotency)
        self.active[job.id] = job
        self.queue.push(job)
        if self.host.ready:
            # Fetch and decode now (look-ahead), so the job can join the next batch as soon as the GPU is free.
            self._ensure_prepared(self.host.engine)
        self._queue_changed.set()
        self.metrics.requests.labels(app_id, "sync" if sync else "queue").inc()
        self._update_gauges()
        log.info("request %s queued for %s (priority %d)", job.id, app_id, priority)
        return job

    def _unavailable(self) -> str:
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
        return self.queue.position(job.id)

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
            self._fail_queued(job, "cancelled", "the request was cancelled before it started")
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

    # ------------------------------------------------------------------ the GPU worker

    async def _worker(self) -> None:
        engine = await self.host.wait_ready()
        if engine is None:  # the models did not load: say so to every waiting request, now and later
            while True:
                for job_id in self.queue.head(len(self.queue)):
                    self._fail_queued(self.active[job_id], "engine_unavailable", self._unavailable())
                self._queue_changed.clear()
                await self._queue_changed.wait()
        while True:
            try:
                await self._run_next(engine)
            except asyncio.CancelledError:
                raise
            except Exception:  # never let one bad batch stop the lane
                log.exception("GPU worker iteration failed")
                await asyncio.sleep(0.1)

    async def _run_next(self, engine: Any) -> None:
        while not len(self.queue) or self.draining:
            self._queue_changed.clear()
            await self._queue_changed.wait()
        self._ensure_prepared(engine)
        head_id = self._next_head()
        head = self.active[head_id]
        task = self._prep[head_id]
        # Wait for the head's inputs, but re-evaluate if the queue changes (cancel, higher priority) or, while
        # the head downloads, when the inputs of a job behind it are ready.
        self._queue_changed.clear()
        changed = asyncio.ensure_future(self._queue_changed.wait())
        waits = {task, changed}
        if not task.done() and self._downloads(head):
            waits |= {t for t in self._prep.values() if not t.done()}
        await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
        changed.cancel()
        if not task.done() or head_id not in self.queue or self.draining:
            return
        prep = task.result()
        if prep.error is not None:
            self._fail_queued(head, *prep.error)
            return
        if self._timed_out(head):
            return
        batch = [head]
        for job_id in self.queue.head(self.settings.max_batch_size * 4):
            if len(batch) >= self.settings.max_batch_size:
                break
            if job_id == head_id:
                continue
            other = self._prep.get(job_id)
            if other is None or not other.done() or other.cancelled():
                continue
            p = other.result()
            if p.error is None and p.key == prep.key and not self._timed_out(self.active[job_id]):
                batch.append(self.active[job_id])
        now = self.clock()
        prepared = []
        for job in batch:
            self.queue.remove(job.id)
            prepared.append(self._prep.pop(job.id).result().prepared)
            job.state = JobState.RUNNING
            job.started_at = now
            job.attempts += 1
            job.add_log(f"Starting inference ({len(batch)} request(s) in this batch)", when=now)
            self.store.save(job)
            job.notify()
            self.metrics.latency.labels(job.app_id, "queue").observe(max(now - job.created_at, 0.0))
            log.info("request %s running (attempt %d, batch of %d)", job.id, job.attempts, len(batch))
        self.running = [j.id for j in batch]
        self.metrics.batch_size.observe(len(batch))
        self._update_gauges()
        self._ensure_prepared(engine)  # fetch the next inputs while the GPU works

        loop = asyncio.get_running_loop()
        jobs = {j.id: j for j in batch}

        def should_stop(request_id: str) -> bool:
            job = jobs.get(request_id)
            return job is not None and (job.cancel_requested or self._abandoned)

        def on_progress(request_id: str, step: int, total: int) -> None:
            self._last_progress = time.monotonic()  # read by the watchdog (on this thread: no loop lag)
            loop.call_soon_threadsafe(self._progress, request_id, step, total)

        self._last_progress = time.monotonic()
        try:
            results = await self._watched(asyncio.to_thread(engine.run, prepared, should_stop, on_progress))
        except (GpuFatalError, GpuHung) as exc:
            await self._gpu_fault(batch, str(exc))
            return
        except Exception as exc:
            log.exception("engine failure on a batch of %d", len(batch))
            results = None
            error = f"inference failed: {type(exc).__name__}"
        if self._abandoned:  # shutting down: the rows stay running, so the next start runs them again
            return
        self.running = []
        if results is None:
            for job in batch:
                self._finish_now(job, "engine_error", error)
        else:
            by_id = {r.request_id: r for r in results}
            for job in batch:
                task = asyncio.create_task(self._finalize(job, by_id.get(job.id)))
                self._finalizers.add(task)
                task.add_done_callback(self._finalizers.discard)
        self._update_gauges()

    # ------------------------------------------------------------------ GPU faults

    async def _watched(self, work: Any) -> Any:
        """Await the engine; raise :class:`GpuHung` once it shows no progress for ``step_timeout_s``.

        Progress is a denoising step; the time before the first step (text encoding) and after the
        last (VAE decode, safety checker) counts too, so the limit must cover those stages as well.
        """
        task = asyncio.ensure_future(work)
        limit = self.settings.step_timeout_s
        if not limit:
            return await task
        interval = min(1.0, max(limit / 4, 0.05))
        while True:
            done, _ = await asyncio.wait({task}, timeout=interval)
            if done:
                return task.result()
            idle = time.monotonic() - self._last_progress
            if idle > limit:
                raise GpuHung(f"the GPU made no progress for {idle:.1f} s (step_timeout_s={limit:g}); presumed hung")

    async def _gpu_fault(self, batch: list[Job], reason: str) -> None:
        """A fatal GPU error or a hung GPU: this process cannot run anything any more.

        Readiness turns 503 with the reason; the batch's rows stay ``running`` with their attempt
        counted, so ``recover()`` after the restart runs them once more, or fails them ``interrupted``
        after ``max_attempts`` (a job that crashes the process every time is not replayed forever);
        results of earlier batches still being written are let finish; then the process exits with
        EXIT_GPU_FAULT for the supervisor to restart it.
        """
        self.host.fault(reason)
        log.critical("GPU fault, the server stops: %s (requests %s)", reason, ", ".join(j.id for j in batch))
        now = self.clock()
        for job in batch:
            if job.state is JobState.RUNNING:
                message = "GPU fault during this request; it runs again after the server restarts, if attempts remain"
                job.add_log(message, "ERROR", now)
                self.store.save(job)
                job.notify()
        if self._finalizers:
            await asyncio.wait(set(self._finalizers), timeout=30)
        await asyncio.sleep(self.settings.gpu_fault_exit_delay_s)  # readiness probes see the 503 meanwhile
        log.critical("exiting with status %d so that a supervisor restarts the server", EXIT_GPU_FAULT)
        self._exit_process(EXIT_GPU_FAULT)
        await asyncio.Event().wait()  # (exit replaced in tests) the lane stays stopped, as in a dead process

    def _progress(self, request_id: str, step: int, total: int) -> None:
        job = self.active.get(request_id)
        if job is not None and job.state is JobState.RUNNING:
            job.add_log(f"Step {step}/{total}", when=self.clock())
            job.notify()

    def _next_head(self) -> str:
        """The job to run next: the queue's head or, while the head still downloads a remote input, the oldest
        job behind it whose inputs are ready, so a slow image host cannot hold the GPU lane (case S7)."""
        window = self.queue.head(self.settings.max_batch_size * 2)
        head_id = window[0]
        if head_id not in self._prep or self._prep[head_id].done() or not self._downloads(self.active[head_id]):
            return head_id
        return next((j for j in window[1:] if j in self._prep and self._prep[j].done()), head_id)

    def _downloads(self, job: Job) -> bool:
        """Whether preparing ``job`` fetches a URL over the network (not only data URIs and this server's files)."""
        data = job.input
        embeddings = [e.get("path") for e in data.get("embeddings") or [] if isinstance(e, dict)]
        return any(self.fetcher.is_remote(s) for s in (data.get("image_url"), data.get("mask_url"), *embeddings))

    def _ensure_prepared(self, engine: Any) -> None:
        """Start fetching and decoding inputs for the first few queued jobs."""
        for job_id in self.queue.head(self.settings.max_batch_size * 2):
            if job_id not in self._prep:
                self._prep[job_id] = asyncio.create_task(self._prepare(engine, self.active[job_id]))

    async def _prepare(self, engine: Any, job: Job) -> _Prepared:
        started = time.perf_counter()
        data = job.input
        try:
            image, mask = await asyncio.gather(
                self.fetcher.fetch(data["image_url"], "image_url"), self.fetcher.fetch(data["mask_url"], "mask_url")
            )
            embeddings = []
            for i, emb in enumerate(data.get("embeddings") or []):
                raw = await self.fetcher.fetch(emb["path"], f"embeddings.{i}.path")
                embeddings.append(Embedding(data=raw, tokens=list(emb.get("tokens") or ["<s0>", "<s1>"]), name=f"e{i}"))
            request = InpaintRequest(
                app_id=job.app_id,
                image=image,
                mask=mask,
                prompt=data["prompt"],
                steps=int(data["num_inference_steps"]),
                strength=float(data["strength"]),
                seed=job.seed,
                num_images=int(data["num_images"]),
                image_size=image_size_of_json(data["image_size"]),
                embeddings=embeddings,
                enable_safety_checker=bool(data["enable_safety_checker"]),
                expand_prompt=bool(data["expand_prompt"]),
                request_id=job.id,
                max_image_pixels=self.settings.max_image_pixels,
            )
            fetched = time.perf_counter()
            prepared = await asyncio.to_thread(engine.prepare, request)
            prepared.timings["fetch"] = fetched - started
            slim_input(job)
            return _Prepared(prepared=prepared, key=engine.batch_key(prepared))
        except InputFetchError as exc:
            return _Prepared(error=(exc.error_type, exc.message, exc.field))
        except InputError as exc:
            return _Prepared(error=("invalid_input", exc.message, exc.field))
        except EngineError as exc:
            return _Prepared(error=(exc.error_type, str(exc), None))
        except Exception as exc:
            log.exception("preparing request %s failed", job.id)
            return _Prepared(error=("internal_error", f"could not prepare the request ({type(exc).__name__})", None))

    # ------------------------------------------------------------------ finishing

    async def _finalize(self, job: Job, result: Any) -> None:
        try:
            for warning in getattr(result, "warnings", None) or ():
                job.add_log(warning, "WARN", self.clock())
            if result is None:
                self._finish_now(job, "engine_error", "the engine returned no result for this request")
            elif job.cancel_requested or isinstance(result.error, RequestCancelled):
                self._finish_now(job, "cancelled", "the request was cancelled while running")
            elif result.error is not None:
                field = getattr(result.error, "field", None)
                message = getattr(result.error, "message", None) or str(result.error)
                self._finish_now(job, result.error.error_type, message, field)
            else:
                output = await asyncio.to_thread(encode_output, job, result, self.files)
                self._succeed(job, output, result.timings)
        except Exception:
            log.exception("finalizing request %s failed", job.id)
            if not job.state.is_terminal():
                self._finish_now(job, "internal_error", "the result could not be saved")

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

    def _finish_now(self, job: Job, error_type: str, message: str, field: str | None = None) -> None:
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
        self.store.save(job, webhook)
        if webhook is not None:
            self.webhooks.wake()
        self.active.pop(job.id, None)
        self._remember(job)
        self.metrics.completed.labels(job.app_id, state.value).inc()
        self.metrics.latency.labels(job.app_id, "total").observe(max(now - job.created_at, 0.0))
        self._update_gauges()
        job.notify()
        log.info("request %s %s%s", job.id, state.value, f" ({job.error_type}: {job.error})" if job.error else "")

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
                    self._fail_queued(job, "draining", "the server is shutting down; this run did not start, retry it")
            self._queue_changed.set()
        deadline = time.monotonic() + grace_s
        try:
            while (self.running or self._finalizers) and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
        finally:
            if self.running:
                self._abandon_running(grace_s)
        if self._finalizers:  # the batch finished in time; its results are being written
            await asyncio.gather(*self._finalizers, return_exceptions=True)
        return not self._abandoned

    def _abandon_running(self, grace_s: float) -> None:
        self._abandoned = True
        now = self.clock()
        for job_id in self.running:
            job = self.active.get(job_id)
            if job is not None:
                job.add_log(
                    f"The server shut down before this request finished ({grace_s:g} s grace period); "
                    "it runs again when the server restarts (within max_attempts)",
                    "WARN",
                    now,
                )
                self.store.save(job)
        log.warning("drain grace over (%g s); %d running requests run again on restart", grace_s, len(self.running))

    # ------------------------------------------------------------------ clocks and housekeeping

    def _fail_queued(self, job: Job, error_type: str, message: str, field: str | None = None) -> None:
        """Take a job that has not started out of the queue (dropping its input look-ahead) and fail it."""
        self.queue.remove(job.id)
        task = self._prep.pop(job.id, None)
        if task is not None:
            task.cancel()
        self._finish_now(job, error_type, message, field)
        self._queue_changed.set()

    def _timed_out(self, job: Job) -> bool:
        """Fail a queued job whose start deadline (X-Fal-Request-Timeout) has passed."""
        if job.state is JobState.QUEUED and job.start_deadline is not None and self.clock() >= job.start_deadline:
            self._fail_queued(job, "request_timeout", "the request did not start before its start timeout")
            return True
        return False

    async def _sweeper(self, interval: float = 0.1) -> None:
        while True:
            await asyncio.sleep(interval)
            for job_id in list(self.queue.head(len(self.queue))):
                job = self.active.get(job_id)
                if job is not None:
                    self._timed_out(job)

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

    def _update_gauges(self) -> None:
        self.metrics.queue_depth.set(len(self.queue))
        self.metrics.in_progress.set(len(self.running))
