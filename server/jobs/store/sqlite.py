"""The job store on SQLite (the default): WAL mode under the data directory, shared by the processes of one host.

Writes take ``BEGIN IMMEDIATE`` (one writer at a time, claims included) and commit with ``synchronous=FULL``.
Other processes' commits are seen by polling ``PRAGMA data_version`` on a connection of its own, a read of
shared memory: listeners wake within :data:`FEED_INTERVAL_S`. Each process holds an exclusive lock on a file
of its own next to the database (``<db>-nodes/<node>.lock``): the kernel drops it when the process ends, however
it ends, so another process knows at once that a node is gone, even across containers that share the volume.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import sqlite3
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from .base import Db, JobStore, NodeRow, StoreFull

FEED_INTERVAL_S = 0.02
OPEN_NEEDS_BYTES = 1024 * 1024  # a failure to open the store with less free than this is put down to a full disk


class _SqliteDb:
    def __init__(self, conn: sqlite3.Connection) -> None:
        self.conn = conn
        self.dirty = False

    def q(self, sql: str, params: Sequence[Any] = ()) -> sqlite3.Cursor:
        return self.conn.execute(sql, params)

    def many(self, sql: str, params: Sequence[Sequence[Any]]) -> None:
        self.conn.executemany(sql, params)

    def changed(self) -> None:
        self.dirty = True


class SqliteStore(JobStore):
    """SQLite in WAL mode with ``synchronous=FULL``; one connection behind a lock per process (every call is
    short), and ``BEGIN IMMEDIATE`` for writes, so several processes on one host can share the file."""

    def __init__(self, path: Path) -> None:
        super().__init__()
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self._lock = threading.Lock()
        try:
            self._db = self._connect()
            self._db.execute("PRAGMA journal_mode=WAL")  # makes the -shm and -wal files: it needs some space
            self._db.execute("PRAGMA synchronous=FULL")
            with self._tx() as db:
                self._create_schema(db)
        except (sqlite3.OperationalError, StoreFull) as exc:
            free = _free_bytes(path.parent)
            if free is None or free >= OPEN_NEEDS_BYTES:
                raise
            raise StoreFull(
                f"the disk of the job store {path} is full ({free} bytes free): it cannot be opened; free some space "
                "and start again"
            ) from exc
        self._locks_dir = path.with_name(f"{path.name}-nodes")
        self._held: dict[str, int] = {}  # node id -> the fd of its lock file (this process's nodes)
        self._feed: threading.Thread | None = None
        self._closed = threading.Event()

    def _connect(self) -> sqlite3.Connection:
        conn = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None, timeout=30)
        conn.execute("PRAGMA busy_timeout=30000")
        return conn

    def close(self) -> None:
        self._closed.set()
        if self._feed is not None:
            self._feed.join(timeout=2)
        for node_id in list(self._held):
            self._release_lock(node_id)
        with self._lock:
            self._db.close()

    @contextmanager
    def _tx(self) -> Iterator[Db]:
        with self._lock, self._full_disk():
            self._db.execute("BEGIN IMMEDIATE")
            db = _SqliteDb(self._db)
            try:
                yield db
                self._db.execute("COMMIT")
            except BaseException:
                # A COMMIT that failed (SQLITE_FULL) may leave the transaction open: never let a later write join it.
                if self._db.in_transaction:
                    with contextlib.suppress(sqlite3.Error):
                        self._db.execute("ROLLBACK")
                raise
        if db.dirty:
            self._fire()

    @contextmanager
    def _read(self) -> Iterator[Db]:
        with self._lock, self._full_disk():
            yield _SqliteDb(self._db)

    @contextmanager
    def _full_disk(self) -> Iterator[None]:
        """``SQLITE_FULL`` (the disk of the database or of its WAL is full) as :class:`StoreFull`."""
        try:
            yield
        except sqlite3.OperationalError as exc:
            if getattr(exc, "sqlite_errorcode", None) != sqlite3.SQLITE_FULL:
                raise
            self.on_full()
            raise StoreFull(f"the disk of the job store ({self.path.name}) is full: nothing was written") from exc

    def _columns(self, db: Db, table: str) -> set[str]:
        return {row[1] for row in db.q(f"PRAGMA table_info({table})").fetchall()}

    # ------------------------------------------------------------------ other processes' changes

    def _start_feed(self) -> None:
        with self._lock:
            if self._feed is not None or self._closed.is_set():
                return
            self._feed = threading.Thread(target=self._watch, name="store-feed", daemon=True)
            self._feed.start()

    def _watch(self) -> None:
        """Poll ``PRAGMA data_version`` on a connection of its own: it changes when any other connection (this
        process's own included) commits."""
        conn = self._connect()
        try:
            last = conn.execute("PRAGMA data_version").fetchone()[0]
            while not self._closed.wait(FEED_INTERVAL_S):
                try:
                    now = conn.execute("PRAGMA data_version").fetchone()[0]
                except sqlite3.Error:
                    continue
                if now != last:
                    last = now
                    self._fire()
        finally:
            conn.close()

    # ------------------------------------------------------------------ node liveness: lock files

    def register_node(self, node: NodeRow) -> None:
        """Also take the node's lock file (again, if another node removed it as gone: the node is back)."""
        path = self._lock_path(node.id)
        if node.id in self._held and not path.exists():
            os.close(self._held.pop(node.id))
        if node.id not in self._held:
            self._locks_dir.mkdir(parents=True, exist_ok=True)
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # a fresh random id: nobody else holds it
            self._held[node.id] = fd
        super().register_node(node)

    def remove_nodes(self, node_ids: Any) -> None:
        super().remove_nodes(node_ids)
        for node_id in node_ids:
            if node_id in self._held:
                self._release_lock(node_id)
            else:
                with contextlib.suppress(OSError):
                    self._lock_path(node_id).unlink()

    def _gone(self, node: NodeRow) -> bool:
        if node.id in self._held:
            return False
        try:
            fd = os.open(self._lock_path(node.id), os.O_RDWR)
        except FileNotFoundError:
            return True
        except OSError:
            return False
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return False  # its process holds the lock: alive
        finally:
            os.close(fd)  # closing drops the lock if this process got it
        return True

    def _release_lock(self, node_id: str) -> None:
        fd = self._held.pop(node_id)
        with contextlib.suppress(OSError):
            self._lock_path(node_id).unlink()
        os.close(fd)

    def _lock_path(self, node_id: str) -> Path:
        return self._locks_dir / f"{hashlib.sha256(node_id.encode()).hexdigest()[:32]}.lock"


def _free_bytes(directory: Path) -> int | None:
    try:
        stat = os.statvfs(directory)
    except OSError:
        return None
    return stat.f_bavail * stat.f_frsize
