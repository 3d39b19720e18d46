"""The durable job store, behind one interface with two backends: SQLite (the default: WAL mode under the
data directory, any number of processes on one host) and PostgreSQL (``--store postgresql://...``: many
hosts; ``server.store_postgres``). Both run the same SQL but for the dialect's types and placeholders, and
pass one conformance suite (``tests/unit/test_job_store.py``).

A job row is committed before its id is returned to anyone, so a crash or ``kill -9`` loses nothing that
was acknowledged. The webhook outbox and upload reservations live in the same database so a terminal
state and its webhook are written in one transaction.

Scheduling is a claim/lease protocol on the store: a worker *claims* a batch (the oldest queued job by
priority and arrival, and queued jobs with the same ``batch_key`` up to a number of image rows) and holds a
*lease* on it, which it renews while it runs; a job whose lease ran out goes back to the queue
(``expired_leases`` then ``requeue``) and only the holder of a lease can finish its job. Claims take
``BEGIN IMMEDIATE`` (SQLite) or ``SELECT ... FOR UPDATE SKIP LOCKED`` (PostgreSQL). The webhook outbox is
claimed the same way, so a webhook is delivered once however many API nodes run.
"""

from __future__ import annotations

import json
import sqlite3
import threading
from abc import ABC, abstractmethod
from collections.abc import Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from .jobs import Job, JobState

