"""The job store on PostgreSQL (``--store postgresql://...``): one queue for many API nodes and workers.

The SQL is :class:`server.store.JobStore`'s; this module adds the connections (a ``psycopg_pool`` pool that
checks a connection before handing it out, so a restarted server is reconnected to by itself), the
dialect (``DOUBLE PRECISION``, ``BYTEA``, ``FOR UPDATE SKIP LOCKED`` in claims) and one error for every way
the database can be out of reach: :class:`~server.store.StoreUnavailable`, which the API answers with a
retryable 503.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

from .store import Db, JobStore, StoreUnavailable

try:
    import psycopg
    from psycopg_pool import ConnectionPool, PoolTimeout
except ImportError as exc:  # pragma: no cover - depends on the install
    raise ImportError("the PostgreSQL store needs psycopg: pip install 'inpaint-server[postgres]'") from exc

# Held while the schema is created or migrated, so API nodes and workers starting together do not race.
_SCHEMA_LOCK = 0x1A9A1


class _PgDb:
    def __init__(self, conn: psycopg.Connection) -> None:
        self.conn = conn

    def q(self, sql: str, params: Sequence[Any] = ()) -> psycopg.Cursor:
        return self.conn.execute(sql.replace("?", "%s"), params)

    def many(self, sql: str, params: Sequence[Sequence[Any]]) -> None:
        with self.conn.cursor() as cur:
            cur.executemany(sql.replace("?", "%s"), params)


class PostgresStore(JobStore):
    _real = "DOUBLE PRECISION"
    _blob = "BYTEA"
    _skip_locked = " FOR UPDATE SKIP LOCKED"
    GET_TIMEOUT_S = 1.0  # how long a call waits for a pooled connection
    DOWN_RETRY_S = 1.0  # after a failure, calls fail at once for this long; then one tries again

    def __init__(self, url: str, *, max_connections: int = 8, connect_timeout_s: float = 5.0) -> None:
        self.url = url
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

    def close(self) -> None:
        self._pool.close()

    @contextmanager
    def _tx(self) -> Iterator[Db]:
        # Calls come from the event loop too: while the database is down, fail at once (for DOWN_RETRY_S after
        # each failure) instead of blocking the server for the pool's timeout on every request.
        if time.monotonic() < self._down_until:
            raise StoreUnavailable(self._down_reason)
        try:
            with self._pool.connection(timeout=self.GET_TIMEOUT_S) as conn, conn.transaction():
                yield _PgDb(conn)
        except (psycopg.OperationalError, psycopg.InterfaceError, PoolTimeout) as exc:  # the link, not the SQL
            self._down_reason = f"PostgreSQL is unavailable: {exc}".strip()
            self._down_until = time.monotonic() + self.DOWN_RETRY_S
            raise StoreUnavailable(self._down_reason) from exc

    _read = _tx  # a read is a short transaction too (READ COMMITTED: each statement sees what was committed)

    def _columns(self, db: Db, table: str) -> set[str]:
        rows = db.q(
            "SELECT column_name FROM information_schema.columns WHERE table_schema = current_schema() "
            "AND table_name = ?",
            (table,),
        ).fetchall()
        return {r[0] for r in rows}


def _safe(url: str) -> str:
    """The URL without its password, for messages."""
    info = psycopg.conninfo.conninfo_to_dict(url)
    return f"{info.get('host', 'localhost')}:{info.get('port', 5432)}/{info.get('dbname', '')}"
