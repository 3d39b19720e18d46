"""The queue's bound (server/jobs/queue_bound.py): the image rows the live GPU workers can finish within
``queue_max_wait_s`` at their measured throughput (assumed before a worker is measured), and a hard cap of
``max_queue_size`` requests; a refusal is a 429 ``queue_full`` saying why, with a Retry-After that says when
room comes, decided on totals read from the store just then."""

from __future__ import annotations

import uuid
from dataclasses import replace
from pathlib import Path

import pytest

from server.http.errors import TooManyRequests
from server.jobs.job import Job
from server.jobs.queue_bound import MIN_MEASURED_ROWS, RATE_REFRESH_S, QueueBound, throughput
from server.jobs.store.base import NodeRow
from server.jobs.store.sqlite import SqliteStore
from server.settings import load_settings

NOW = 10_000.0
LEASE_S = 30.0


def node(name: str, kind: str = "worker", rows: int = 0, busy_s: float = 0.0, **fields: object) -> NodeRow:
    row = NodeRow(f"{name}#1", name, kind, "host", 1, 0, "cuda:0", NOW - 100, NOW - 1, "ready")
    row.stats = {"rows": rows, "busy_s": busy_s, "batches": 1, "requests": rows, "sizes": {}}
    return replace(row, **fields)


def test_throughput_is_each_live_worker_measured_or_assumed() -> None:
    assumed = 0.5
    none = throughput([], NOW, LEASE_S, assumed)
    assert (none.rows_per_s, none.workers, none.measured) == (0.5, 0, 0)  # nobody alive: one worker assumed

    fresh = node("fresh", rows=MIN_MEASURED_ROWS - 1, busy_s=0.1)  # too little run to be measured
    assert throughput([fresh], NOW, LEASE_S, assumed).rows_per_s == 0.5
    fast = node("fast", rows=400, busy_s=40.0)  # 10 rows per busy second
    both = throughput([fast, fresh], NOW, LEASE_S, assumed)
    assert (both.rows_per_s, both.workers, both.measured) == (10.5, 2, 1)
    assert both.describe() == "10.50 image rows/s (measured/assumed) on 2 GPU worker(s)"

    not_counted = [
        node("api", kind="api", rows=400, busy_s=1.0),  # no GPU
        node("gone", rows=400, busy_s=1.0, heartbeat_at=NOW - LEASE_S - 1),
        node("broken", rows=400, busy_s=1.0, state="gpu_fault"),
        node("failed", rows=400, busy_s=1.0, state="failed"),
    ]
    assert throughput([fast, *not_counted], NOW, LEASE_S, assumed).rows_per_s == 10.0
    loading = node("loading", state="loading")  # models loading: it will take work, at the assumed rate
    assert throughput([fast, loading], NOW, LEASE_S, assumed).rows_per_s == 10.5
    leaving = node("leaving", rows=400, busy_s=40.0, state="draining")  # a deploy: it runs the queue once back
    assert throughput([fast, leaving], NOW, LEASE_S, assumed).rows_per_s == 20.0


class Clocks:
    def __init__(self) -> None:
        self.mono = 0.0

    def monotonic(self) -> float:
        return self.mono

    @staticmethod
    def wall() -> float:
        return NOW


@pytest.fixture
def store(tmp_path: Path):
    store = SqliteStore(tmp_path / "jobs.sqlite3")
    yield store
    store.close()


def queue(store: SqliteStore, rows: int) -> None:
    job_id = str(uuid.uuid4())
    store.add(Job(job_id, "fal-ai/hyper-sdxl/inpainting", "fal-ai/hyper-sdxl", "", {}, 1, NOW, "http://h", rows=rows))


def bound_for(store: SqliteStore, tmp_path: Path, workers: list[NodeRow], **settings: object):
    clocks = Clocks()
    reads: list[int] = []
    read_totals = store.queued_totals

    def counted() -> tuple[int, int]:
        reads.append(1)
        return read_totals()

    store.queued_totals = counted  # type: ignore[method-assign]
    config = load_settings({"data_dir": tmp_path, "lease_s": LEASE_S, **settings})
    bound = QueueBound(store, config, lambda: workers, clocks.wall, clocks.monotonic)
    return bound, clocks, reads


def submit(store: SqliteStore, bound: QueueBound, rows: int) -> None:
    bound.admit(rows)
    queue(store, rows)
    bound.added(rows)


