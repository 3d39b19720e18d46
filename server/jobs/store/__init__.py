"""The job store: one interface (:mod:`.base`), SQLite (the default, :mod:`.sqlite`) and PostgreSQL
(:mod:`.postgres`) backends, and :func:`open_store` to pick one from ``--store``."""

from __future__ import annotations

from pathlib import Path

from .base import JobStore, NodeRow, QueuedRef, RequestSummary, StoreFull, StoreUnavailable, UploadRow, WebhookRow
from .sqlite import SqliteStore

__all__ = [
    "JobStore",
    "NodeRow",
    "QueuedRef",
    "RequestSummary",
    "SqliteStore",
    "StoreFull",
    "StoreUnavailable",
    "UploadRow",
    "WebhookRow",
    "open_store",
]


def open_store(url: str | None, data_dir: Path) -> JobStore:
    """The store a ``--store`` value names: None or ``sqlite:///PATH`` (default ``DATA_DIR/jobs.sqlite3``),
    or ``postgresql://...`` (``pip install 'inpaint-server[postgres]'``)."""
    if not url:
        return SqliteStore(data_dir / "jobs.sqlite3")
    if url.startswith("sqlite:///"):
        return SqliteStore(Path(url.removeprefix("sqlite:///")))
    if url.startswith(("postgresql://", "postgres://")):
        from .postgres import PostgresStore

        return PostgresStore(url)
    raise ValueError(f"unknown store {url!r}: expected sqlite:///PATH or postgresql://...")
