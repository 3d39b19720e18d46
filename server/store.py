"""The durable job store: SQLite in WAL mode under the data directory.

A job row is committed (``synchronous=FULL``) before its id is returned to anyone, so a crash or
``kill -9`` loses nothing that was acknowledged. The webhook outbox and upload reservations live in
the same database so a terminal state and its webhook are written in one transaction.

The interface is deliberately narrow (add, save, get, unfinished, expired, delete, outbox) so a Redis
backend can implement the same methods.
"""

from __future__ import annotations

import json
import sqlite3
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .jobs import Job, JobState

_SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    id TEXT PRIMARY KEY,
    seq INTEGER NOT NULL,
    app_id TEXT NOT NULL,
    endpoint TEXT NOT NULL,
    owner TEXT NOT NULL,
    state TEXT NOT NULL,
    priority INTEGER NOT NULL,
    input TEXT NOT NULL,
    seed INTEGER NOT NULL,
    attempts INTEGER NOT NULL,
    sync INTEGER NOT NULL,
    base_url TEXT NOT NULL,
    queue_prefix TEXT NOT NULL,
    webhook_url TEXT,
    start_deadline REAL,
    created_at REAL NOT NULL,
    started_at REAL,
    finished_at REAL,
    expires_at REAL,
    result TEXT,
    error TEXT,
    error_type TEXT,
    error_body TEXT,
    http_status INTEGER NOT NULL,
    logs TEXT NOT NULL,
    inference_time REAL,
    files TEXT NOT NULL,
    cancel_requested INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX IF NOT EXISTS jobs_unfinished ON jobs (state, priority, seq);
CREATE INDEX IF NOT EXISTS jobs_expiry ON jobs (expires_at);
CREATE TABLE IF NOT EXISTS webhooks (
    request_id TEXT PRIMARY KEY,
    url TEXT NOT NULL,
    body BLOB NOT NULL,
    owner TEXT NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0,
    next_at REAL NOT NULL,
    state TEXT NOT NULL DEFAULT 'pending',
    last_error TEXT
);
CREATE INDEX IF NOT EXISTS webhooks_due ON webhooks (state, next_at);
CREATE TABLE IF NOT EXISTS uploads (
    token TEXT PRIMARY KEY,
    owner TEXT NOT NULL,
    file_name TEXT NOT NULL,
    content_type TEXT NOT NULL,
    size INTEGER,
    created_at REAL NOT NULL,
    expires_at REAL NOT NULL
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
]


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


