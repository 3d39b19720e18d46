"""The durable job store's interface and its SQL, shared by two backends: SQLite (the default: WAL mode under the
data directory, any number of processes on one host; :mod:`.sqlite`) and PostgreSQL (``--store
postgresql://...``: many hosts; :mod:`.postgres`). Both run the same SQL but for the dialect's types and
placeholders, and pass one conformance suite (``tests/unit/test_job_store.py``).

A job row is committed before its id is returned to anyone, so a crash or ``kill -9`` loses nothing that
was acknowledged. The webhook outbox and upload reservations live in the same database, so a terminal
state and its webhook are written in one transaction.

Scheduling is a claim/lease protocol: a GPU worker reads the head of the queue (:meth:`JobStore.queue_head`,
priority then arrival), picks a batch from it (equal batch key, up to 8 image rows) and *claims* it
(:meth:`JobStore.claim`): only the jobs still queued are taken, each marked running with a *lease* that the
worker renews while it runs. Only the holder of a lease can write the job's progress or its terminal state.
A lease whose holder stopped (it ran out, or the holder's process is gone: :meth:`JobStore.dead_nodes`) is
taken back by any node's sweeper: the job runs again with the same seed, within ``max_attempts``. Claims
take ``BEGIN IMMEDIATE`` (SQLite) or ``SELECT ... FOR UPDATE SKIP LOCKED`` (PostgreSQL). The webhook outbox
is claimed the same way, so a webhook is delivered once however many API nodes run.

Every process that uses the store is a *node* with a row in ``nodes`` (its name, incarnation, state,
heartbeat and counters), which is how sync runs whose caller's node died are found, how per-worker
metrics reach every API node, and how a restarted node takes its predecessor's work back at once.
Every committed change to a job wakes the store's listeners in every process (:meth:`JobStore.subscribe`):
a sync run, a status stream or a worker reacts without polling the table.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
from abc import ABC, abstractmethod
from collections.abc import Callable, Collection, Mapping, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from typing import Any, Protocol

from ..job import Job, JobState

log = logging.getLogger("inpaint-server.store")

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
    lease_until {real},
    waiter TEXT,
    version BIGINT NOT NULL DEFAULT 0,
    files_lifetime_s {real},
    files_expire_at {real},
    no_retry INTEGER NOT NULL DEFAULT 0,
    previews INTEGER NOT NULL DEFAULT 0,
    preview TEXT
);
CREATE INDEX IF NOT EXISTS jobs_unfinished ON jobs (state, priority, seq);
CREATE INDEX IF NOT EXISTS jobs_expiry ON jobs (expires_at);
CREATE INDEX IF NOT EXISTS jobs_deadline ON jobs (state, start_deadline);
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
    expires_at {real} NOT NULL,
    lifetime_s {real},
    multipart_id TEXT,
    parts_ref TEXT
);
CREATE TABLE IF NOT EXISTS idempotency (
    owner TEXT NOT NULL,
    key TEXT NOT NULL,
    fingerprint TEXT NOT NULL,
    request_id TEXT NOT NULL,
    PRIMARY KEY (owner, key)
);
CREATE INDEX IF NOT EXISTS idempotency_request ON idempotency (request_id);
CREATE TABLE IF NOT EXISTS nodes (
    id TEXT PRIMARY KEY,
    name TEXT NOT NULL,
    kind TEXT NOT NULL,
    host TEXT NOT NULL,
    pid BIGINT NOT NULL,
    pid_start BIGINT NOT NULL,
    device TEXT,
    started_at {real} NOT NULL,
    heartbeat_at {real} NOT NULL,
    state TEXT NOT NULL,
    stats TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS shared_keys (
    name TEXT PRIMARY KEY,
    value {blob} NOT NULL
);
CREATE TABLE IF NOT EXISTS counters (
    name TEXT PRIMARY KEY,
    value BIGINT NOT NULL
);
"""

