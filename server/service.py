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
import base64
import logging
import secrets
import time
import uuid
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from pipelines import Embedding, InpaintRequest
from pipelines.encode import CONTENT_TYPES, encode_image
from pipelines.errors import EngineError, InputError, RequestCancelled

from .engine_host import EngineHost
from .errors import AlreadyCompleted, EngineUnavailable, NotFound, job_error
from .files import FileStore
from .inputs import InputFetcher, InputFetchError, image_size_of_json, slim_input
from .job_queue import JobQueue
from .jobs import Job, JobState
from .metrics import Metrics
from .settings import Settings
from .store import JobStore, WebhookRow
from .webhooks import WebhookSender, webhook_body

log = logging.getLogger("inpaint-server.jobs")

TERMINAL_CACHE = 5000  # finished jobs kept in memory for fast status polls
INLINE_BUDGET = 256 * 1024 * 1024  # bytes of sync_mode results (data URIs) held in memory at most


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
    ) -> None:
        self.settings = settings
        self.store = store
        self.files = files
        self.host = host
        self.metrics = metrics
        self.webhooks = webhooks
        self.clock = clock
        self.fetcher = InputFetcher(files, settings.input_max_bytes, settings.input_timeout_s)
        self.queue = JobQueue()
        self.active: dict[str, Job] = {}  # queued and running
        self.finished: OrderedDict[str, Job] = OrderedDict()
        # sync_mode results (data URIs): in memory only, never on disk, oldest dropped past INLINE_BUDGET.
        self.inline_results: OrderedDict[str, tuple[int, dict[str, Any]]] = OrderedDict()
        self._inline_bytes = 0
        self._prep: dict[str, asyncio.Task[_Prepared]] = {}
        self._queue_changed = asyncio.Event()
        self._tasks: list[asyncio.Task] = []
        self._finalizers: set[asyncio.Task] = set()
        self._seq = store.next_seq()
        self.running: list[str] = []

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
    ) -> Job:
        """Create a job; it is durable when this returns."""
        if self.host.state == "failed":
            raise EngineUnavailable(self._unavailable())
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
        self.store.add(job)
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
        return f"the models failed to load ({self.host.error}); see the server log and /health/ready"

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

    def files_live(self, job_id: str) -> bool:
        """Whether a request's generated files may still be served (it exists and has not expired)."""
        job = self.active.get(job_id) or self.finished.get(job_id) or self.store.get(job_id)
        return job is not None and (job.expires_at is None or job.expires_at > self.clock())

    def position(self, job: Job) -> int | None:
        return self.queue.position(job.id)

    def result_of(self, job: Job) -> dict[str, Any] | None:
        if job.result is not None:
            return job.result
        held = self.inline_results.get(job.id)
        return None if held is None else held[1]

    def release_inline(self, job_id: str) -> None:
        """Forget a sync_mode result (a sync run has returned it to its caller, or it expired)."""
        held = self.inline_results.pop(job_id, None)
        if held is not None:
            self._inline_bytes -= held[0]

    def _hold_inline(self, job: Job, output: dict[str, Any]) -> None:
        size = sum(len(image["url"]) for image in output["images"])
        self.inline_results[job.id] = (size, output)
        self._inline_bytes += size
        while self._inline_bytes > INLINE_BUDGET and len(self.inline_results) > 1:
            old_id, (old_size, _) = self.inline_results.popitem(last=False)
            self._inline_bytes -= old_size
            log.info("request %s: inline (sync_mode) result dropped from memory to stay under budget", old_id)

    def cancel(self, job: Job) -> None:
        """Cancel a queued job (it never runs) or ask a running one to stop at its next step."""
        if job.state.is_terminal():
            raise AlreadyCompleted("already completed", request_id=job.id)
        if job.state is JobState.QUEUED:
            self.queue.remove(job.id)
            task = self._prep.pop(job.id, None)
            if task is not None:
                task.cancel()
            self._finish_now(job, "cancelled", "the request was cancelled before it started")
            self._queue_changed.set()
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
                    self.queue.remove(job_id)
                    self._finish_now(self.active[job_id], "engine_unavailable", self._unavailable())
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
        while not len(self.queue):
            self._queue_changed.clear()
            await self._queue_changed.wait()
        self._ensure_prepared(engine)
        head_id = self.queue.head(1)[0]
        head = self.active[head_id]
        task = self._prep[head_id]
        # Wait for the head's inputs, but re-evaluate if the queue changes (cancel, higher priority).
        self._queue_changed.clear()
        changed = asyncio.ensure_future(self._queue_changed.wait())
        await asyncio.wait({task, changed}, return_when=asyncio.FIRST_COMPLETED)
        changed.cancel()
        if not task.done() or head_id not in self.queue:
            return
        prep = task.result()
        if prep.error is not None:
            self.queue.remove(head_id)
            self._prep.pop(head_id, None)
            error_type, message, field = prep.error
            self._finish_now(head, error_type, message, field)
            return
        if self._timed_out(head):
            return
        batch = [head]
        for job_id in self.queue.head(self.settings.max_batch_size * 4)[1:]:
            if len(batch) >= self.settings.max_batch_size:
                break
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
            return job is not None and job.cancel_requested

        def on_progress(request_id: str, step: int, total: int) -> None:
            loop.call_soon_threadsafe(self._progress, request_id, step, total)

        try:
            results = await asyncio.to_thread(engine.run, prepared, should_stop, on_progress)
        except Exception as exc:
            log.exception("engine failure on a batch of %d", len(batch))
            results = None
            error = f"inference failed: {type(exc).__name__}"
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

    def _progress(self, request_id: str, step: int, total: int) -> None:
        job = self.active.get(request_id)
        if job is not None and job.state is JobState.RUNNING:
            job.add_log(f"Step {step}/{total}", when=self.clock())
            job.notify()

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
            )
            fetched = time.perf_counter()
            prepared = await asyncio.to_thread(engine.prepare, request)
            prepared.timings["fetch"] = fetched - started
            slim_input(job)
            return _Prepared(prepared=prepared, key=engine.batch_key(prepared))
        except InputFetchError as exc:
            return _Prepared(error=("input_fetch_error", exc.message, exc.field))
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
            if result is None:
                self._finish_now(job, "engine_error", "the engine returned no result for this request")
            elif job.cancel_requested or isinstance(result.error, RequestCancelled):
                self._finish_now(job, "cancelled", "the request was cancelled while running")
            elif result.error is not None:
                field = getattr(result.error, "field", None)
                message = getattr(result.error, "message", None) or str(result.error)
                self._finish_now(job, result.error.error_type, message, field)
            else:
                output = await asyncio.to_thread(self._encode, job, result)
                self._succeed(job, output, result.timings)
        except Exception:
            log.exception("finalizing request %s failed", job.id)
            if not job.state.is_terminal():
                self._finish_now(job, "internal_error", "the result could not be saved")

    def _encode(self, job: Job, result: Any) -> dict[str, Any]:
        fmt = job.input.get("format", "jpeg")
        images = []
        for k, image in enumerate(result.images):
            data = encode_image(image, fmt)
            name = f"{k}.{fmt}"
            if job.sync_mode:
                url = f"data:{CONTENT_TYPES[fmt]};base64,{base64.b64encode(data).decode()}"
            else:
                self.files.write_result(job.id, name, data)
                job.files.append(name)
                url = f"{job.base_url}/files/{job.id}/{name}"
            images.append(
                {
                    "url": url,
                    "content_type": CONTENT_TYPES[fmt],
                    "file_name": name,
                    "file_size": len(data),
                    "width": image.width,
                    "height": image.height,
                }
            )
        return {
            "images": images,
            "timings": result.timings,
            "seed": result.seed,
            "has_nsfw_concepts": result.has_nsfw_concepts,
            "prompt": result.prompt,
        }

    def _succeed(self, job: Job, output: dict[str, Any], timings: dict[str, float]) -> None:
        now = self.clock()
        job.inference_time = timings.get("inference")
        if job.sync_mode:
            self._hold_inline(job, output)
        else:
            job.result = output
        for stage, seconds in timings.items():
            self.metrics.latency.labels(job.app_id, stage).observe(seconds)
        job.add_log(f"Done in {now - (job.started_at or now):.2f} s", when=now)
        self._terminal(job, JobState.SUCCEEDED, 200, output, now)

    def _finish_now(self, job: Job, error_type: str, message: str, field: str | None = None) -> None:
        """Make ``job`` terminal with an error (cancelled, timed out, failed)."""
        now = self.clock()
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

    # ------------------------------------------------------------------ clocks and housekeeping

    def _timed_out(self, job: Job) -> bool:
        """Fail a queued job whose start deadline (X-Fal-Request-Timeout) has passed."""
        if job.state is JobState.QUEUED and job.start_deadline is not None and self.clock() >= job.start_deadline:
            self.queue.remove(job.id)
            task = self._prep.pop(job.id, None)
            if task is not None:
                task.cancel()
            self._finish_now(job, "request_timeout", "the request did not start before its start timeout")
            self._queue_changed.set()
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