# The schema in both dialects: {real} and {blob} are the dialect's float and bytes types.
_SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    id TEXT PRIMARY KEY,
    seq BIGINT NOT NULL,
    app_id TEXT NOT NULL,
    endpoint TEXT NOT NULL,
    owner TEXT NOT NULL,
    state TEXT NOT NULL,
    priority INTEGER NOT NULL,
    input TEXT NOT NULL,
    seed BIGINT NOT NULL,
    attempts INTEGER NOT NULL,
    sync INTEGER NOT NULL,
    base_url TEXT NOT NULL,
    queue_prefix TEXT NOT NULL,
    webhook_url TEXT,
    start_deadline {real},
    created_at {real} NOT NULL,
    started_at {real},
    finished_at {real},
    expires_at {real},
    result TEXT,
    error TEXT,
    error_type TEXT,
    error_body TEXT,
    http_status INTEGER NOT NULL,
    logs TEXT NOT NULL,
    inference_time {real},
    files TEXT NOT NULL,
    cancel_requested INTEGER NOT NULL DEFAULT 0,
    batch_key TEXT NOT NULL DEFAULT '',
    rows INTEGER NOT NULL DEFAULT 1,
    worker TEXT,
    lease_until {real}
);
CREATE INDEX IF NOT EXISTS jobs_unfinished ON jobs (state, priority, seq);
CREATE INDEX IF NOT EXISTS jobs_expiry ON jobs (expires_at);
CREATE TABLE IF NOT EXISTS webhooks (
    request_id TEXT PRIMARY KEY,
    url TEXT NOT NULL,
    body {blob} NOT NULL,
    owner TEXT NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0,
    next_at {real} NOT NULL,
    state TEXT NOT NULL DEFAULT 'pending',
    last_error TEXT,
    claimed_by TEXT,
    claimed_until {real}
);
CREATE INDEX IF NOT EXISTS webhooks_due ON webhooks (state, next_at);
CREATE TABLE IF NOT EXISTS uploads (
    token TEXT PRIMARY KEY,
    owner TEXT NOT NULL,
    file_name TEXT NOT NULL,
    content_type TEXT NOT NULL,
    size BIGINT,
    created_at {real} NOT NULL,
    expires_at {real} NOT NULL
);
CREATE TABLE IF NOT EXISTS idempotency (
    owner TEXT NOT NULL,
    key TEXT NOT NULL,
    fingerprint TEXT NOT NULL,
    request_id TEXT NOT NULL,
    PRIMARY KEY (owner, key)
);
CREATE INDEX IF NOT EXISTS idempotency_request ON idempotency (request_id);
"""

# Columns added after the first release: a store written by an older version gets them at open.
_ADDED_COLUMNS = {
    "jobs": {
        "batch_key": "TEXT NOT NULL DEFAULT ''",
        "rows": "INTEGER NOT NULL DEFAULT 1",
        "worker": "TEXT",
        "lease_until": "{real}",
    },
    "webhooks": {"claimed_by": "TEXT", "claimed_until": "{real}"},
}

_JSON_FIELDS = ("input", "result", "error_body", "logs", "files")
_COLUMNS = [
    "id",
    "seq",
    "app_id",
    "endpoint",
    "owner",
    "state",
    "priority",
    "input",
    "seed",
    "attempts",
    "sync",
    "base_url",
    "queue_prefix",
    "webhook_url",
    "start_deadline",
    "created_at",
    "started_at",
    "finished_at",
    "expires_at",
    "result",
    "error",
    "error_type",
    "error_body",
    "http_status",
    "logs",
    "inference_time",
    "files",
    "cancel_requested",
    "batch_key",
    "rows",
    "worker",
    "lease_until",
]
_SELECT = ", ".join(_COLUMNS)
_QUEUED, _RUNNING = JobState.QUEUED.value, JobState.RUNNING.value
_UPDATED = [c for c in _COLUMNS if c not in ("id", "input")]  # the input never changes: written once
_UPDATE = f"UPDATE jobs SET {', '.join(f'{c} = ?' for c in _UPDATED)} WHERE id = ?"


@dataclass
class WebhookRow:
    request_id: str
    url: str
    body: bytes
    owner: str
    attempts: int
    next_at: float


@dataclass
class UploadRow:
    token: str
    owner: str
    file_name: str
    content_type: str
    size: int | None
    created_at: float
    expires_at: float


class StoreUnavailable(RuntimeError):
    """The store cannot be reached (PostgreSQL restarting, a network cut): retry soon, nothing was written."""


class Cursor(Protocol):
    rowcount: int

    def fetchone(self) -> Any: ...

    def fetchall(self) -> list[Any]: ...


class Db(Protocol):
    """One connection inside a transaction (or a read): ``q`` runs SQL written with ``?`` placeholders."""

    def q(self, sql: str, params: Sequence[Any] = ()) -> Cursor: ...

    def many(self, sql: str, params: Sequence[Sequence[Any]]) -> None: ...


class JobStore(ABC):
    """The job store's interface and its SQL, shared by the backends; a backend supplies connections,
    transactions and the dialect (``_real``, ``_blob``, ``_skip_locked``)."""

    _real = "REAL"
    _blob = "BLOB"
    _skip_locked = ""  # appended to the claim's SELECTs

    @abstractmethod
    def _tx(self) -> AbstractContextManager[Db]:
        """A write transaction that serialises against other writers' claims."""

    @abstractmethod
    def _read(self) -> AbstractContextManager[Db]:
        """A connection for reads (a consistent snapshot per statement)."""

    @abstractmethod
    def _columns(self, db: Db, table: str) -> set[str]: ...

    @abstractmethod
    def close(self) -> None: ...

    def _create_schema(self, db: Db) -> None:
        for statement in _SCHEMA.format(real=self._real, blob=self._blob).split(";"):
            if statement.strip():
                db.q(statement)
        for table, columns in _ADDED_COLUMNS.items():
            have = self._columns(db, table)
            for name, decl in columns.items():
                if name not in have:
                    db.q(f"ALTER TABLE {table} ADD COLUMN {name} {decl.format(real=self._real)}")

    # ------------------------------------------------------------------ jobs

    def next_seq(self) -> int:
        with self._read() as db:
            row = db.q("SELECT COALESCE(MAX(seq), 0) FROM jobs").fetchone()
        return int(row[0]) + 1

    def add(self, job: Job, idempotency: tuple[str, str] | None = None) -> None:
        """Insert a new job, and its ``(Idempotency-Key, request fingerprint)`` if given; committed when this returns.

        A key is unique per owner; a new job takes over the key of an expired one.
        """
        values = _row(job)
        with self._tx() as db:
            db.q(
                f"INSERT INTO jobs ({_SELECT}) VALUES ({', '.join('?' * len(_COLUMNS))})", [values[c] for c in _COLUMNS]
            )
            if idempotency is not None:
                db.q(
                    "INSERT INTO idempotency (owner, key, fingerprint, request_id) VALUES (?, ?, ?, ?) "
                    "ON CONFLICT (owner, key) DO UPDATE SET fingerprint = excluded.fingerprint, "
                    "request_id = excluded.request_id",
                    (job.owner, *idempotency, job.id),
                )

    def idempotent(self, owner: str, key: str) -> tuple[str, str] | None:
        """(fingerprint, request id) stored for an owner's ``Idempotency-Key``, or None."""
        with self._read() as db:
            row = db.q(
                "SELECT fingerprint, request_id FROM idempotency WHERE owner = ? AND key = ?", (owner, key)
            ).fetchone()
        return (row[0], row[1]) if row else None

    def save(self, job: Job, webhook: WebhookRow | None = None, *, holder: str | None = None) -> bool:
        """Write every field of ``job`` (and queue its webhook in the same transaction).

        With ``holder``, only if that worker still holds the job's lease: False (nothing written) when the
        lease was lost and the job went back to the queue or to another worker.
        """
        sql, params = _UPDATE, _update_params(job)
        if holder is not None:
            sql += " AND worker = ? AND state = ?"
            params += [holder, _RUNNING]
        with self._tx() as db:
            if db.q(sql, params).rowcount != 1:
                return False
            if webhook is not None:
                db.q(
                    "INSERT INTO webhooks (request_id, url, body, owner, attempts, next_at, state) "
                    "VALUES (?, ?, ?, ?, 0, ?, 'pending') ON CONFLICT (request_id) DO UPDATE SET url = excluded.url, "
                    "body = excluded.body, owner = excluded.owner, attempts = 0, next_at = excluded.next_at, "
                    "state = 'pending', last_error = NULL, claimed_by = NULL, claimed_until = NULL",
                    (webhook.request_id, webhook.url, webhook.body, webhook.owner, webhook.next_at),
                )
        return True

    def save_many(self, jobs: Sequence[Job]) -> None:
        """Write several jobs in one transaction (a batch starting): all or none."""
        with self._tx() as db:
            db.many(_UPDATE, [_update_params(job) for job in jobs])

    def get(self, job_id: str) -> Job | None:
        with self._read() as db:
            row = db.q(f"SELECT {_SELECT} FROM jobs WHERE id = ?", (job_id,)).fetchone()
        return _job(row) if row else None

    def unfinished(self) -> list[Job]:
        """Queued and running jobs, in queue order (priority, then arrival)."""
        with self._read() as db:
            rows = db.q(
                f"SELECT {_SELECT} FROM jobs WHERE state IN (?, ?) ORDER BY priority, seq", (_QUEUED, _RUNNING)
            ).fetchall()
        return [_job(r) for r in rows]

    def position(self, job_id: str) -> int | None:
        """How many queued jobs are ahead of a queued job (None if it is not queued): right on any node.

        Two statements, not a self-join: the count is then one range of the (state, priority, seq) index,
        whatever the planner's statistics say (a join was quadratic on PostgreSQL with a fresh table)."""
        with self._read() as db:
            me = db.q("SELECT priority, seq FROM jobs WHERE id = ? AND state = ?", (job_id, _QUEUED)).fetchone()
            if me is None:
                return None
            row = db.q(
                "SELECT COUNT(*) FROM jobs WHERE state = ? AND (priority < ? OR (priority = ? AND seq < ?))",
                (_QUEUED, me[0], me[0], me[1]),
            ).fetchone()
        return int(row[0])

    def expired(self, now: float, limit: int = 500) -> list[Job]:
        with self._read() as db:
            rows = db.q(
                f"SELECT {_SELECT} FROM jobs WHERE expires_at IS NOT NULL AND expires_at <= ? LIMIT ?", (now, limit)
            ).fetchall()
        return [_job(r) for r in rows]

    def delete(self, job_ids: list[str]) -> None:
        ids = [(i,) for i in job_ids]
        with self._tx() as db:
            db.many("DELETE FROM jobs WHERE id = ?", ids)
            db.many("DELETE FROM idempotency WHERE request_id = ?", ids)
            db.many("DELETE FROM webhooks WHERE request_id = ? AND state != 'pending'", ids)

    def counts(self) -> dict[str, int]:
        with self._read() as db:
            rows = db.q("SELECT state, COUNT(*) FROM jobs GROUP BY state").fetchall()
        return {state: int(n) for state, n in rows}

    def request_cancel(self, job_id: str) -> bool:
        """Flag a queued or running job as cancelled (its holder reads the flag between steps)."""
        with self._tx() as db:
            cur = db.q(
                "UPDATE jobs SET cancel_requested = 1 WHERE id = ? AND state IN (?, ?)", (job_id, _QUEUED, _RUNNING)
            )
            return cur.rowcount == 1

    def cancel_requested(self, job_ids: Sequence[str]) -> set[str]:
        """Which of these jobs have been asked to stop (by any node)."""
        if not job_ids:
            return set()
        with self._read() as db:
            rows = db.q(
                f"SELECT id FROM jobs WHERE cancel_requested = 1 AND id IN ({', '.join('?' * len(job_ids))})",
                list(job_ids),
            ).fetchall()
        return {r[0] for r in rows}

    # ------------------------------------------------------------------ claims and leases

    def claim(self, worker: str, now: float, lease_s: float, *, max_rows: int = 8, max_jobs: int = 8) -> list[Job]:
        """Take a batch for ``worker``: the oldest queued job (priority, then arrival) and, in order, the queued
        jobs with its batch key that still fit in ``max_rows`` image rows (a lower priority one too: it only
        fills room; the first job always comes, whatever its rows). Each is marked running, with a lease until
        ``now + lease_s`` and one more attempt. Empty when nothing is queued. Jobs asked to cancel never are."""
        with self._tx() as db:
            head = db.q(
                "SELECT id, batch_key FROM jobs WHERE state = ? AND cancel_requested = 0 "
                f"ORDER BY priority, seq LIMIT 1{self._skip_locked}",
                (_QUEUED,),
            ).fetchone()
            if head is None:
                return []
            rows = db.q(
                f"SELECT {_SELECT} FROM jobs WHERE state = ? AND cancel_requested = 0 AND batch_key = ? "
                f"ORDER BY priority, seq LIMIT ?{self._skip_locked}",
                (_QUEUED, head[1], max_jobs),
            ).fetchall()
            batch: list[Job] = []
            used = 0
            for job in (_job(r) for r in rows):
                if batch and used + job.rows > max_rows:
                    continue  # a later, smaller one may still fit
                batch.append(job)
                used += job.rows
            for job in batch:
                job.state, job.worker, job.lease_until = JobState.RUNNING, worker, now + lease_s
                job.attempts += 1
                job.started_at = now
                db.q(
                    "UPDATE jobs SET state = ?, worker = ?, lease_until = ?, attempts = ?, started_at = ? WHERE id = ?",
                    (_RUNNING, worker, job.lease_until, job.attempts, now, job.id),
                )
        return batch

    def renew(self, worker: str, job_ids: Sequence[str], now: float, lease_s: float) -> set[str]:
        """Extend ``worker``'s leases on these jobs; the ids it still holds (a lost lease is not renewed)."""
        if not job_ids:
            return set()
        marks = ", ".join("?" * len(job_ids))
        with self._tx() as db:
            db.q(
                f"UPDATE jobs SET lease_until = ? WHERE worker = ? AND state = ? AND id IN ({marks})",
                [now + lease_s, worker, _RUNNING, *job_ids],
            )
            rows = db.q(
                f"SELECT id FROM jobs WHERE worker = ? AND state = ? AND id IN ({marks})", [worker, _RUNNING, *job_ids]
            ).fetchall()
        return {r[0] for r in rows}

    def expired_leases(self, now: float) -> list[Job]:
        """Running jobs whose worker stopped renewing (crashed, killed, cut off), oldest first."""
        with self._read() as db:
            rows = db.q(
                f"SELECT {_SELECT} FROM jobs WHERE state = ? AND lease_until IS NOT NULL AND lease_until < ? "
                "ORDER BY priority, seq",
                (_RUNNING, now),
            ).fetchall()
        return [_job(r) for r in rows]

    def requeue(self, job: Job, now: float) -> bool:
        """Put a job whose lease ran out back in the queue (with its logs and attempts as in ``job``); False if
        its worker renewed in the meantime or another node already did this."""
        job.state, job.worker, job.lease_until, job.started_at = JobState.QUEUED, None, None, None
        with self._tx() as db:
            cur = db.q(
                "UPDATE jobs SET state = ?, worker = NULL, lease_until = NULL, started_at = NULL, logs = ? "
                "WHERE id = ? AND state = ? AND lease_until < ?",
                (_QUEUED, json.dumps(job.logs), job.id, _RUNNING, now),
            )
            return cur.rowcount == 1

    # ------------------------------------------------------------------ webhook outbox

    def webhooks_due(
        self, now: float, limit: int = 50, *, claimant: str | None = None, lease_s: float = 60.0
    ) -> list[WebhookRow]:
        """Pending webhooks whose time has come. With ``claimant``, they are also claimed for ``lease_s`` so no
        other node delivers them meanwhile (``webhook_attempted`` ends the claim)."""
        with self._tx() as db:
            rows = db.q(
                "SELECT request_id, url, body, owner, attempts, next_at FROM webhooks WHERE state = 'pending' "
                "AND next_at <= ? AND (claimed_until IS NULL OR claimed_until < ?) "
                f"ORDER BY next_at LIMIT ?{self._skip_locked if claimant else ''}",
                (now, now, limit),
            ).fetchall()
            if claimant is not None and rows:
                db.many(
                    "UPDATE webhooks SET claimed_by = ?, claimed_until = ? WHERE request_id = ?",
                    [(claimant, now + lease_s, r[0]) for r in rows],
                )
        return [WebhookRow(r[0], r[1], bytes(r[2]), r[3], r[4], r[5]) for r in rows]

    def next_webhook_at(self) -> float | None:
        with self._read() as db:
            row = db.q("SELECT MIN(next_at) FROM webhooks WHERE state = 'pending'").fetchone()
        return row[0]

    def webhook_attempted(self, request_id: str, attempts: int, state: str, next_at: float, error: str | None) -> None:
        with self._tx() as db:
            db.q(
                "UPDATE webhooks SET attempts = ?, state = ?, next_at = ?, last_error = ?, claimed_by = NULL, "
                "claimed_until = NULL WHERE request_id = ?",
                (attempts, state, next_at, error, request_id),
            )

    def webhook_state(self, request_id: str) -> tuple[str, int, str | None] | None:
        with self._read() as db:
            row = db.q(
                "SELECT state, attempts, last_error FROM webhooks WHERE request_id = ?", (request_id,)
            ).fetchone()
        return (row[0], int(row[1]), row[2]) if row else None

    # ------------------------------------------------------------------ uploads

    def add_upload(self, upload: UploadRow) -> None:
        with self._tx() as db:
            db.q(
                "INSERT INTO uploads (token, owner, file_name, content_type, size, created_at, expires_at) "
                "VALUES (?, ?, ?, ?, ?, ?, ?)",
                (
                    upload.token,
                    upload.owner,
                    upload.file_name,
                    upload.content_type,
                    upload.size,
                    upload.created_at,
                    upload.expires_at,
                ),
            )

    def get_upload(self, token: str) -> UploadRow | None:
        with self._read() as db:
            row = db.q(
                "SELECT token, owner, file_name, content_type, size, created_at, expires_at FROM uploads "
                "WHERE token = ?",
                (token,),
            ).fetchone()
        return UploadRow(*row) if row else None

    def claim_upload(self, token: str) -> bool:
        """Mark an upload as being written (size -1); False if another PUT has it or it is done."""
        with self._tx() as db:
            return db.q("UPDATE uploads SET size = -1 WHERE token = ? AND size IS NULL", (token,)).rowcount == 1

    def release_upload(self, token: str) -> None:
        with self._tx() as db:
            db.q("UPDATE uploads SET size = NULL WHERE token = ? AND size = -1", (token,))

    def set_upload_size(self, token: str, size: int) -> None:
        with self._tx() as db:
            db.q("UPDATE uploads SET size = ? WHERE token = ?", (size, token))

    def expired_uploads(self, now: float, limit: int = 500) -> list[str]:
        with self._read() as db:
            rows = db.q("SELECT token FROM uploads WHERE expires_at <= ? LIMIT ?", (now, limit)).fetchall()
        return [r[0] for r in rows]

    def delete_uploads(self, tokens: list[str]) -> None:
        with self._tx() as db:
            db.many("DELETE FROM uploads WHERE token = ?", [(t,) for t in tokens])


