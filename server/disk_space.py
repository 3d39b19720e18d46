"""A full disk, answered instead of crashed on: the free space of every disk the server writes to (the SQLite job
store, result files, uploads or their spool), and the writes that found none.

A disk counts as full while less than ``disk_reserve_bytes`` is free on it (read with ``statvfs`` every
:data:`CHECK_EVERY_S`, off the event loop), while it has no inodes left, or after a write there failed for lack
of space (``ENOSPC``, ``EDQUOT``, SQLite's ``SQLITE_FULL``) until more is free than then (someone freed
:data:`FREED_BYTES`, or a hundredth of a smaller disk) or :data:`FAILURE_HOLD_S` have passed. While one is full,
submits and uploads are refused with 507 ``insufficient_storage`` before anything is written, ``/health/ready``
answers 503 saying so, and the GPU worker takes no new batch (queued requests wait in the queue); all of it ends
by itself once space is back. The reserve is what lets requests already running save their results when the
server's own writes fill the disk.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from .delivery.file_store import FileStore, LocalFileStore, S3FileStore
from .http.errors import InsufficientStorage
from .jobs.store import JobStore, SqliteStore

log = logging.getLogger("inpaint-server.disk")

FULL_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT})
CHECK_EVERY_S = 1.0
FAILURE_HOLD_S = 60.0  # a failed write marks its disk full at most this long without a new failure
FREED_BYTES = 1024 * 1024  # ...or until this much more is free than when it failed
STORE, FILES, SPOOL = "job store", "result files and uploads", "upload spool"


def is_disk_full(exc: BaseException) -> bool:
    """Whether an error is a write that found no space (``ENOSPC``, or ``EDQUOT``: a quota)."""
    return isinstance(exc, OSError) and exc.errno in FULL_ERRNOS


class _Disk:
    """One filesystem the server writes to (``path`` is a directory on it) and what it holds there."""

    def __init__(self, path: Path, label: str) -> None:
        self.path = path
        self.labels = [label]
        self.free: int | None = None  # bytes an unprivileged write may still use; None: unknown
        self.size = 0
        self.inodes_left: int | None = None
        self.failed_at: float | None = None  # when a write last found no space (monotonic)
        self.free_at_failure = 0
        self.reported: str | None = None  # the problem last logged

    def measure(self) -> None:
        try:
            stat = os.statvfs(self.path)
        except OSError as exc:
            log.warning("cannot read the free space of %s: %s", self.path, exc)
            self.free = self.inodes_left = None
            return
        self.free = stat.f_bavail * stat.f_frsize
        self.size = stat.f_blocks * stat.f_frsize
        self.inodes_left = stat.f_favail if stat.f_files else None  # some filesystems have no inode count

    @property
    def what(self) -> str:
        return ", ".join(self.labels)


class DiskSpace:
    """Whether the disks under ``places`` (label, directory) have room (see the module); ``clock`` is monotonic."""

    def __init__(
        self, places: Sequence[tuple[str, Path]], reserve_bytes: int, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.reserve_bytes = reserve_bytes
        self.clock = clock
        by_device: dict[int, _Disk] = {}
        self._by_label: dict[str, _Disk] = {}
        for label, path in places:
            device = os.stat(path).st_dev
            disk = by_device.get(device)
            if disk is None:
                disk = by_device[device] = _Disk(path, label)
            elif label not in disk.labels:
                disk.labels.append(label)
            self._by_label[label] = disk
        self._disks = list(by_device.values())
        self.refresh()

    def refresh(self) -> None:
        """Read every disk's free space again (blocking: :meth:`run` calls it off the event loop)."""
        for disk in self._disks:
            disk.measure()
            self._report(disk)

    def failed(self, label: str) -> None:
        """A write to ``label`` (:data:`STORE`, :data:`FILES`, :data:`SPOOL`) found no space. Any thread may call it;
        call it after removing what the failed write left, so that cleaning up is not taken for freed space."""
        disk = self._by_label.get(label)
        if disk is None:
            return
        disk.measure()
        disk.failed_at, disk.free_at_failure = self.clock(), disk.free or 0
        self._report(disk)

    def failed_files(self) -> None:
        """A write of the file store (a directory, or a bucket's upload spool) found no space."""
        self.failed(FILES)
        self.failed(SPOOL)

    @property
    def problem(self) -> str | None:
        """Why the server cannot store anything now (a full disk, named by what it holds), or None."""
        reasons = [reason for disk in self._disks if (reason := self._reason(disk))]
        return "; ".join(reasons) or None

    def check(self) -> None:
        """Raise :class:`InsufficientStorage` (507) while a disk is full: call it before writing anything."""
        problem = self.problem
        if problem is not None:
            raise InsufficientStorage(f"{problem}; nothing was stored, retry once space is freed")

    async def run(self) -> None:
        """Refresh every :data:`CHECK_EVERY_S` until cancelled."""
        while True:
            await asyncio.sleep(CHECK_EVERY_S)
            try:
                await asyncio.to_thread(self.refresh)
            except Exception:
                log.exception("reading the free disk space failed")

    def _reason(self, disk: _Disk) -> str | None:
        free = disk.free
        if disk.inodes_left == 0:
            return f"the disk of the {disk.what} is full (no inodes left)"
        if self.reserve_bytes and free is not None and free < self.reserve_bytes:
            return (
                f"the disk of the {disk.what} is full ({_size(free)} free, less than disk_reserve_bytes, "
                f"{_size(self.reserve_bytes)})"
            )
        recent = disk.failed_at is not None and self.clock() - disk.failed_at < FAILURE_HOLD_S
        if recent and (free is None or free < disk.free_at_failure + min(FREED_BYTES, disk.size // 100)):
            return f"the disk of the {disk.what} is full (a write found no space; {_size(free)} free)"
        return None

    def _report(self, disk: _Disk) -> None:
        """Log when a disk becomes full (with its path: the server log is the operator's) and when it recovers."""
        reason = self._reason(disk)
        if reason is not None and disk.reported is None:
            log.error(
                "%s at %s: submits and uploads get 507 and no new batch starts until space is freed", reason, disk.path
            )
        elif reason is None and disk.reported is not None:
            log.warning("the disk of the %s has room again (%s free): back to work", disk.what, _size(disk.free))
        disk.reported = reason


def watch_disks(store: JobStore, files: FileStore, reserve_bytes: int) -> DiskSpace:
    """The :class:`DiskSpace` of this node's stores: the SQLite store's directory, the file store's directory (or a
    bucket's upload spool); the store reports its ``SQLITE_FULL`` writes to it. PostgreSQL's disk is its server's:
    its full-disk errors are answered (507), not watched."""
    places: list[tuple[str, Path]] = []
    if isinstance(store, SqliteStore):
        places.append((STORE, store.path.parent))
    if isinstance(files, LocalFileStore):
        places.append((FILES, files.root))
    elif isinstance(files, S3FileStore):
        places.append((SPOOL, files.spool_dir))
    disk = DiskSpace(places, reserve_bytes)
    store.on_full = lambda: disk.failed(STORE)
    return disk


def _size(n: int | None) -> str:
    if n is None:
        return "unknown"
    if n < 1024:
        return f"{n} bytes"
    if n < 1024 * 1024:
        return f"{n / 1024:.0f} KiB"
    if n < 1024**3:
        return f"{n / 1024**2:.1f} MiB"
    return f"{n / 1024**3:.1f} GiB"