# Columns added after the first release: a store written by an older version gets them at open.
_ADDED_COLUMNS = {
    "jobs": {
        "batch_key": "TEXT NOT NULL DEFAULT ''",
        "rows": "INTEGER NOT NULL DEFAULT 1",
        "worker": "TEXT",
        "lease_until": "{real}",
        "waiter": "TEXT",
        "version": "BIGINT NOT NULL DEFAULT 0",
        "files_lifetime_s": "{real}",
        "files_expire_at": "{real}",
        "no_retry": "INTEGER NOT NULL DEFAULT 0",
        "previews": "INTEGER NOT NULL DEFAULT 0",
        "preview": "TEXT",
    },
    "webhooks": {"claimed_by": "TEXT", "claimed_until": "{real}"},
    "uploads": {"lifetime_s": "{real}", "multipart_id": "TEXT", "parts_ref": "TEXT"},
}
# Indexes on added columns: created once the columns exist.
_ADDED_INDEXES = (
    "CREATE INDEX IF NOT EXISTS jobs_files_expiry ON jobs (files_expire_at)",
    "CREATE INDEX IF NOT EXISTS uploads_expiry ON uploads (expires_at)",
    "CREATE INDEX IF NOT EXISTS jobs_owner ON jobs (owner, seq)",
)

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
    "waiter",
    "version",
    "files_lifetime_s",
    "files_expire_at",
    "no_retry",
    "previews",
]
_SELECT = ", ".join(_COLUMNS)
# Every column but the input (data URIs: megabytes), which only a worker preparing the job reads.
_SELECT_LIGHT = ", ".join("NULL" if c == "input" else c for c in _COLUMNS)
_QUEUED, _RUNNING = JobState.QUEUED.value, JobState.RUNNING.value
_UNFINISHED = (_QUEUED, _RUNNING)
# The input never changes (written once); the version counts writes, so watchers see a change by it alone.
_UPDATED = [c for c in _COLUMNS if c not in ("id", "input", "version")]
# A running job's newest step preview (``preview``, not a Job field: only a stream reads it, by
# :meth:`JobStore.preview`) is written with its progress; any other write ends or restarts the run, so it goes.
_UPDATE = (
    f"UPDATE jobs SET {', '.join(f'{c} = ?' for c in _UPDATED)}, preview = NULL, version = version + 1 WHERE id = ?"
)
_NODE_COLUMNS = "id, name, kind, host, pid, pid_start, device, started_at, heartbeat_at, state, stats"
_UPLOAD_COLUMNS = (
    "token",
    "owner",
    "file_name",
    "content_type",
    "size",
    "created_at",
    "expires_at",
    "lifetime_s",
    "multipart_id",
    "parts_ref",
)
_UPLOAD_SELECT = ", ".join(_UPLOAD_COLUMNS)


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
    """An upload: reserved (``size`` None), being written (-1) or stored (its size in bytes).

    ``expires_at`` is the reservation's expiry until the upload is stored, then the file's: ``lifetime_s`` (the
    client's lifecycle, shorter than the retention) or the retention after it was stored. A multipart upload has
    ``multipart_id`` (the secret in its part URLs) and ``parts_ref`` (the file store's handle on its parts).
    """

    token: str
    owner: str
    file_name: str
    content_type: str
    size: int | None
    created_at: float
    expires_at: float
    lifetime_s: float | None = None
    multipart_id: str | None = None
    parts_ref: str | None = None


@dataclass(frozen=True)
class QueuedRef:
    """A queued job as the head of the queue shows it: what a worker needs to pick a batch, not the input."""

    id: str
    priority: int
    seq: int
    batch_key: str
    rows: int
    start_deadline: float | None


@dataclass(frozen=True)
class RequestSummary:
    """One of an owner's requests as a list shows it: no input, result or logs (those can be megabytes)."""

    id: str
    app_id: str
    state: JobState
    created_at: float
    started_at: float | None
    finished_at: float | None
    error_type: str | None
    inference_time: float | None


@dataclass
class NodeRow:
    """One process using the store: an API node, a GPU worker, or both (the embedded default).

    ``id`` is the incarnation (``name#random``): a restarted process has the same ``name`` and a new id.
    ``pid_start`` is the process's start time in clock ticks (Linux), so a reused pid is not mistaken for it.
    """

    id: str
    name: str
    kind: str
    host: str
    pid: int
    pid_start: int
    device: str | None
    started_at: float
    heartbeat_at: float
    state: str
    stats: dict[str, Any] = field(default_factory=dict)

    @property
    def is_worker(self) -> bool:
        return "worker" in self.kind.split("+")


class StoreUnavailable(RuntimeError):
    """The store cannot be reached (PostgreSQL restarting, a network cut): retry soon, nothing was written."""


