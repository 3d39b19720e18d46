"""Waiting for a job to change, whichever node changes it: sync runs and status streams wait here.

A waiter gives the version of the job it has seen; the watcher compares the versions of every watched job
in one query whenever the store reports a committed change (:meth:`~.store.JobStore.subscribe`: at once
for this process's writes, within milliseconds for other processes', by ``PRAGMA data_version`` on SQLite
or ``LISTEN/NOTIFY`` on PostgreSQL), and at least every :data:`POLL_S` in case a notification was lost.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

from .job import Job
from .store import JobStore, StoreUnavailable

log = logging.getLogger("inpaint-server.jobs")

POLL_S = 1.0


class JobWatcher:
    def __init__(self, store: JobStore) -> None:
        self.store = store
        self._waiters: dict[str, list[tuple[int, asyncio.Future[Job | None]]]] = {}
        self._check = asyncio.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._task: asyncio.Task | None = None

    def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self.store.subscribe(self._on_change)
        self._task = asyncio.create_task(self._run(), name="job-watcher")

    async def stop(self) -> None:
        self.store.unsubscribe(self._on_change)
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    def poke(self) -> None:
        """Look now (event loop only): this process just changed a job."""
        self._check.set()

    async def changed(self, job: Job, timeout: float | None) -> Job | None:
        """The job as it is once its version moves past ``job.version`` (None if it was deleted), or None after
        ``timeout`` seconds without a change."""
        future: asyncio.Future[Job | None] = asyncio.get_running_loop().create_future()
        entry = (job.version, future)
        self._waiters.setdefault(job.id, []).append(entry)
        self._check.set()
        try:
            return await asyncio.wait_for(future, timeout)
        except TimeoutError:
            return None
        finally:
            waiters = self._waiters.get(job.id, [])
            if entry in waiters:
                waiters.remove(entry)
            if not waiters:
                self._waiters.pop(job.id, None)

    def _on_change(self) -> None:
        loop = self._loop
        if loop is not None and not loop.is_closed():
            loop.call_soon_threadsafe(self._check.set)

    async def _run(self) -> None:
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._check.wait(), POLL_S)
            self._check.clear()
            if self._waiters:
                try:
                    self._resolve()
                except StoreUnavailable:
                    await asyncio.sleep(0.5)
                except Exception:
                    log.exception("watching jobs failed")
                    await asyncio.sleep(0.5)
            await asyncio.sleep(0.002)  # a burst of changes is looked at once

    def _resolve(self) -> None:
        versions = self.store.versions(list(self._waiters))
        for job_id, waiters in list(self._waiters.items()):
            now = versions.get(job_id)
            due = [future for seen, future in waiters if (now is None or now > seen) and not future.done()]
            if due:
                job = self.store.get(job_id)
                for future in due:
                    future.set_result(job)
