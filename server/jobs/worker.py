"""The GPU lane: a worker that takes batches from the queue in the job store and runs them on its engine.

One :class:`GpuWorker` per GPU, in the API process (the embedded default) or in a process of its own
(``inpaint-server worker``), on this host or another: it only talks to the store, through the narrow
:class:`~.leases.WorkSource`. It reads the head of the queue whenever the store changes and fetches and
decodes those jobs' inputs ahead of time (``prepare`` in a thread pool, nothing claimed yet); when the GPU is
free it picks the oldest ready job and the prepared jobs with the same batch key (up to ``max_batch_size``
requests and the engine's image rows), waits ``batch_window_ms`` while a batch-mate is still being prepared,
and *claims* them in the store: only the jobs still queued are taken, now running and leased to this worker.
It runs the batch (``run`` on the engine's GPU thread, with a step watchdog), renews its leases, writes
progress, reads cancel flags between steps, and writes each terminal state as the lease's holder. A fatal GPU
error or a hung GPU ends the process for a supervisor to restart; its leases are then taken back by the
other nodes, and the batch runs again with the same seeds.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from typing import Any

from pipelines.errors import GpuFatalError
from pipelines.serving import ServingEngine

from ..delivery.file_store import FileStore
from ..disk_space import DiskSpace
from ..inputs.input_fetch import InputFetcher
from ..metrics import Metrics
from ..redact import public_message
from ..settings import Settings
from .engine_host import EngineHost
from .finishing import Finisher
from .gpu_exit import EXIT_GPU_FAULT, GpuHung, exit_for_restart
from .job import Job
from .leases import WorkSource
from .nodes import WorkerStats
from .preparing import JobPreparer, Prepared
from .step_previews import PreviewEncoder
from .store import QueuedRef, StoreUnavailable

log = logging.getLogger("inpaint-server.jobs")

PROGRESS_FLUSH_S = 0.1  # running jobs' new log lines are written at most this often
REFRESH_S = 1.0  # the head of the queue is read at least this often (start deadlines pass without a write)
START_MESSAGE = "Starting inference ({n} request(s) in this batch)"


class GpuWorker:
    """One GPU lane: input look-ahead, batching, claiming, running, leases, GPU faults (see the module).

    ``running`` is the batch on the GPU (request ids); ``held`` every job this worker holds a lease on (the
    batch, and finished jobs whose state is still being written); ``finalizers`` the tasks writing results;
    ``abandoned`` is set by :meth:`drain` when its grace period runs out. ``exit_process(status)`` ends the
    process after a GPU fault (default ``os._exit``; tests record it). While ``disk`` says a disk is full, no new
    batch starts (queued requests wait in the queue).
    """

    def __init__(
        self,
        source: WorkSource,
        host: EngineHost,
        fetcher: InputFetcher,
        files: FileStore,
        settings: Settings,
        metrics: Metrics,
        exit_process: Callable[[int], None] | None = None,
        disk: DiskSpace | None = None,
    ) -> None:
        self.source = source
        self.disk = disk
        self._disk_full_logged = False
        self.host = host
        self.fetcher = fetcher
        self.files = files
        self.settings = settings
        self.metrics = metrics
        self.stats = WorkerStats()
        self.window: list[QueuedRef] = []  # the head of the queue as last read
        self._prep: dict[str, asyncio.Task[Prepared]] = {}
        self.preparer = JobPreparer(source, fetcher, settings.max_image_pixels)
        self._changed = asyncio.Event()  # the store changed, or someone woke the lane
        self._window_changed = asyncio.Event()
        self._flags_due = asyncio.Event()
        self._upkeep_due = asyncio.Event()  # write progress now (a step preview is ready), or read cancel flags
        self.held: dict[str, Job] = {}
        self.running: list[str] = []
        self._lost: set[str] = set()  # held jobs whose lease was taken back: stopped, never finished by us
        self._dirty: set[str] = set()  # held jobs with log lines not written yet
        self.previews = PreviewEncoder(self._preview_ready)  # step previews of jobs that asked for them
        self.finalizers: set[asyncio.Task] = set()
        self.finisher = Finisher(source, files, disk, lost=lambda job_id: job_id in self._lost)
        self._tasks: list[asyncio.Task] = []
        self.max_rows = 8  # image rows per batch: the engine's max_batch_rows, read once it has loaded
        self.draining = False
        self.abandoned = False  # the drain grace period ran out: the running batch stops and is not finalized
        self._last_progress = time.monotonic()  # when the running batch last showed progress (the watchdog)
        self._exit_process = exit_process or exit_for_restart
        self._loop: asyncio.AbstractEventLoop | None = None

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> None:
        """Start the lane's tasks (on the running loop); it takes work once the engine is ready."""
        self._loop = asyncio.get_running_loop()
        self.source.watch(self.wake_threadsafe)
        self._tasks = [
            asyncio.create_task(self.run(), name="gpu-worker"),
            asyncio.create_task(self._upkeep(), name="gpu-worker-upkeep"),
        ]

    async def stop(self) -> None:
        self.source.unwatch(self.wake_threadsafe)
        pending = [*self._tasks, *self._prep.values()]
        for task in pending:
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
        if self.finalizers:
            await asyncio.gather(*self.finalizers, return_exceptions=True)
        self.previews.shutdown()

    def wake(self) -> None:
        """The queue may have changed (a submit, a cancel...): read it again. Event loop only."""
        self._changed.set()
        self._flags_due.set()
        self._upkeep_due.set()

    def wake_threadsafe(self) -> None:
        """:meth:`wake` from any thread (the store's change listener)."""
        if self._loop is not None and not self._loop.is_closed():
            self._loop.call_soon_threadsafe(self.wake)

    def is_prepared(self, job_id: str) -> bool:
        """Whether a queued job's inputs are fetched and decoded (its look-ahead is done)."""
        return job_id in self._prep and self._prep[job_id].done()

    # ------------------------------------------------------------------ the lane

    async def run(self) -> None:
        """The worker loop (the ``gpu-worker`` task); runs until cancelled or the process exits."""
        engine = await self.host.wait_ready()
        if engine is None:
            await self._serve_failed()
        self.max_rows = int(getattr(engine, "max_batch_rows", self.max_rows))
        lookahead = asyncio.create_task(self._lookahead(engine), name="gpu-worker-lookahead")
        self._tasks.append(lookahead)
        while True:
            try:
                await self._run_next(engine)
            except asyncio.CancelledError:
                raise
            except StoreUnavailable as exc:  # the queued jobs wait; the store reconnects by itself
                log.warning("job store unavailable, the GPU lane waits: %s", exc)
                await asyncio.sleep(1.0)
            except Exception:  # never let one bad batch stop the lane
                log.exception("GPU worker iteration failed")
                await asyncio.sleep(0.1)

    async def _serve_failed(self) -> None:
        """The models did not load: this worker runs nothing. While no other worker can run the queue, its
        requests fail at once (``engine_unavailable``) instead of waiting forever."""
        message = f"the models failed to load ({public_message(self.host.error or '')}); see the server log"
        while True:
            try:
                if not self.source.others_can_run():
                    for ref in self.source.head(100):
                        job = self.source.load(ref.id)
                        if job is not None:
                            self.source.fail_queued(job, "engine_unavailable", message)
            except StoreUnavailable as exc:
                log.warning("job store unavailable: %s", exc)
            except Exception:
                log.exception("failing the queue after a failed load")
            self._changed.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._changed.wait(), REFRESH_S)

    async def _run_next(self, engine: ServingEngine) -> None:
        while not self.window or self.draining or self._disk_full():
            await self._next_window()
        head = self._next_head()
        task = self._ensure_prepared(engine, head)
        # Wait for the head's inputs, but look again when the queue changes (cancel, higher priority) or, while
        # the head downloads, when the inputs of a job behind it are ready.
        self._window_changed.clear()
        changed = asyncio.ensure_future(self._window_changed.wait())
        waits = {task, changed}
        if not task.done() and self._downloads(head):
            waits |= {t for t in self._prep.values() if not t.done()}
        try:
            await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
        finally:
            changed.cancel()
        if not task.done() or not self._queued(head.id) or self.draining or self._disk_full():
            return
        prep = task.result()
        if prep.error is not None:
            self._fail_queued(head.id, *prep.error)
            return
        if self._timed_out(head):
            return
        batch = self._collect(head, prep)
        if self._room(batch) and self.settings.batch_window_ms > 0 and self._may_grow(batch):
            batch = await self._fill(engine, head, prep, batch)
            if not self._queued(head.id) or self.draining:
                return
        await self._run_batch(engine, batch)

    def _disk_full(self) -> bool:
        """Whether a disk this worker writes to is full: then it starts no batch whose results could not be saved."""
        problem = self.disk.problem if self.disk is not None else None
        if (problem is not None) != self._disk_full_logged:
            self._disk_full_logged = problem is not None
            if problem is not None:
                log.warning("the GPU lane starts no new batch until space is freed: %s", problem)
            else:
                log.info("disk space is back: the GPU lane takes batches again")
        return problem is not None

    async def _next_window(self) -> None:
        self._window_changed.clear()
        await self._window_changed.wait()

    def _queued(self, job_id: str) -> bool:
        return any(ref.id == job_id for ref in self.window)

    def _collect(self, head: QueuedRef, prep: Prepared) -> list[QueuedRef]:
        """The head and the queued jobs whose inputs are ready with the same batch key, up to the batch size
        and up to the engine's image rows per batch (``num_images`` summed: a shape the warm-up built)."""
        batch, rows = [head], prep.rows
        for ref in self.window[: self.settings.max_batch_size * 4]:
            if len(batch) >= self.settings.max_batch_size or rows >= self.max_rows:
                break
            if ref.id == head.id or not self.is_prepared(ref.id) or self._prep[ref.id].cancelled():
                continue
            p = self._prep[ref.id].result()
            fits = rows + p.rows <= self.max_rows
            if p.error is None and p.key == prep.key and fits and not self._timed_out(ref):
                batch.append(ref)
                rows += p.rows
        return batch

    def _room(self, batch: list[QueuedRef]) -> bool:
        """Whether another job could still join ``batch`` (fewer jobs than max_batch_size, rows to spare)."""
        rows = sum(self._prep[r.id].result().rows for r in batch if self.is_prepared(r.id))
        return len(batch) < self.settings.max_batch_size and rows < self.max_rows

    def _may_grow(self, batch: list[QueuedRef]) -> bool:
        """Whether waiting ``batch_window_ms`` could add to ``batch``: another queued job's inputs are still
        being fetched or decoded (its batch key is not known yet). With nothing else queued, or everything
        else prepared for another batch, the batch runs at once."""
        members = {ref.id for ref in batch}
        for ref in self.window[: self.settings.max_batch_size * 4]:
            task = self._prep.get(ref.id)
            if ref.id not in members and (task is None or not task.done()):
                return True
        return False

    async def _fill(
        self, engine: ServingEngine, head: QueuedRef, prep: Prepared, batch: list[QueuedRef]
    ) -> list[QueuedRef]:
        """Wait up to ``batch_window_ms`` for batch-mates: requests submitted meanwhile, or queued ones whose
        inputs are still being fetched. Returns as soon as the batch is full; re-collects on every change."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.settings.batch_window_ms / 1000
        while self._room(batch) and self._queued(head.id) and not self.draining:
            left = deadline - loop.time()
            if left <= 0:
                break
            self._window_changed.clear()
            changed = asyncio.ensure_future(self._window_changed.wait())
            pending = {t for t in self._prep.values() if not t.done()}
            try:
                await asyncio.wait(pending | {changed}, timeout=left, return_when=asyncio.FIRST_COMPLETED)
            finally:
                changed.cancel()
            batch = self._collect(head, prep)
        return batch

    def _fail_queued(self, job_id: str, error_type: str, message: str, field: str | None = None) -> None:
        """Fail a job that has not started (bad input, start timeout), if it is still queued."""
        task = self._prep.pop(job_id, None)
        job = self.preparer.loaded.pop(job_id, None)
        if task is not None and task.done() and not task.cancelled() and task.result().job is not None:
            job = task.result().job
        self.window = [ref for ref in self.window if ref.id != job_id]  # gone or failed: not tried again
        self._changed.set()
        if job is not None:
            self.source.fail_queued(job, error_type, message, field)

    def _timed_out(self, ref: QueuedRef) -> bool:
        """Fail a queued job whose start deadline (X-Fal-Request-Timeout) has passed."""
        if ref.start_deadline is not None and self.source.clock() >= ref.start_deadline:
            self._fail_queued(ref.id, "request_timeout", "the request did not start before its start timeout")
            return True
        return False

    # ------------------------------------------------------------------ running a batch

    async def _run_batch(self, engine: ServingEngine, refs: list[QueuedRef]) -> None:
        preps = {ref.id: self._prep[ref.id].result() for ref in refs}
        batch = self.source.claim([ref.id for ref in refs], START_MESSAGE)  # durable first; raises if the store is down
        claimed = {job.id for job in batch}
        for ref in refs:
            self._prep.pop(ref.id, None)
            self.preparer.loaded.pop(ref.id, None)
        self.window = [ref for ref in self.window if ref.id not in preps]
        self._changed.set()  # read the queue again: fetch the next inputs while the GPU works
        if len(claimed) < len(refs):
            log.info(
                "%d of %d requests were taken meanwhile (another worker, a cancel)", len(refs) - len(claimed), len(refs)
            )
        if not batch:
            return
        now = self.source.clock()
        for job in batch:
            job.input = preps[job.id].job.input if preps[job.id].job is not None else {}
            self.held[job.id] = job
            self.metrics.latency.labels(job.app_id, "queue").observe(max(now - job.created_at, 0.0))
            log.info("request %s running (attempt %d, batch of %d)", job.id, job.attempts, len(batch))
        self.running = [job.id for job in batch]
        self.metrics.batch_size.observe(len(batch))
        started = time.perf_counter()
        outcome = await self._run_engine(engine, batch, [preps[job.id].prepared for job in batch])
        self.stats.add(len(batch), sum(preps[job.id].rows for job in batch), time.perf_counter() - started)
        if self.abandoned or outcome is None:  # the rows stay running: another start runs them again
            return
        self.running = []
        results, errors = outcome
        by_id = {r.request_id: r for r in results}
        for job in batch:
            task = asyncio.create_task(self._finalize(job, by_id.get(job.id), errors.get(job.id)))
            self.finalizers.add(task)
            task.add_done_callback(self.finalizers.discard)

    async def _run_engine(
        self, engine: ServingEngine, batch: list[Job], prepared: list[Any]
    ) -> tuple[list[Any], dict[str, str]] | None:
        """The engine's results for the batch and the error of each request that has none, or None after a GPU
        fault (the process is going; see :meth:`_gpu_fault`).

        An error that is no GPU fault belongs to one request as often as not (text no tokenizer takes, a bug one
        input reaches): a batch of several that fails runs again one request at a time, so only the request at
        fault fails and its batch-mates get the images they would get alone.
        """
        try:
            return await self._engine_run(engine, batch, prepared), {}
        except (GpuFatalError, GpuHung) as exc:
            await self._gpu_fault(batch, str(exc))
            return None
        except Exception as exc:
            log.exception("engine failure on a batch of %d", len(batch))
            if len(batch) == 1:
                return [], {batch[0].id: f"inference failed: {type(exc).__name__}"}
            reason = type(exc).__name__
        log.warning("running the %d requests of the failed batch again one at a time (%s)", len(batch), reason)
        self._note(batch, f"The batch this request ran in failed ({reason}); running it again on its own")
        results: list[Any] = []
        errors: dict[str, str] = {}
        for job, prep in zip(batch, prepared, strict=True):
            if self.abandoned:
                return None
            alone = await self._run_engine(engine, [job], [prep])
            if alone is None:
                return None
            results += alone[0]
            errors.update(alone[1])
        return results, errors

    def _note(self, batch: list[Job], message: str) -> None:
        """Add a line to the logs of running jobs (written with the next progress flush)."""
        now = self.source.clock()
        for job in batch:
            job.add_log(message, when=now)
            self._dirty.add(job.id)

    async def _engine_run(self, engine: ServingEngine, batch: list[Job], prepared: list[Any]) -> list[Any]:
        """``engine.run`` on the host's single GPU thread (where the warm-up captured the CUDA graphs), watched."""
        loop = asyncio.get_running_loop()
        jobs = {job.id: job for job in batch}

        def should_stop(request_id: str) -> bool:
            job = jobs.get(request_id)
            return job is not None and (job.cancel_requested or request_id in self._lost or self.abandoned)

        def on_progress(request_id: str, step: int, total: int, preview: Any = None) -> None:
            self._last_progress = time.monotonic()  # read by the watchdog (on this thread: no loop lag)
            loop.call_soon_threadsafe(self._progress, request_id, step, total)
            if preview is not None:  # only jobs with previews: to the encoder's thread, without waiting
                self.previews.submit(loop, request_id, step, total, preview)

        self._last_progress = time.monotonic()
        work = loop.run_in_executor(self.host.gpu, engine.run, prepared, should_stop, on_progress)
        return list(await self._watched(work))

    def _progress(self, request_id: str, step: int, total: int) -> None:
        job = self.held.get(request_id)
        if job is not None and request_id in self.running:
            job.add_log(f"Step {step}/{total}", when=self.source.clock())
            self._dirty.add(request_id)

    def _preview_ready(self, request_id: str) -> None:
        if request_id in self.held and request_id in self.running and request_id not in self._lost:
            self._dirty.add(request_id)
            self._upkeep_due.set()  # written now, not at the next tick: one preview per step where possible
        else:
            self.previews.forget(request_id)  # the run is over: its result is on its way

    async def _finalize(self, job: Job, result: Any, error: str | None) -> None:
        """Write a job's terminal state as the holder of its lease (:class:`~.finishing.Finisher`), then let it go."""
        try:
            await self.finisher.finish(job, result, error)
        finally:
            self.held.pop(job.id, None)
            self._dirty.discard(job.id)
            self._lost.discard(job.id)
            self.previews.forget(job.id)

    # ------------------------------------------------------------------ leases, cancel flags, progress

    async def _upkeep(self) -> None:
        """While jobs are held: renew their leases every ``lease_s / 3``, read cancel flags when the store changes,
        and write new log lines every :data:`PROGRESS_FLUSH_S` (a step preview at once)."""
        lease_s = self.source.lease_s
        next_renew = 0.0
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._upkeep_due.wait(), PROGRESS_FLUSH_S)
            self._upkeep_due.clear()
            flags_due = self._flags_due.is_set()
            self._flags_due.clear()
            if not self.held:
                continue
            try:
                if time.monotonic() >= next_renew:
                    self._renew()
                    next_renew = time.monotonic() + lease_s / 3
                if flags_due:
                    self._read_cancel_flags()
                self._flush_progress()
            except StoreUnavailable as exc:
                log.warning("job store unavailable (leases and progress wait): %s", exc)
                next_renew = 0.0
                await asyncio.sleep(0.5)
            except Exception:
                log.exception("worker upkeep failed")

    def _renew(self) -> None:
        held = set(self.held) - self._lost
        lost = held - self.source.renew(held)
        for job_id in lost:
            log.warning("request %s: the lease was taken back; it stops here and runs elsewhere", job_id)
        self._lost |= lost

    def _read_cancel_flags(self) -> None:
        running = [job_id for job_id in self.running if not self.held[job_id].cancel_requested]
        for job_id in self.source.cancel_flags(running):
            self.stop_running(job_id)

    def stop_running(self, job_id: str) -> None:
        """Stop a running job of ours at its next step (its cancel flag is, or is being, set in the store).
        The API in this process calls it directly, so an embedded cancel does not wait for the change feed."""
        job = self.held.get(job_id)
        if job is None or job_id not in self.running or job.cancel_requested:
            return
        job.cancel_requested = True
        job.add_log("Cancellation requested; stopping at the next step", "WARN", self.source.clock())
        self._dirty.add(job_id)
        log.info("request %s cancellation requested while running", job_id)

    def _flush_progress(self) -> None:
        if self._dirty:
            dirty = [self.held[i] for i in self._dirty if i in self.held and i not in self._lost]
            previews = self.previews.pending(job.id for job in dirty)
            if previews:
                self.source.progress(dirty, previews)
                self.previews.written(previews)
            else:
                self.source.progress(dirty)
            self._dirty.clear()

    # ------------------------------------------------------------------ draining and GPU faults

    async def drain(self, grace_s: float) -> bool:
        """Take no more batches and give the running one up to ``grace_s`` seconds to finish (results written).

        Returns whether it finished in time; if not, it is asked to stop at its next step and its rows stay
        ``running``: another start (or another worker, once the lease is taken back) runs it again, within
        ``max_attempts``."""
        if not self.draining:
            self.draining = True
            self.wake()
        deadline = time.monotonic() + grace_s
        while (self.running or self.finalizers) and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        if self.running:
            self._abandon(grace_s)
        if self.finalizers:  # the batch finished in time; its results are being written
            await asyncio.gather(*self.finalizers, return_exceptions=True)
        return not self.abandoned

    def _abandon(self, grace_s: float) -> None:
        self.abandoned = True
        now = self.source.clock()
        for job_id in self.running:
            job = self.held[job_id]
            job.add_log(
                f"The server shut down before this request finished ({grace_s:g} s grace period); "
                + _after_restart(job),
                "WARN",
                now,
            )
            self._dirty.add(job_id)
        try:
            self._flush_progress()
        except StoreUnavailable as exc:
            log.warning("job store unavailable: %s", exc)
        log.warning("drain grace over (%g s); %d running requests run again", grace_s, len(self.running))

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

        Readiness turns 503 with the reason; the batch's rows stay ``running`` with their attempt counted, so
        once this process has exited they are taken back and run once more (or fail ``interrupted`` after
        ``max_attempts``: a job that crashes the process every time is not replayed forever); results of
        earlier batches still being written are let finish; then the process exits with EXIT_GPU_FAULT for
        the supervisor to restart it.
        """
        self.host.fault(reason)
        log.critical("GPU fault, this worker stops: %s (requests %s)", reason, ", ".join(j.id for j in batch))
        now = self.source.clock()
        for job in batch:
            job.add_log(f"GPU fault during this request; {_after_restart(job)}", "ERROR", now)
            self._dirty.add(job.id)
        try:
            self._flush_progress()
        except StoreUnavailable as exc:
            log.warning("job store unavailable: %s", exc)
        if self.finalizers:
            await asyncio.wait(set(self.finalizers), timeout=30)
        await asyncio.sleep(self.settings.gpu_fault_exit_delay_s)  # readiness probes see the 503 meanwhile
        log.critical("exiting with status %d so that a supervisor restarts it", EXIT_GPU_FAULT)
        self._exit_process(EXIT_GPU_FAULT)
        await asyncio.Event().wait()  # (exit replaced in tests) the lane stays stopped, as in a dead process

    # ------------------------------------------------------------------ input look-ahead

    async def _lookahead(self, engine: ServingEngine) -> None:
        """Read the head of the queue whenever the store changes (and every :data:`REFRESH_S`), forget the
        inputs of jobs that left it, and start fetching and decoding the first ones."""
        self._changed.set()
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._changed.wait(), REFRESH_S)
            self._changed.clear()
            if not self.draining:
                try:
                    self._set_window(engine, self.source.head(self.settings.max_batch_size * 8))
                except StoreUnavailable as exc:
                    log.warning("job store unavailable, the look-ahead waits: %s", exc)
                    await asyncio.sleep(1.0)
                except Exception:
                    log.exception("reading the queue failed")
                    await asyncio.sleep(0.1)
            self._window_changed.set()
            await asyncio.sleep(0.002)  # a burst of changes is read once

    def _set_window(self, engine: ServingEngine, refs: list[QueuedRef]) -> None:
        self.window = refs
        ids = {ref.id for ref in refs}
        for job_id in [i for i in self._prep if i not in ids]:  # left the queue: claimed, cancelled, failed
            self._prep.pop(job_id).cancel()
            self.preparer.loaded.pop(job_id, None)
        for ref in refs[: self.settings.max_batch_size * 2]:
            self._ensure_prepared(engine, ref)

    def _ensure_prepared(self, engine: ServingEngine, ref: QueuedRef) -> asyncio.Task[Prepared]:
        if ref.id not in self._prep:
            self._prep[ref.id] = asyncio.create_task(self.preparer.prepare(engine, ref.id), name=f"prepare-{ref.id}")
        return self._prep[ref.id]

    def _downloads(self, ref: QueuedRef) -> bool:
        return self.preparer.downloads(ref.id)

    def _next_head(self) -> QueuedRef:
        """The job to run next: the queue's head or, while the head still downloads a remote input, the oldest
        job behind it whose inputs are ready, so a slow image host cannot hold the GPU lane (case S7)."""
        window = self.window[: self.settings.max_batch_size * 2]
        head = window[0]
        if not self._downloads(head) or self.is_prepared(head.id):
            return head
        return next((ref for ref in window[1:] if self.is_prepared(ref.id)), head)


def _after_restart(job: Job) -> str:
    """What becomes of a job this worker leaves running (a drain's grace over, a GPU fault)."""
    if job.no_retry:
        return "it fails after the restart instead of running again (it was sent with x-fal-no-retry)"
    return "it runs again after the restart (within max_attempts)"