class _SqliteDb:
    def __init__(self, conn: sqlite3.Connection) -> None:
        self.conn = conn

    def q(self, sql: str, params: Sequence[Any] = ()) -> sqlite3.Cursor:
        return self.conn.execute(sql, params)

    def many(self, sql: str, params: Sequence[Sequence[Any]]) -> None:
        self.conn.executemany(sql, params)


class SqliteStore(JobStore):
    """SQLite in WAL mode with ``synchronous=FULL``; one connection behind a lock per process (every call is
    short), and ``BEGIN IMMEDIATE`` for writes, so several processes on one host can share the file."""

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self._lock = threading.Lock()
        self._db = sqlite3.connect(path, check_same_thread=False, isolation_level=None, timeout=30)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.execute("PRAGMA busy_timeout=30000")
        with self._tx() as db:
            self._create_schema(db)

    def close(self) -> None:
        with self._lock:
            self._db.close()

    @contextmanager
    def _tx(self) -> Iterator[Db]:
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield _SqliteDb(self._db)
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")

    @contextmanager
    def _read(self) -> Iterator[Db]:
        with self._lock:
            yield _SqliteDb(self._db)

    def _columns(self, db: Db, table: str) -> set[str]:
        return {row[1] for row in db.q(f"PRAGMA table_info({table})").fetchall()}


