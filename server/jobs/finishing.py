"""Writing the outcome of a job a GPU worker ran, as the holder of its lease: its images and succeeded state, or
its error. While the store cannot be written (an outage, a full disk under it) the outcome is kept and tried
again, and a failed try leaves the job as it was, so only one outcome is ever recorded; while the files' disk is
full, the images are removed and the job fails with ``insufficient_storage``.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any

from pipelines.errors import RequestCancelled

from ..delivery.file_store import FileStore
from ..delivery.result_encoding import encode_output
from ..disk_space import FILES, DiskSpace, is_disk_full
from .job import Job
from .leases import WorkSource
from .store import StoreUnavailable

log = logging.getLogger("inpaint-server.jobs")

DISK_FULL_MESSAGE = (
    "the server's disk is full: the images of this request could not be saved; submit it again once space is freed"
)


class Finisher:
    """Writes terminal states for one worker; ``lost(job_id)`` says the worker's lease on a job was taken back
    (another node runs it now: nothing is written)."""

    def __init__(
        self, source: WorkSource, files: FileStore, disk: DiskSpace | None, lost: Callable[[str], bool]
    ) -> None:
        self.source = source
        self.files = files
        self.disk = disk
        self.lost = lost

    async def finish(self, job: Job, result: Any, error: str | None) -> None:
        """Write a job's terminal state as the holder of its lease: its images, or its error."""
        try:
            for warning in getattr(result, "warnings", None) or ():
                job.add_log(warning, "WARN", self.source.clock())
            if self.lost(job.id):
                return
            if error is not None:
                await self.write(job, lambda: self.source.fail(job, "engine_error", error))
            elif result is None:
                await self.write(job, lambda: self.source.fail(job, "engine_error", "the engine returned no result"))
            elif job.cancel_requested or isinstance(result.error, RequestCancelled):
                message = "the request was cancelled while running"
                await self.write(job, lambda: self.source.fail(job, "cancelled", message))
            elif result.error is not None:
                field = getattr(result.error, "field", None)
                message = getattr(result.error, "message", None) or str(result.error)
                await self.write(job, lambda: self.source.fail(job, result.error.error_type, message, field))
            else:
                await self.save_output(job, result)
        except Exception:
            log.exception("finalizing request %s failed", job.id)
            if not job.state.is_terminal():
                await self.write(job, lambda: self.source.fail(job, "internal_error", "the result could not be saved"))

    async def save_output(self, job: Job, result: Any) -> None:
        """Write a successful job's images, then its state. When the disk is full, the images are removed and the
        job fails with ``insufficient_storage`` as soon as that can be saved; while the store cannot be written
        either (a full disk under both), both are tried again, so once space is back it succeeds after all."""

        async def outcome() -> Callable[[], bool]:
            try:
                output = await asyncio.to_thread(encode_output, job, result, self.files)
            except OSError as exc:
                if not is_disk_full(exc):
                    raise
                await asyncio.to_thread(self.files.delete_results, job.id)  # nothing half-written stays
                if self.disk is not None:
                    self.disk.failed(FILES)
                log.error("request %s: its images could not be written: %s", job.id, exc)
                return lambda: self.source.fail(job, "insufficient_storage", DISK_FULL_MESSAGE)
            return lambda: self.source.succeed(job, output, result.timings)

        await self.save(job, outcome)

    async def write(self, job: Job, write: Callable[[], bool]) -> None:
        """Write a terminal state (see :meth:`save`)."""

        async def same() -> Callable[[], bool]:
            return write

        await self.save(job, same)

    async def save(self, job: Job, outcome: Callable[[], Any]) -> None:
        """Write the terminal state ``await outcome()`` gives; while the store is down (or its disk full), keep it
        here and try again, asking ``outcome`` again each time (the job stays held, so its lease is renewed once the
        store is back). A failed try leaves the job as it was, so only one outcome is ever recorded in it. Until
        written, the store still says running: a crash meanwhile runs the job again (same seed) rather than losing
        it."""
        delay, retried = 0.5, False
        while True:
            write = await outcome()
            before = {**vars(job), "logs": list(job.logs), "files": list(job.files)}
            try:
                write()
                if retried:
                    log.info("request %s: its %s state is saved now that the store is back", job.id, job.state.value)
                return
            except StoreUnavailable as exc:
                state = job.state.value
                vars(job).update(before)
                if not retried:
                    log.warning(
                        "request %s %s, but the job store is unavailable; saving it later: %s",
                        job.id,
                        state,
                        exc,
                    )
            if self.lost(job.id):
                return
            await asyncio.sleep(delay)
            delay, retried = min(delay * 2, 2.0), True
