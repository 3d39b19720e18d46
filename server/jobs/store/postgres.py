"""The job store on PostgreSQL (``--store postgresql://...``): one queue for many API nodes and workers.

The SQL is :class:`~.base.JobStore`'s; this module adds the connections (a ``psycopg_pool`` pool that checks a
connection before handing it out, so a restarted server is reconnected to by itself), the dialect
(``DOUBLE PRECISION``, ``BYTEA``, ``FOR UPDATE SKIP LOCKED`` in claims), the change feed (every transaction
that changes jobs ends with ``NOTIFY``; a connection of its own ``LISTEN``\\s and reconnects by itself) and one
error for every way the database can be out of reach: :class:`~.base.StoreUnavailable`, which the API answers
with a retryable 503.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

from .base import Db, JobStore, StoreFull, StoreUnavailable

try:
    import psycopg
    from psycopg_pool import ConnectionPool, PoolTimeout
except ImportError as exc:  # pragma: no cover - depends on the install
    raise ImportError("the PostgreSQL store needs psycopg: pip install 'inpaint-server[postgres]'") from exc

log = logging.getLogger("inpaint-server.store")

# Held while the schema is created or migrated, so API nodes and workers starting together do not race.
_SCHEMA_LOCK = 0x1A9A1
CHANNEL = "inpaint_jobs"
_LINK_ERRORS = (psycopg.OperationalError, psycopg.InterfaceError, PoolTimeout)


class _PgDb:
    def __init__(self, conn: psycopg.Connection) -> None:
        self.conn = conn
        self.dirty = False

    def q(self, sql: str, params: Sequence[Any] = ()) -> psycopg.Cursor:
        return self.conn.execute(sql.replace("?", "%s"), params)

    def many(self, sql: str, params: Sequence[Sequence[Any]]) -> None:
        with self.conn.cursor() as cur:
            cur.executemany(sql.replace("?", "%s"), params)

    def changed(self) -> None:
        self.dirty = True


class PostgresStore(JobStore):
    _real = "DOUBLE PRECISION"
    _blob = "BYTEA"
    _skip_locked = " FOR UPDATE SKIP LOCKED"
    GET_TIMEOUT_S = 1.0  # how long a call waits for a pooled connection
    DOWN_RETRY_S = 1.0  # after a failure, calls fail at once for this long; then one tries again
    FEED_RETRY_S = 1.0  # the listener's pause before reconnecting

    def __init__(self, url: str, *, max_connections: int = 8, connect_timeout_s: float = 5.0) -> None:
        super().__init__()
        self.url = url
        self._connect_timeout_s = connect_timeout_s
        self._down_until = 0.0
        self._down_reason = ""
        self._pool = ConnectionPool(
            url,
            min_size=1,
            max_size=max_connections,
            timeout=connect_timeout_s,
            check=ConnectionPool.check_connection,
            kwargs={"connect_timeout": max(1, int(connect_timeout_s))},
            open=False,
            name="inpaint-store",
        )
        try:
            self._pool.open(wait=True, timeout=connect_timeout_s)
        except PoolTimeout as exc:
            self._pool.close()
            raise StoreUnavailable(f"PostgreSQL at {_safe(url)} does not answer: {exc}") from None
        with self._tx() as db:
            db.q("SELECT pg_advisory_xact_lock(?)", (_SCHEMA_LOCK,))
            self._create_schema(db)
        self._feed: threading.Thread | None = None
        self._feed_lock = threading.Lock()
        self._closed = threading.Event()

    def close(self) -> None:
        self._closed.set()
        if self._feed is not None:
            self._feed.join(timeout=3)
        self._pool.close()

    @contextmanager
    def _tx(self) -> Iterator[Db]:
        # Calls come from the event loop too: while the database is down, fail at once (for DOWN_RETRY_S after
        # each failure) instead of blocking the server for the pool's timeout on every request.
        if time.monotonic() < self._down_until:
            raise StoreUnavailable(self._down_reason)
        db: _PgDb | None = None
        try:
            with self._pool.connection(timeout=self.GET_TIMEOUT_S) as conn, conn.transaction():
                db = _PgDb(conn)
                yield db
                if db.dirty:
                    conn.execute(f"NOTIFY {CHANNEL}")  # delivered at commit, once per transaction
        except psycopg.errors.DiskFull as exc:  # the server's disk: it still answers, and reads still work
            self.on_full()
            raise StoreFull(f"PostgreSQL's disk is full: nothing was written ({exc})".strip()) from exc
        except _LINK_ERRORS as exc:  # the link, not the SQL
            self._down_reason = f"PostgreSQL is unavailable: {exc}".strip()
            self._down_until = time.monotonic() + self.DOWN_RETRY_S
            raise StoreUnavailable(self._down_reason) from exc
        if db is not None and db.dirty:
            self._fire()

    _read = _tx  # a read is a short transaction too (READ COMMITTED: each statement sees what was committed)

    def _init_seq(self, db: Db) -> None:
        db.q("CREATE SEQUENCE IF NOT EXISTS jobs_seq")
        # Past every stored job and every number handed out; a fresh sequence's first number stays 1.
        db.q(
            "SELECT setval('jobs_seq', GREATEST(v, 1), v > 0) FROM (SELECT GREATEST("
            "(SELECT COALESCE(MAX(seq), 0) FROM jobs), "
            "(SELECT CASE WHEN is_called THEN last_value ELSE 0 END FROM jobs_seq)) AS v) AS s"
        )

    def _take_seq(self, db: Db) -> int:
        return int(db.q("SELECT nextval('jobs_seq')").fetchone()[0])  # no lock shared by the API nodes' inserts

    def _columns(self, db: Db, table: str) -> set[str]:
        rows = db.q(
            "SELECT column_name FROM information_schema.columns WHERE table_schema = current_schema() "
            "AND table_name = ?",
            (table,),
        ).fetchall()
        return {r[0] for r in rows}

    # ------------------------------------------------------------------ other processes' changes

    def _start_feed(self) -> None:
        with self._feed_lock:
            if self._feed is None and not self._closed.is_set():
                self._feed = threading.Thread(target=self._listen, name="store-feed", daemon=True)
                self._feed.start()

    def _listen(self) -> None:
        """LISTEN on a connection of its own; after a reconnect, wake listeners once (changes were missed)."""
        while not self._closed.is_set():
            try:
                with psycopg.connect(self.url, autocommit=True, connect_timeout=5) as conn:
                    conn.execute(f"LISTEN {CHANNEL}")
                    self._fire()
                    while not self._closed.is_set():
                        if any(True for _ in conn.notifies(timeout=0.5)):
                            self._fire()
            except psycopg.Error as exc:
                log.debug("store change feed: %s; reconnecting", exc)
                self._closed.wait(self.FEED_RETRY_S)


def _safe(url: str) -> str:
    """The URL without its password, for messages."""
    info = psycopg.conninfo.conninfo_to_dict(url)
    return f"{info.get('host', 'localhost')}:{info.get('port', 5432)}/{info.get('dbname', '')}"