def open_store(url: str | None, data_dir: Path) -> JobStore:
    """The store a ``--store`` value names: None or ``sqlite:///PATH`` (default ``DATA_DIR/jobs.sqlite3``),
    or ``postgresql://...`` (``pip install 'inpaint-server[postgres]'``)."""
    if not url:
        return SqliteStore(data_dir / "jobs.sqlite3")
    if url.startswith("sqlite:///"):
        return SqliteStore(Path(url.removeprefix("sqlite:///")))
    if url.startswith(("postgresql://", "postgres://")):
        from .store_postgres import PostgresStore

        return PostgresStore(url)
    raise ValueError(f"unknown store {url!r}: expected sqlite:///PATH or postgresql://...")


def _update_params(job: Job) -> list[Any]:
    """``_UPDATE``'s parameters for ``job``."""
    values = _row(job)
    return [values[c] for c in _UPDATED] + [job.id]


def _row(job: Job) -> dict[str, Any]:
    values = {c: getattr(job, c) for c in _COLUMNS}
    values["state"] = job.state.value
    values["sync"] = int(job.sync)
    values["cancel_requested"] = int(job.cancel_requested)
    for name in _JSON_FIELDS:
        value = values[name]
        values[name] = None if value is None else json.dumps(value)
    return values


def _job(row: tuple) -> Job:
    values = dict(zip(_COLUMNS, row, strict=True))
    for name in _JSON_FIELDS:
        if values[name] is not None:
            values[name] = json.loads(values[name])
    values["state"] = JobState(values["state"])
    values["sync"] = bool(values["sync"])
    values["cancel_requested"] = bool(values["cancel_requested"])
    return Job(**values)