def test_the_bound_is_the_work_the_workers_finish_in_queue_max_wait_s(store: SqliteStore, tmp_path: Path) -> None:
    workers = [node("gpu0")]  # unmeasured: 2 rows/s assumed, so 10 s of work is 20 rows
    bound, clocks, reads = bound_for(store, tmp_path, workers, queue_max_wait_s=10, queue_assumed_rows_per_s=2)
    for _ in range(5):
        submit(store, bound, 4)
    assert (bound.requests, bound.rows) == (5, 20)  # read once, then this node's own submits added
    with pytest.raises(TooManyRequests) as refused:
        bound.admit(1)
    error = refused.value
    assert (error.status, error.error_type) == (429, "queue_full")
    assert error.headers["Retry-After"] == "1"  # one more row fits once the GPU has finished half a second
    assert error.detail == (
        "the queue is full: the 20 image rows waiting take about 10 s at 2.00 image rows/s (assumed) on 1 GPU "
        "worker(s), and this server queues at most 10 s of work (queue_max_wait_s); this request adds 1; "
        "retry in about 1 s"
    )
    with pytest.raises(TooManyRequests) as bigger:
        bound.admit(8)
    assert bigger.value.headers["Retry-After"] == "4"  # 8 rows over the bound at 2 rows/s

    # The worker is measured at 6 rows/s: from the next look at the workers on, the bound is 60 rows.
    workers[0] = node("gpu0", rows=600, busy_s=100.0)
    clocks.mono += RATE_REFRESH_S
    bound.admit(40)
    with pytest.raises(TooManyRequests) as measured:
        bound.admit(41)
    assert "6.00 image rows/s (measured) on 1 GPU worker(s)" in measured.value.detail
    assert len(reads) == 5  # each refusal read the store again first (submits in the same second did not)


def test_a_restart_keeps_the_measured_throughput_of_a_worker(store: SqliteStore, tmp_path: Path) -> None:
    """Workers restarting (none alive, or loading their models): the queue is still bounded by what one worker
    was last measured to do (kept in the store, so a restarted API node knows it too), not by the low
    assumed rate."""
    workers = [node("gpu0", rows=1000, busy_s=100.0)]  # 10 rows/s: 100 rows in 10 s
    bound, clocks, _ = bound_for(store, tmp_path, workers, queue_max_wait_s=10, queue_assumed_rows_per_s=1)
    submit(store, bound, 8)
    workers.clear()
    clocks.mono += RATE_REFRESH_S
    submit(store, bound, 80)
    with pytest.raises(TooManyRequests) as refused:
        bound.admit(13)
    assert "10.00 image rows/s (assumed: no GPU worker is alive)" in refused.value.detail

    workers[:] = [node("gpu0", state="loading"), node("gpu1", state="loading")]  # both restarted: 20 rows/s
    restarted, _, _ = bound_for(store, tmp_path, workers, queue_max_wait_s=10, queue_assumed_rows_per_s=1)
    submit(store, restarted, 100)
    with pytest.raises(TooManyRequests) as again:
        restarted.admit(13)
    assert "20.00 image rows/s (assumed) on 2 GPU worker(s)" in again.value.detail


def test_an_empty_queue_takes_any_request(store: SqliteStore, tmp_path: Path) -> None:
    """A request bigger than the whole bound would never fit: 429 (retried by clients) would be a lie."""
    bound, _, _ = bound_for(store, tmp_path, [], queue_max_wait_s=1, queue_assumed_rows_per_s=1)
    submit(store, bound, 8)
    with pytest.raises(TooManyRequests):
        bound.admit(1)


def test_a_refusal_is_decided_on_fresh_totals(store: SqliteStore, tmp_path: Path) -> None:
    bound, clocks, reads = bound_for(store, tmp_path, [], queue_max_wait_s=4, queue_assumed_rows_per_s=1)
    for _ in range(4):
        submit(store, bound, 1)
    assert len(reads) == 1  # one read for four submits within a second
    store.delete([job.id for job in store.unfinished()[:2]])  # two leave the queue (run, cancelled) meanwhile
    submit(store, bound, 1)  # the cached totals say full; the store says there is room
    submit(store, bound, 1)
    with pytest.raises(TooManyRequests):
        bound.admit(1)
    clocks.mono += 1.0
    with pytest.raises(TooManyRequests):
        bound.admit(1)
    assert len(reads) == 4


def test_max_queue_size_is_a_hard_cap_on_requests(store: SqliteStore, tmp_path: Path) -> None:
    bound, _, _ = bound_for(store, tmp_path, [node("gpu0", rows=10_000, busy_s=10)], max_queue_size=3)
    for _ in range(3):
        submit(store, bound, 1)
    with pytest.raises(TooManyRequests) as refused:
        bound.admit(1)
    assert refused.value.error_type == "queue_full"
    assert "3 requests are waiting, the most this server queues (max_queue_size)" in refused.value.detail
    assert refused.value.headers["Retry-After"] == "1"