class StoreFull(StoreUnavailable):
    """The store's disk is full (SQLite's ``SQLITE_FULL``, PostgreSQL's ``disk_full``): nothing was written.

    A kind of :class:`StoreUnavailable`, so every loop that waits out an outage (a worker saving a result, lease
    renewals, the sweeper, heartbeats) waits out a full disk too and goes on by itself once space is freed; the
    API answers it with 507 ``insufficient_storage`` instead of a retryable 503.
    """


class Cursor(Protocol):
    rowcount: int

    def fetchone(self) -> Any: ...

    def fetchall(self) -> list[Any]: ...


class Db(Protocol):
    """One connection inside a transaction (or a read): ``q`` runs SQL written with ``?`` placeholders."""

    def q(self, sql: str, params: Sequence[Any] = ()) -> Cursor: ...

    def many(self, sql: str, params: Sequence[Sequence[Any]]) -> None: ...

    def changed(self) -> None:
        """This transaction changed jobs: wake every process's listeners once it commits."""
        ...


class JobStore(ABC):
    """The job store's interface and its SQL, shared by the backends; a backend supplies connections,
    transactions, the change feed and the dialect (``_real``, ``_blob``, ``_skip_locked``)."""

    _real = "REAL"
    _blob = "BLOB"
    _skip_locked = ""  # appended to the claims' SELECTs

    def __init__(self) -> None:
        self._listeners: list[Callable[[], None]] = []
        self._listeners_lock = threading.Lock()
        # Called (from the writing thread) when a write finds the disk full, before StoreFull is raised.
        self.on_full: Callable[[], None] = lambda: None

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
        for statement in _ADDED_INDEXES:
            db.q(statement)
        self._init_seq(db)

    def _init_seq(self, db: Db) -> None:
        """Start the arrival counter past every stored job (a store written before the counter existed too)."""
        if db.q("SELECT value FROM counters WHERE name = 'seq'").fetchone() is None:
            db.q("INSERT INTO counters (name, value) VALUES ('seq', (SELECT COALESCE(MAX(seq), 0) FROM jobs))")

    def _take_seq(self, db: Db) -> int:
        """The next arrival number, unique across every node (inside the insert's transaction)."""
        return int(db.q("UPDATE counters SET value = value + 1 WHERE name = 'seq' RETURNING value").fetchone()[0])

    # ------------------------------------------------------------------ change feed

    def subscribe(self, listener: Callable[[], None]) -> None:
        """Call ``listener()`` (from any thread, without arguments) after each committed change to jobs, made
        by this process or any other. Listeners must be quick: they only wake their owner."""
        with self._listeners_lock:
            self._listeners.append(listener)
        self._start_feed()

    def unsubscribe(self, listener: Callable[[], None]) -> None:
        with self._listeners_lock:
            if listener in self._listeners:
                self._listeners.remove(listener)

    @abstractmethod
    def _start_feed(self) -> None:
        """Start watching other processes' changes (a backend's poller or listener), once."""

    def _fire(self) -> None:
        with self._listeners_lock:
            listeners = list(self._listeners)
        for listener in listeners:
            try:
                listener()
            except Exception:  # a listener of a closed loop, say: never let it break a write
                log.debug("store change listener failed", exc_info=True)

    def ping(self) -> None:
        """Raise :class:`StoreUnavailable` unless the store answers (readiness)."""
        with self._read() as db:
            db.q("SELECT 1").fetchone()

    # ------------------------------------------------------------------ jobs

    def add(self, job: Job, idempotency: tuple[str, str] | None = None) -> None:
        """Insert a new job, and its ``(Idempotency-Key, request fingerprint)`` if given; committed when this returns.

        The job gets its arrival number (``seq``: queue order within a priority) here, unique across every node.
        A key is unique per owner; a new job takes over the key of an expired one.
        """
        with self._tx() as db:
            job.seq = self._take_seq(db)
            values = _row(job)
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
            db.changed()

    def idempotent(self, owner: str, key: str) -> tuple[str, str] | None:
        """(fingerprint, request id) stored for an owner's ``Idempotency-Key``, or None."""
        with self._read() as db:
            row = db.q(
                "SELECT fingerprint, request_id FROM idempotency WHERE owner = ? AND key = ?", (owner, key)
            ).fetchone()
        return (row[0], row[1]) if row else None

    def save(
        self,
        job: Job,
        webhook: WebhookRow | None = None,
        *,
        holder: str | None = None,
        lost: tuple[str | None, float | None] | None = None,
        queued: bool = False,
    ) -> bool:
        """Write every field of ``job`` but its input (and queue its webhook in the same transaction).

        Conditions, each a compare-and-set on the row as it is now: ``holder``, only while that worker holds
        the job's lease (it is running and leased to it); ``lost`` = (holder, lease_until), only while the job is
        still running under exactly that lease, NULLs included (a sweeper taking back a lease it saw lost, once
        across every node); ``queued``, only while the job is still queued
        (no worker claimed it meanwhile). Returns False, writing nothing, when a condition does not hold.
        """
        sql, params = _UPDATE, _update_params(job)
        if holder is not None:
            sql += " AND worker = ? AND state = ?"
            params += [holder, _RUNNING]
        if lost is not None:
            sql += " AND state = ? AND COALESCE(worker, '') = ? AND COALESCE(lease_until, -1) = ?"
            params += [_RUNNING, lost[0] or "", -1.0 if lost[1] is None else lost[1]]
        if queued:
            sql += " AND state = ?"
            params.append(_QUEUED)
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
            db.changed()
        job.version += 1
        return True

    def get(self, job_id: str, *, with_input: bool = False) -> Job | None:
        """The job, without its input (``{}``) unless ``with_input``: the input holds the data URIs, megabytes
        that only a worker preparing the job needs."""
        with self._read() as db:
            row = db.q(
                f"SELECT {_SELECT if with_input else _SELECT_LIGHT} FROM jobs WHERE id = ?", (job_id,)
            ).fetchone()
        return _job(row) if row else None

    def versions(self, job_ids: Collection[str]) -> dict[str, int]:
        """Each existing job's version (its write count): a watcher's cheap check for a change."""
        if not job_ids:
            return {}
        ids = list(job_ids)
        with self._read() as db:
            rows = db.q(f"SELECT id, version FROM jobs WHERE id IN ({_marks(ids)})", ids).fetchall()
        return {r[0]: int(r[1]) for r in rows}

    def result(self, job_id: str) -> dict[str, Any] | None:
        with self._read() as db:
            row = db.q("SELECT result FROM jobs WHERE id = ?", (job_id,)).fetchone()
        return json.loads(row[0]) if row and row[0] is not None else None

    def clear_result(self, job_id: str) -> None:
        """Forget a result that has been handed to its only reader (a sync run's ``sync_mode`` data URIs)."""
        with self._tx() as db:
            db.q("UPDATE jobs SET result = NULL, version = version + 1 WHERE id = ?", (job_id,))

    def unfinished(self) -> list[Job]:
        """Queued and running jobs, in queue order (priority, then arrival); without their inputs."""
        with self._read() as db:
            rows = db.q(
                f"SELECT {_SELECT_LIGHT} FROM jobs WHERE state IN (?, ?) ORDER BY priority, seq", _UNFINISHED
            ).fetchall()
        return [_job(r) for r in rows]

    def queue_head(self, limit: int) -> list[QueuedRef]:
        """The first ``limit`` queued jobs in queue order (priority, then arrival), not asked to cancel."""
        with self._read() as db:
            rows = db.q(
                "SELECT id, priority, seq, batch_key, rows, start_deadline FROM jobs "
                "WHERE state = ? AND cancel_requested = 0 ORDER BY priority, seq LIMIT ?",
                (_QUEUED, limit),
            ).fetchall()
        return [QueuedRef(r[0], int(r[1]), int(r[2]), r[3], int(r[4]), r[5]) for r in rows]

    def queued_count(self) -> int:
        with self._read() as db:
            return int(db.q("SELECT COUNT(*) FROM jobs WHERE state = ?", (_QUEUED,)).fetchone()[0])

    def queued_totals(self) -> tuple[int, int]:
        """(requests, image rows) waiting in the queue: what the queue's bound counts."""
        with self._read() as db:
            row = db.q("SELECT COUNT(*), COALESCE(SUM(rows), 0) FROM jobs WHERE state = ?", (_QUEUED,)).fetchone()
        return int(row[0]), int(row[1])

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

    def overdue(self, now: float, limit: int = 100) -> list[Job]:
        """Queued jobs whose start deadline (``X-Fal-Request-Timeout``) has passed."""
        with self._read() as db:
            rows = db.q(
                f"SELECT {_SELECT_LIGHT} FROM jobs WHERE state = ? AND start_deadline <= ? ORDER BY seq LIMIT ?",
                (_QUEUED, now, limit),
            ).fetchall()
        return [_job(r) for r in rows]

    def cancelled_queued(self, limit: int = 100) -> list[Job]:
        """Queued jobs flagged cancelled but not failed yet: a cancel whose second write did not go through (a full
        disk, a store outage between the flag and the terminal state)."""
        with self._read() as db:
            rows = db.q(
                f"SELECT {_SELECT_LIGHT} FROM jobs WHERE state = ? AND cancel_requested = 1 ORDER BY seq LIMIT ?",
                (_QUEUED, limit),
            ).fetchall()
        return [_job(r) for r in rows]

    def recent(self, owner: str, limit: int, now: float) -> list[RequestSummary]:
        """``owner``'s ``limit`` most recent requests that have not expired, newest first."""
        with self._read() as db:
            rows = db.q(
                "SELECT id, app_id, state, created_at, started_at, finished_at, error_type, inference_time FROM jobs "
                "WHERE owner = ? AND (expires_at IS NULL OR expires_at > ?) ORDER BY seq DESC LIMIT ?",
                (owner, now, limit),
            ).fetchall()
        return [RequestSummary(r[0], r[1], JobState(r[2]), *r[3:]) for r in rows]

    def waiting_sync(self) -> list[tuple[str, str | None]]:
        """(id, waiter) of every unfinished sync run: the waiter is the node whose caller waits for it."""
        with self._read() as db:
            rows = db.q("SELECT id, waiter FROM jobs WHERE sync = 1 AND state IN (?, ?)", _UNFINISHED).fetchall()
        return [(r[0], r[1]) for r in rows]

    def expired(self, now: float, limit: int = 500) -> list[Job]:
        with self._read() as db:
            rows = db.q(
                f"SELECT {_SELECT_LIGHT} FROM jobs WHERE expires_at IS NOT NULL AND expires_at <= ? LIMIT ?",
                (now, limit),
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
        """Flag a queued or running job as cancelled: no worker claims it any more, and its holder reads the flag
        between steps. False if the job is not queued or running (finished, or unknown)."""
        with self._tx() as db:
            cur = db.q(
                "UPDATE jobs SET cancel_requested = 1, version = version + 1 WHERE id = ? AND state IN (?, ?)",
                (job_id, *_UNFINISHED),
            )
            if cur.rowcount == 1:
                db.changed()
            return cur.rowcount == 1

    def cancel_requested(self, job_ids: Collection[str]) -> set[str]:
        """Which of these jobs have been asked to stop (by any node)."""
        if not job_ids:
            return set()
        ids = list(job_ids)
        with self._read() as db:
            rows = db.q(f"SELECT id FROM jobs WHERE cancel_requested = 1 AND id IN ({_marks(ids)})", ids).fetchall()
        return {r[0] for r in rows}

    # ------------------------------------------------------------------ claims and leases

    def claim(self, worker: str, job_ids: Sequence[str], now: float, lease_s: float, message: str = "") -> list[Job]:
        """Claim these jobs for ``worker``, those of them still queued, not asked to cancel and not past their
        start deadline: each is marked running with a lease until ``now + lease_s``, one more attempt, and the
        log line ``message`` (``{n}``: how many were claimed). Returns them in queue order, without inputs."""
        if not job_ids:
            return []
        ids = list(job_ids)
        with self._tx() as db:
            rows = db.q(
                f"SELECT {_SELECT_LIGHT} FROM jobs WHERE id IN ({_marks(ids)}) AND state = ? AND cancel_requested = 0 "
                f"AND (start_deadline IS NULL OR start_deadline > ?) ORDER BY priority, seq{self._skip_locked}",
                [*ids, _QUEUED, now],
            ).fetchall()
            jobs = [_job(r) for r in rows]
            for job in jobs:
                job.state, job.worker, job.lease_until = JobState.RUNNING, worker, now + lease_s
                job.attempts += 1
                job.started_at = now
                if message:
                    job.add_log(message.format(n=len(jobs)), when=now)
            db.many(
                "UPDATE jobs SET state = ?, worker = ?, lease_until = ?, attempts = ?, started_at = ?, logs = ?, "
                "version = version + 1 WHERE id = ?",
                [(_RUNNING, worker, j.lease_until, j.attempts, now, json.dumps(j.logs), j.id) for j in jobs],
            )
            if jobs:
                db.changed()
        for job in jobs:
            job.version += 1
        return jobs

    def renew(self, worker: str, job_ids: Collection[str], now: float, lease_s: float) -> set[str]:
        """Extend ``worker``'s leases on these jobs; the ids it still holds (a lost lease is not renewed)."""
        if not job_ids:
            return set()
        ids = list(job_ids)
        with self._tx() as db:
            db.q(
                f"UPDATE jobs SET lease_until = ? WHERE worker = ? AND state = ? AND id IN ({_marks(ids)})",
                [now + lease_s, worker, _RUNNING, *ids],
            )
            rows = db.q(
                f"SELECT id FROM jobs WHERE worker = ? AND state = ? AND id IN ({_marks(ids)})",
                [worker, _RUNNING, *ids],
            ).fetchall()
        return {r[0] for r in rows}

    def progress(self, worker: str, jobs: Sequence[Job], previews: Mapping[str, dict[str, Any]] | None = None) -> None:
        """Write running jobs' logs (steps, warnings), and the newest step preview of those in ``previews`` (by
        job id; it replaces the one before), where ``worker`` still holds them; one transaction."""
        if not jobs:
            return
        previews = previews or {}
        plain = [j for j in jobs if j.id not in previews]
        with self._tx() as db:
            if plain:
                db.many(
                    "UPDATE jobs SET logs = ?, version = version + 1 WHERE id = ? AND worker = ? AND state = ?",
                    [(json.dumps(j.logs), j.id, worker, _RUNNING) for j in plain],
                )
            if len(plain) < len(jobs):
                db.many(
                    "UPDATE jobs SET logs = ?, preview = ?, version = version + 1 "
                    "WHERE id = ? AND worker = ? AND state = ?",
                    [
                        (json.dumps(j.logs), json.dumps(previews[j.id]), j.id, worker, _RUNNING)
                        for j in jobs
                        if j.id in previews
                    ],
                )
            db.changed()

    def preview(self, job_id: str) -> dict[str, Any] | None:
        """A running job's newest step preview (see :meth:`progress`), or None."""
        with self._read() as db:
            row = db.q("SELECT preview FROM jobs WHERE id = ?", (job_id,)).fetchone()
        return json.loads(row[0]) if row and row[0] is not None else None

    def holders(self) -> set[str]:
        """The workers holding leases now."""
        with self._read() as db:
            rows = db.q("SELECT DISTINCT worker FROM jobs WHERE state = ? AND worker IS NOT NULL", (_RUNNING,))
            return {r[0] for r in rows.fetchall()}

    def lost_leases(self, now: float, dead: Collection[str] = ()) -> list[Job]:
        """Running jobs whose lease ran out, or whose holder is among the ``dead`` nodes, or with no lease at all
        (left running by a version before leases); oldest first."""
        holders = list(dead)
        extra = f" OR worker IN ({_marks(holders)})" if holders else ""
        with self._read() as db:
            rows = db.q(
                f"SELECT {_SELECT_LIGHT} FROM jobs WHERE state = ? AND (lease_until IS NULL OR lease_until < ?{extra}) "
                "ORDER BY priority, seq",
                [_RUNNING, now, *holders],
            ).fetchall()
        return [_job(r) for r in rows]

    # ------------------------------------------------------------------ nodes

    def register_node(self, node: NodeRow) -> None:
        """Write this process's row (a restarted process writes a new one: a new incarnation id)."""
        with self._tx() as db:
            db.q(
                f"INSERT INTO nodes ({_NODE_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT (id) DO "
                "UPDATE SET heartbeat_at = excluded.heartbeat_at, state = excluded.state, stats = excluded.stats",
                (
                    node.id,
                    node.name,
                    node.kind,
                    node.host,
                    node.pid,
                    node.pid_start,
                    node.device,
                    node.started_at,
                    node.heartbeat_at,
                    node.state,
                    json.dumps(node.stats),
                ),
            )

    def heartbeat(self, node: NodeRow) -> bool:
        """Refresh a node's heartbeat, state and counters; False if its row is gone (taken for dead)."""
        with self._tx() as db:
            cur = db.q(
                "UPDATE nodes SET heartbeat_at = ?, state = ?, stats = ? WHERE id = ?",
                (node.heartbeat_at, node.state, json.dumps(node.stats), node.id),
            )
            return cur.rowcount == 1

    def nodes(self) -> list[NodeRow]:
        with self._read() as db:
            rows = db.q(f"SELECT {_NODE_COLUMNS} FROM nodes ORDER BY name, started_at").fetchall()
        return [_node(r) for r in rows]

    def remove_nodes(self, node_ids: Collection[str]) -> None:
        if node_ids:
            with self._tx() as db:
                db.many("DELETE FROM nodes WHERE id = ?", [(i,) for i in node_ids])

    def dead_nodes(self, node_ids: Collection[str], now: float, stale_s: float) -> set[str]:
        """Which of these nodes are gone: no row, a heartbeat older than ``stale_s``, or a process that is
        provably not running any more (same host: its pid is gone or is another process; a backend may know
        more, such as SQLite's lock files)."""
        ids = [i for i in node_ids if i]
        if not ids:
            return set()
        with self._read() as db:
            rows = db.q(f"SELECT {_NODE_COLUMNS} FROM nodes WHERE id IN ({_marks(ids)})", ids).fetchall()
        found = {r[0]: _node(r) for r in rows}
        dead = set()
        for node_id in ids:
            node = found.get(node_id)
            if node is None or node.heartbeat_at < now - stale_s or not _process_alive(node) or self._gone(node):
                dead.add(node_id)
        return dead

    def _gone(self, node: NodeRow) -> bool:
        """A backend's own proof that a node's process has ended (SQLite: its lock file is free)."""
        return False

    # ------------------------------------------------------------------ counters

    def counter(self, name: str) -> int | None:
        """A number every node shares (kept across restarts), or None if it was never set."""
        with self._read() as db:
            row = db.q("SELECT value FROM counters WHERE name = ?", (name,)).fetchone()
        return int(row[0]) if row else None

    def set_counter(self, name: str, value: int) -> None:
        with self._tx() as db:
            db.q(
                "INSERT INTO counters (name, value) VALUES (?, ?) "
                "ON CONFLICT (name) DO UPDATE SET value = excluded.value",
                (name, value),
            )

    # ------------------------------------------------------------------ shared keys

    def shared_key(self, name: str, make: Callable[[], bytes]) -> bytes:
        """A secret every node shares (upload tokens, webhook signatures): made once by whichever node asks
        first, then read by every node, so a token issued by one API node is accepted by another."""
        with self._read() as db:
            row = db.q("SELECT value FROM shared_keys WHERE name = ?", (name,)).fetchone()
        if row is not None:
            return bytes(row[0])
        with self._tx() as db:
            db.q("INSERT INTO shared_keys (name, value) VALUES (?, ?) ON CONFLICT (name) DO NOTHING", (name, make()))
            return bytes(db.q("SELECT value FROM shared_keys WHERE name = ?", (name,)).fetchone()[0])

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

    def webhook_claimants(self, now: float) -> set[str]:
        """The nodes holding claims on outbox rows now."""
        with self._read() as db:
            rows = db.q(
                "SELECT DISTINCT claimed_by FROM webhooks WHERE state = 'pending' AND claimed_until >= ?", (now,)
            ).fetchall()
        return {r[0] for r in rows if r[0]}

    def release_webhooks(self, claimants: Collection[str]) -> int:
        """Drop the outbox claims of nodes that are gone, so another node delivers those webhooks now."""
        if not claimants:
            return 0
        ids = list(claimants)
        with self._tx() as db:
            cur = db.q(
                f"UPDATE webhooks SET claimed_by = NULL, claimed_until = NULL WHERE claimed_by IN ({_marks(ids)})", ids
            )
            return cur.rowcount

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
        values = [getattr(upload, c) for c in _UPLOAD_COLUMNS]
        with self._tx() as db:
            db.q(f"INSERT INTO uploads ({_UPLOAD_SELECT}) VALUES ({_marks(values)})", values)

    def get_upload(self, token: str) -> UploadRow | None:
        with self._read() as db:
            row = db.q(f"SELECT {_UPLOAD_SELECT} FROM uploads WHERE token = ?", (token,)).fetchone()
        return UploadRow(*row) if row else None

    def claim_upload(self, token: str) -> bool:
        """Mark an upload as being written (size -1); False if another PUT has it or it is done."""
        with self._tx() as db:
            return db.q("UPDATE uploads SET size = -1 WHERE token = ? AND size IS NULL", (token,)).rowcount == 1

    def release_upload(self, token: str) -> None:
        with self._tx() as db:
            db.q("UPDATE uploads SET size = NULL WHERE token = ? AND size = -1", (token,))

    def set_upload_size(self, token: str, size: int, expires_at: float | None = None) -> None:
        """The upload is stored: its size, and from when on it expires (None keeps the reservation's expiry)."""
        with self._tx() as db:
            if expires_at is None:
                db.q("UPDATE uploads SET size = ? WHERE token = ?", (size, token))
            else:
                db.q("UPDATE uploads SET size = ?, expires_at = ? WHERE token = ?", (size, expires_at, token))

    def expired_uploads(self, now: float, limit: int = 500) -> list[UploadRow]:
        with self._read() as db:
            rows = db.q(f"SELECT {_UPLOAD_SELECT} FROM uploads WHERE expires_at <= ? LIMIT ?", (now, limit)).fetchall()
        return [UploadRow(*r) for r in rows]

    def delete_uploads(self, tokens: list[str]) -> None:
        with self._tx() as db:
            db.many("DELETE FROM uploads WHERE token = ?", [(t,) for t in tokens])

    # ------------------------------------------------------------------ files with a lifecycle of their own

    def expired_files(self, now: float, limit: int = 500) -> list[str]:
        """Ids of requests whose files expire before the request (a lifecycle preference) and are due."""
        with self._read() as db:
            rows = db.q(
                "SELECT id FROM jobs WHERE files_expire_at IS NOT NULL AND files_expire_at <= ? LIMIT ?", (now, limit)
            ).fetchall()
        return [r[0] for r in rows]

    def forget_files(self, job_ids: list[str]) -> None:
        """The files of these requests are deleted: the rows name none (the results keep their URLs, now 404)."""
        with self._tx() as db:
            db.many("UPDATE jobs SET files = '[]', files_expire_at = NULL WHERE id = ?", [(i,) for i in job_ids])


def this_host() -> str:
    return socket.gethostname()


def process_start(pid: int) -> int:
    """The process's start time in clock ticks since boot (Linux ``/proc``), 0 where unknown."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as fh:
            stat = fh.read()
        return int(stat[stat.rindex(b")") + 2 :].split()[19])  # field 22; the name in parentheses may hold spaces
    except (OSError, ValueError, IndexError):
        return 0


def _process_alive(node: NodeRow) -> bool:
    """False only when the node ran on this host and its process has provably ended (its pid is free, or is a
    process started at another time); True otherwise (another host: only its heartbeat tells)."""
    if node.host != this_host() or node.pid <= 0:
        return True
    try:
        os.kill(node.pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process: alive
        return True
    started = process_start(node.pid)
    return not (started and node.pid_start and started != node.pid_start)


def _marks(values: Sequence[Any]) -> str:
    return ", ".join("?" * len(values))


def _update_params(job: Job) -> list[Any]:
    """``_UPDATE``'s parameters for ``job``."""
    values = _row(job)
    return [values[c] for c in _UPDATED] + [job.id]


def _row(job: Job) -> dict[str, Any]:
    values = {c: getattr(job, c) for c in _COLUMNS}
    values["state"] = job.state.value
    values["sync"] = int(job.sync)
    values["cancel_requested"] = int(job.cancel_requested)
    values["no_retry"] = int(job.no_retry)
    values["previews"] = int(job.previews)
    for name in _JSON_FIELDS:
        value = values[name]
        values[name] = None if value is None else json.dumps(value)
    return values


def _job(row: tuple) -> Job:
    values = dict(zip(_COLUMNS, row, strict=True))
    for name in _JSON_FIELDS:
        if values[name] is not None:
            values[name] = json.loads(values[name])
    if values["input"] is None:
        values["input"] = {}
    values["state"] = JobState(values["state"])
    values["sync"] = bool(values["sync"])
    values["cancel_requested"] = bool(values["cancel_requested"])
    values["no_retry"] = bool(values["no_retry"])
    values["previews"] = bool(values["previews"])
    return Job(**values)


def _node(row: tuple) -> NodeRow:
    (node_id, name, kind, host, pid, pid_start, device, started_at, heartbeat_at, state, stats) = row
    return NodeRow(
        node_id, name, kind, host, int(pid), int(pid_start), device, started_at, heartbeat_at, state, json.loads(stats)
    )
