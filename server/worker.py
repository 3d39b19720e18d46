"""The GPU lane: one worker that picks batches from the queue and runs them on the engine.

One :class:`GpuWorker` per :class:`~server.service.JobService`, which owns it and keeps the jobs' life
(submit, cancel, terminal states, draining). The worker fetches and decodes the inputs of the first
queued jobs ahead of time (``prepare`` in a thread pool), takes the oldest ready job and every queued
job with the same batch key (up to ``max_batch_size``), runs the batch (``run`` on a thread, with a
step watchdog), marshals the engine's progress back onto the event loop, and hands each result to
the service's finalizer. A fatal GPU error or a hung GPU ends the process for a supervisor to restart.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from pipelines import Embedding, InpaintRequest
from pipelines.errors import EngineError, GpuFatalError, InputError
from pipelines.serving import ServingEngine

from .gpu_exit import EXIT_GPU_FAULT, GpuHung, exit_for_restart
from .inputs import InputFetchError, image_size_of_json, slim_input
from .jobs import Job, JobState
from .store import StoreUnavailable

if TYPE_CHECKING:
    from .service import JobService

log = logging.getLogger("inpaint-server.jobs")


@dataclass
class _Prepared:
    prepared: Any = None  # the engine's PreparedRequest
    key: Any = None
    rows: int = 1  # image rows the job adds to a batch (its num_images)
    error: tuple[str, str, str | None] | None = None  # (error_type, message, field)


class GpuWorker:
    """The single GPU lane of a :class:`JobService`: input look-ahead, batching, running, GPU faults.

    ``running`` is the batch on the GPU (request ids); ``finalizers`` are the tasks writing the results of
    finished batches; ``abandoned`` is set by :meth:`abandon` when the drain grace period runs out.
    ``exit_process(status)`` ends the process after a GPU fault (default ``os._exit``; tests record it).
    """

    def __init__(self, jobs: JobService, exit_process: Callable[[int], None] | None = None) -> None:
        self.jobs = jobs
        self.settings = jobs.settings
        self.store = jobs.store
        self.host = jobs.host
        self.metrics = jobs.metrics
        self.clock = jobs.clock
        self.fetcher = jobs.fetcher
        self.queue = jobs.queue
        self.active = jobs.active
        self._prep: dict[str, asyncio.Task[_Prepared]] = {}
        self._queue_changed = asyncio.Event()
        self.finalizers: set[asyncio.Task] = set()
        self.running: list[str] = []
        self.max_rows = 8  # image rows per batch: the engine's max_batch_rows, read once it has loaded
        self.abandoned = False  # the drain grace period ran out: the running batch stops and is not finalized
        # GPU faults: when the running batch last showed progress (time.monotonic, for the watchdog), and
        # how the process ends after a fault (replaced in tests that run the server in-process).
        self._last_progress = time.monotonic()
        self._exit_process = exit_process or exit_for_restart

    # ------------------------------------------------------------------ what the service tells the lane

    def wake(self) -> None:
        """The queue changed (a submit, a cancel, a drain...): the lane re-evaluates what to run next."""
        self._queue_changed.set()

    def abandon(self) -> None:
        """The drain grace period ran out: the running batch stops at its next step and is not finalized."""
        self.abandoned = True

    def is_prepared(self, job_id: str) -> bool:
        """Whether a queued job's inputs are fetched and decoded (its look-ahead is done)."""
        return job_id in self._prep and self._prep[job_id].done()

    def drop_prepared(self, job_id: str) -> None:
        """Forget a job's input look-ahead (cancelling it if still under way); the job leaves the queue."""
        task = self._prep.pop(job_id, None)
        if task is not None:
            task.cancel()

    def lookahead_tasks(self) -> list[asyncio.Task]:
        """The input look-ahead tasks, finished or not (to cancel them at shutdown)."""
        return list(self._prep.values())

    def ensure_prepared(self, engine: ServingEngine) -> None:
        """Start fetching and decoding inputs for the first few queued jobs."""
        for job_id in self.queue.head(self.settings.max_batch_size * 2):
            if job_id not in self._prep:
                self._prep[job_id] = asyncio.create_task(self._prepare(engine, self.active[job_id]))

    # ------------------------------------------------------------------ the lane

    async def run(self) -> None:
        """The worker loop (the ``gpu-worker`` task); runs until cancelled or the process exits."""
        engine = await self.host.wait_ready()
        if engine is None:  # the models did not load: say so to every waiting request, now and later
            while True:
                for job_id in self.queue.head(len(self.queue)):
                    self.jobs.fail_queued(self.active[job_id], "engine_unavailable", self.jobs.unavailable_message())
                self._queue_changed.clear()
                await self._queue_changed.wait()
        self.max_rows = int(getattr(engine, "max_batch_rows", self.max_rows))
        while True:
            try:
                await self._run_next(engine)
            except asyncio.CancelledError:
                raise
            except StoreUnavailable as exc:  # the queued jobs wait; the store's pool reconnects by itself
                log.warning("job store unavailable, the GPU lane waits: %s", exc)
                await asyncio.sleep(1.0)
            except Exception:  # never let one bad batch stop the lane
                log.exception("GPU worker iteration failed")
                await asyncio.sleep(0.1)

    def _record_start(self, batch: list[Job], now: float) -> None:
        """Mark the batch running in the store, all or nothing; on a store error the jobs stay queued as they were."""
        saved = [(job.started_at, job.attempts, len(job.logs)) for job in batch]
        for job in batch:
            job.state, job.started_at = JobState.RUNNING, now
            job.attempts += 1
            job.add_log(f"Starting inference ({len(batch)} request(s) in this batch)", when=now)
        try:
            self.store.save_many(batch)
        except BaseException:
            for job, (started_at, attempts, logs) in zip(batch, saved, strict=True):
                job.state, job.started_at, job.attempts = JobState.QUEUED, started_at, attempts
                del job.logs[logs:]
            raise

    def _collect(self, head: Job, prep: _Prepared) -> list[Job]:
        """The head and the queued jobs whose inputs are ready with the same batch key, up to the batch size
        and up to the engine's image rows per batch (``num_images`` summed: a shape the warm-up built)."""
        batch, rows = [head], prep.rows
        for job_id in self.queue.head(self.settings.max_batch_size * 4):
            if len(batch) >= self.settings.max_batch_size or rows >= self.max_rows:
                break
            if job_id == head.id:
                continue
            other = self._prep.get(job_id)
            if other is None or not other.done() or other.cancelled():
                continue
            p = other.result()
            fits = rows + p.rows <= self.max_rows
            if p.error is None and p.key == prep.key and fits and not self.jobs.timed_out(self.active[job_id]):
                batch.append(self.active[job_id])
                rows += p.rows
        return batch

    def _room(self, batch: list[Job]) -> bool:
        """Whether another job could still join ``batch`` (fewer jobs than max_batch_size, rows to spare)."""
        rows = sum(self._prep[j.id].result().rows for j in batch if j.id in self._prep and self._prep[j.id].done())
        return len(batch) < self.settings.max_batch_size and rows < self.max_rows

    def _may_grow(self, batch: list[Job]) -> bool:
        """Whether waiting ``batch_window_ms`` could add to ``batch``: another queued job's inputs are still
        being fetched or decoded (its batch key is not known yet). With nothing else queued, or everything
        else prepared for another batch, the batch runs at once."""
        members = {job.id for job in batch}
        for job_id in self.queue.head(self.settings.max_batch_size * 4):
            task = self._prep.get(job_id)
            if job_id not in members and (task is None or not task.done()):
                return True
        return False

    async def _fill(self, engine: ServingEngine, head: Job, prep: _Prepared, batch: list[Job]) -> list[Job]:
        """Wait up to ``batch_window_ms`` for batch-mates: requests submitted meanwhile, or queued ones whose
        inputs are still being fetched. Returns as soon as the batch is full; re-collects on every change."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.settings.batch_window_ms / 1000
        while self._room(batch) and head.id in self.queue and not self.jobs.draining:
            left = deadline - loop.time()
            if left <= 0:
                break
            self.ensure_prepared(engine)
            self._queue_changed.clear()
            changed = asyncio.ensure_future(self._queue_changed.wait())
            pending = {t for t in self._prep.values() if not t.done()}
            try:
                await asyncio.wait(pending | {changed}, timeout=left, return_when=asyncio.FIRST_COMPLETED)
            finally:
                changed.cancel()
            batch = self._collect(head, prep)
        return batch

    async def _run_next(self, engine: ServingEngine) -> None:
        while not len(self.queue) or self.jobs.draining:
            self._queue_changed.clear()
            await self._queue_changed.wait()
        self.ensure_prepared(engine)
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
        try:
            await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
        finally:
            changed.cancel()
        if not task.done() or head_id not in self.queue or self.jobs.draining:
            return
        prep = task.result()
        if prep.error is not None:
            self.jobs.fail_queued(head, *prep.error)
            return
        if self.jobs.timed_out(head):
            return
        batch = self._collect(head, prep)
        if self._room(batch) and self.settings.batch_window_ms > 0 and self._may_grow(batch):
            batch = await self._fill(engine, head, prep, batch)
            if head_id not in self.queue or self.jobs.draining:
                return
        now = self.clock()
        self._record_start(batch, now)  # durable first: if the store is down, nothing changes and the lane waits
        prepared = []
        for job in batch:
            self.queue.remove(job.id)
            prepared.append(self._prep.pop(job.id).result().prepared)
            job.notify()
            self.metrics.latency.labels(job.app_id, "queue").observe(max(now - job.created_at, 0.0))
            log.info("request %s running (attempt %d, batch of %d)", job.id, job.attempts, len(batch))
        self.running = [j.id for j in batch]
        self.metrics.batch_size.observe(len(batch))
        self.jobs.update_gauges()
        self.ensure_prepared(engine)  # fetch the next inputs while the GPU works

        loop = asyncio.get_running_loop()
        jobs = {j.id: j for j in batch}

        def should_stop(request_id: str) -> bool:
            job = jobs.get(request_id)
            return job is not None and (job.cancel_requested or self.abandoned)

        def on_progress(request_id: str, step: int, total: int) -> None:
            self._last_progress = time.monotonic()  # read by the watchdog (on this thread: no loop lag)
            loop.call_soon_threadsafe(self._progress, request_id, step, total)

        self._last_progress = time.monotonic()
        try:
            # On the host's single GPU thread, where the warm-up captured the CUDA graphs.
            work = loop.run_in_executor(self.host.gpu, engine.run, prepared, should_stop, on_progress)
            results = await self._watched(work)
        except (GpuFatalError, GpuHung) as exc:
            await self._gpu_fault(batch, str(exc))
            return
        except Exception as exc:
            log.exception("engine failure on a batch of %d", len(batch))
            results = None
            error = f"inference failed: {type(exc).__name__}"
        if self.abandoned:  # shutting down: the rows stay running, so the next start runs them again
            return
        self.running = []
        if results is None:
            for job in batch:
                self.jobs.finish_now(job, "engine_error", error)
        else:
            by_id = {r.request_id: r for r in results}
            for job in batch:
                task = asyncio.create_task(self.jobs.finalize(job, by_id.get(job.id)))
                self.finalizers.add(task)
                task.add_done_callback(self.finalizers.discard)
        self.jobs.update_gauges()

    def _progress(self, request_id: str, step: int, total: int) -> None:
        job = self.active.get(request_id)
        if job is not None and job.state is JobState.RUNNING:
            job.add_log(f"Step {step}/{total}", when=self.clock())
            job.notify()

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
        if self.finalizers:
            await asyncio.wait(set(self.finalizers), timeout=30)
        await asyncio.sleep(self.settings.gpu_fault_exit_delay_s)  # readiness probes see the 503 meanwhile
        log.critical("exiting with status %d so that a supervisor restarts the server", EXIT_GPU_FAULT)
        self._exit_process(EXIT_GPU_FAULT)
        await asyncio.Event().wait()  # (exit replaced in tests) the lane stays stopped, as in a dead process

    # ------------------------------------------------------------------ input look-ahead

    def _next_head(self) -> str:
        """The job to run next: the queue's head or, while the head still downloads a remote input, the oldest
        job behind it whose inputs are ready, so a slow image host cannot hold the GPU lane (case S7)."""
        window = self.queue.head(self.settings.max_batch_size * 2)
        head_id = window[0]
        if head_id not in self._prep or self._prep[head_id].done() or not self._downloads(self.active[head_id]):
            return head_id
        return next((j for j in window[1:] if self.is_prepared(j)), head_id)

    def _downloads(self, job: Job) -> bool:
        """Whether preparing ``job`` fetches a URL over the network (not only data URIs and this server's files)."""
        data = job.input
        embeddings = [e.get("path") for e in data.get("embeddings") or [] if isinstance(e, dict)]
        return any(self.fetcher.is_remote(s) for s in (data.get("image_url"), data.get("mask_url"), *embeddings))

    async def _prepare(self, engine: ServingEngine, job: Job) -> _Prepared:
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
            return _Prepared(prepared=prepared, key=engine.batch_key(prepared), rows=request.num_images)
        except InputFetchError as exc:
            return _Prepared(error=(exc.error_type, exc.message, exc.field))
        except InputError as exc:
            return _Prepared(error=("invalid_input", exc.message, exc.field))
        except EngineError as exc:
            return _Prepared(error=(exc.error_type, str(exc), None))
        except Exception as exc:
            log.exception("preparing request %s failed", job.id)
            return _Prepared(error=("internal_error", f"could not prepare the request ({type(exc).__name__})", None))
