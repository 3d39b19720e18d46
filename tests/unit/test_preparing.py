"""Preparing a queued job while the job store is unreachable: the preparation waits for the store and then
succeeds; the outage never becomes the job's result nor a task that raises each time the worker asks for it
(which kept a PostgreSQL cluster's queue stuck after a restart)."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

from server.delivery.file_store import LocalFileStore
from server.inputs.input_fetch import InputFetcher
from server.jobs import preparing
from server.jobs.job import Job
from server.jobs.leases import Leases
from server.jobs.preparing import JobPreparer
from server.jobs.store import JobStore, StoreUnavailable, open_store
from server.metrics import Metrics
from tests.api.fal_wire import LIGHTNING, inpaint_input


class OutageLeases(Leases):
    """The worker's leases on a real SQLite store, whose first ``down`` reads fail as an unreachable store's do."""

    def __init__(self, store: JobStore, down: int) -> None:
        super().__init__(store, "w1#1", 30.0, 600.0, time.time, Metrics())
        self.down = down
        self.reads = 0

    def load(self, job_id: str) -> Job | None:
        self.reads += 1
        if self.reads <= self.down:
            raise StoreUnavailable("PostgreSQL is unavailable: couldn't get a connection after 1.00 sec")
        return super().load(job_id)


def queued_job(job_id: str) -> Job:
    data = inpaint_input(num_inference_steps=4, strength=0.9, num_images=1, embeddings=[])
    data |= {"enable_safety_checker": False, "expand_prompt": False}
    return Job(
        id=job_id,
        app_id=LIGHTNING,
        endpoint="fal-ai/fast-lightning-sdxl",
        owner="owner-1",
        input=data,
        seed=7,
        created_at=1000.0,
        base_url="http://127.0.0.1:8000",
        seq=1,
    )


def test_a_store_outage_delays_the_preparation_and_never_fails_it(
    engine: Any, tmp_path: Path, monkeypatch: Any, caplog: Any
) -> None:
    monkeypatch.setattr(preparing, "STORE_RETRY_S", 0.01)
    store = open_store(f"sqlite:///{tmp_path / 'jobs.sqlite3'}", tmp_path)
    try:
        store.add(queued_job("job-1"))
        source = OutageLeases(store, down=3)
        fetcher = InputFetcher(LocalFileStore(tmp_path), max_bytes=10_000_000, timeout_s=5)
        preparer = JobPreparer(source, fetcher, max_image_pixels=4_000_000)

        prepared = asyncio.run(preparer.prepare(engine, "job-1"))
    finally:
        store.close()

    assert source.reads == 4
    assert prepared.error is None, prepared.error
    assert prepared.job is not None and prepared.job.id == "job-1" and prepared.rows == 1
    assert prepared.key == engine.batch_key(prepared.prepared)
    waits = [r.getMessage() for r in caplog.records if "waits for the job store" in r.getMessage()]
    assert len(waits) == 3 and "couldn't get a connection" in waits[0]