class JobStore:
    """SQLite job store. Thread-safe (one connection behind a lock; every call is short)."""

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self._lock = threading.Lock()
        self._db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.execute("PRAGMA busy_timeout=5000")
        self._db.executescript(_SCHEMA)

    def close(self) -> None:
        with self._lock:
            self._db.close()

    @contextmanager
    def _tx(self) -> Iterator[sqlite3.Connection]:
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield self._db
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")

    # ------------------------------------------------------------------ jobs

    def next_seq(self) -> int:
        with self._lock:
            row = self._db.execute("SELECT COALESCE(MAX(seq), 0) FROM jobs").fetchone()
        return int(row[0]) + 1

    def add(self, job: Job, idempotency: tuple[str, str] | None = None) -> None:
        """Insert a new job, and its ``(Idempotency-Key, request fingerprint)`` if given; committed when this returns.

        A key is unique per owner; a new job takes over the key of an expired one.
        """
        values = _row(job)
        with self._tx() as db:
            db.execute(
                f"INSERT INTO jobs ({', '.join(_COLUMNS)}) VALUES ({', '.join('?' * len(_COLUMNS))})",
                [values[c] for c in _COLUMNS],
            )
            if idempotency is not None:
                db.execute(
                    "INSERT OR REPLACE INTO idempotency (owner, key, fingerprint, request_id) VALUES (?, ?, ?, ?)",
                    (job.owner, *idempotency, job.id),
                )

    def idempotent(self, owner: str, key: str) -> tuple[str, str] | None:
        """(fingerprint, request id) stored for an owner's ``Idempotency-Key``, or None."""
        with self._lock:
            row = self._db.execute(
                "SELECT fingerprint, request_id FROM idempotency WHERE owner = ? AND key = ?", (owner, key)
            ).fetchone()
        return (row[0], row[1]) if row else None

    def save(self, job: Job, webhook: WebhookRow | None = None) -> None:
        """Write every field of ``job`` (and queue its webhook in the same transaction)."""
        values = _row(job)
        cols = [c for c in _COLUMNS if c not in ("id", "input")]  # the input never changes: written once
        with self._tx() as db:
            db.execute(
                f"UPDATE jobs SET {', '.join(f'{c} = ?' for c in cols)} WHERE id = ?",
                [values[c] for c in cols] + [job.id],
            )
            if webhook is not None:
                db.execute(
                    "INSERT OR REPLACE INTO webhooks (request_id, url, body, owner, attempts, next_at, state) "
                    "VALUES (?, ?, ?, ?, 0, ?, 'pending')",
                    (webhook.request_id, webhook.url, webhook.body, webhook.owner, webhook.next_at),
                )

    def get(self, job_id: str) -> Job | None:
        with self._lock:
            cur = self._db.execute(f"SELECT {', '.join(_COLUMNS)} FROM jobs WHERE id = ?", (job_id,))
            row = cur.fetchone()
        return _job(row) if row else None

    def unfinished(self) -> list[Job]:
        """Queued and running jobs, in queue order (priority, then arrival)."""
        with self._lock:
            rows = self._db.execute(
                f"SELECT {', '.join(_COLUMNS)} FROM jobs WHERE state IN (?, ?) ORDER BY priority, seq",
                (JobState.QUEUED.value, JobState.RUNNING.value),
            ).fetchall()
        return [_job(r) for r in rows]

    def expired(self, now: float, limit: int = 500) -> list[Job]:
        with self._lock:
            rows = self._db.execute(
                f"SELECT {', '.join(_COLUMNS)} FROM jobs WHERE expires_at IS NOT NULL AND expires_at <= ? LIMIT ?",
                (now, limit),
            ).fetchall()
        return [_job(r) for r in rows]

    def delete(self, job_ids: list[str]) -> None:
        with self._tx() as db:
            db.executemany("DELETE FROM jobs WHERE id = ?", [(i,) for i in job_ids])
            db.executemany("DELETE FROM idempotency WHERE request_id = ?", [(i,) for i in job_ids])
            db.executemany("DELETE FROM webhooks WHERE request_id = ? AND state != 'pending'", [(i,) for i in job_ids])

    def counts(self) -> dict[str, int]:
        with self._lock:
            rows = self._db.execute("SELECT state, COUNT(*) FROM jobs GROUP BY state").fetchall()
        return {state: n for state, n in rows}

    # ------------------------------------------------------------------ webhook outbox

    def webhooks_due(self, now: float, limit: int = 50) -> list[WebhookRow]:
        with self._lock:
            rows = self._db.execute(
                "SELECT request_id, url, body, owner, attempts, next_at FROM webhooks "
                "WHERE state = 'pending' AND next_at <= ? ORDER BY next_at LIMIT ?",
                (now, limit),
            ).fetchall()
        return [WebhookRow(*r) for r in rows]

    def next_webhook_at(self) -> float | None:
        with self._lock:
            row = self._db.execute("SELECT MIN(next_at) FROM webhooks WHERE state = 'pending'").fetchone()
        return row[0]

    def webhook_attempted(self, request_id: str, attempts: int, state: str, next_at: float, error: str | None) -> None:
        with self._tx() as db:
            db.execute(
                "UPDATE webhooks SET attempts = ?, state = ?, next_at = ?, last_error = ? WHERE request_id = ?",
                (attempts, state, next_at, error, request_id),
            )

    def webhook_state(self, request_id: str) -> tuple[str, int, str | None] | None:
        with self._lock:
            row = self._db.execute(
                "SELECT state, attempts, last_error FROM webhooks WHERE request_id = ?", (request_id,)
            ).fetchone()
        return tuple(row) if row else None  # type: ignore[return-value]

    # ------------------------------------------------------------------ uploads

    def add_upload(self, upload: UploadRow) -> None:
        with self._tx() as db:
            db.execute(
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
        with self._lock:
            row = self._db.execute(
                "SELECT token, owner, file_name, content_type, size, created_at, expires_at FROM uploads "
                "WHERE token = ?",
                (token,),
            ).fetchone()
        return UploadRow(*row) if row else None

    def claim_upload(self, token: str) -> bool:
        """Mark an upload as being written (size -1); False if another PUT has it or it is done."""
        with self._tx() as db:
            cur = db.execute("UPDATE uploads SET size = -1 WHERE token = ? AND size IS NULL", (token,))
            return cur.rowcount == 1

    def release_upload(self, token: str) -> None:
        with self._tx() as db:
            db.execute("UPDATE uploads SET size = NULL WHERE token = ? AND size = -1", (token,))

    def set_upload_size(self, token: str, size: int) -> None:
        with self._tx() as db:
            db.execute("UPDATE uploads SET size = ? WHERE token = ?", (size, token))

    def expired_uploads(self, now: float, limit: int = 500) -> list[str]:
        with self._lock:
            rows = self._db.execute("SELECT token FROM uploads WHERE expires_at <= ? LIMIT ?", (now, limit)).fetchall()
        return [r[0] for r in rows]

    def delete_uploads(self, tokens: list[str]) -> None:
        with self._tx() as db:
            db.executemany("DELETE FROM uploads WHERE token = ?", [(t,) for t in tokens])


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
