"""The job store's conformance suite, run on both backends (SQLite and a real PostgreSQL): every persistent
field round-trips, queue order and position, the webhook outbox (claimed once), expiry, uploads, what a
reopened store still holds, the claim/lease protocol (also under concurrent claimers), nodes and their
liveness, shared keys, and the change feed that wakes other processes."""

from __future__ import annotations

import os
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest

from server.jobs.job import Job, JobState
from server.jobs.nodes import Sweeper
from server.jobs.store import open_store
from server.jobs.store.base import JobStore, NodeRow, UploadRow, WebhookRow, process_start, this_host
from server.jobs.store.sqlite import SqliteStore

INTEGRITY = (sqlite3.IntegrityError, psycopg.errors.IntegrityError)
Opener = Callable[[], JobStore]


@pytest.fixture(params=["sqlite", "postgresql"])
def opener(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Opener]:
    """Opens a store on this test's own database; every call is a new connection to the same data (another
    process, another node)."""
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path / 'db' / 'jobs.sqlite3'}"
    else:
        url = request.getfixturevalue("postgres").fresh_url()
    opened: list[JobStore] = []

    def open_one() -> JobStore:
        opened.append(open_store(url, tmp_path))
        return opened[-1]

    yield open_one
    for store in opened:
        store.close()


@pytest.fixture
def store(opener: Opener) -> JobStore:
    return opener()


def make_job(job_id: str, seq: int, priority: int = 0, state: JobState = JobState.QUEUED, **fields: Any) -> Job:
    return Job(
        id=job_id,
        app_id="fal-ai/hyper-sdxl/inpainting",
        endpoint="fal-ai/hyper-sdxl",
        owner="owner-1",
        input={"prompt": "a cat", "image_size": {"width": 64, "height": 48}, "embeddings": []},
        seed=2**32 - 1,
        created_at=1000.5,
        base_url="http://127.0.0.1:8000",
        seq=seq,
        priority=priority,
        state=state,
        **fields,
    )


def test_every_persistent_field_round_trips(store: JobStore) -> None:
    job = make_job(
        "job-all-fields",
        7,
        priority=1,
        state=JobState.FAILED,
        queue_prefix="/api/queue",
        attempts=2,
        sync=True,
        webhook_url="https://hooks.example/x?y=1",
        start_deadline=1010.25,
        started_at=1001.0,
        finished_at=1002.0,
        expires_at=2002.0,
        result={"images": [{"url": "u", "width": 64}], "seed": 3, "has_nsfw_concepts": [False]},
        error="image_url: not an image",
        error_type="invalid_input",
        error_body={"detail": [{"loc": ["body", "image_url"], "msg": "not an image"}]},
        http_status=422,
        inference_time=0.125,
        files=["0.png", "1.png"],
        no_retry=True,
        previews=True,
    )
    job.add_log("Request queued", when=1000.5)
    job.add_log("Step 1/2", "WARN", when=1001.5)
    job.waiter = "api-node#1"
    store.add(job)
    loaded = store.get(job.id, with_input=True)
    assert loaded == job
    assert loaded is not job and loaded.state is JobState.FAILED and loaded.sync is True
    light = store.get(job.id)  # what status polls read: everything but the (megabytes of) input
    assert light.input == {} and light.logs == job.logs and light.result == job.result


def test_missing_job_is_none_and_duplicate_id_is_refused(store: JobStore) -> None:
    assert store.get("nope") is None
    first = make_job("dup", 0)
    store.add(first)
    with pytest.raises(INTEGRITY):
        store.add(make_job("dup", 0))
    assert store.get("dup").seq == first.seq
    assert store.counts() == {"queued": 1}


def test_save_overwrites_and_unfinished_is_queue_order(store: JobStore) -> None:
    jobs = [
        make_job("a", 1),
        make_job("b", 2, priority=1),  # low priority: after every normal one
        make_job("c", 3, state=JobState.RUNNING),
        make_job("d", 4),
        make_job("e", 5, state=JobState.SUCCEEDED),
    ]
    for job in jobs:
        store.add(job)
    assert [j.id for j in store.unfinished()] == ["a", "c", "d", "b"]
    jobs[0].state = JobState.CANCELLED
    jobs[0].add_log("cancelled")
    store.save(jobs[0])
    assert store.get("a").state is JobState.CANCELLED and store.get("a").logs == jobs[0].logs
    assert [j.id for j in store.unfinished()] == ["c", "d", "b"]
    assert store.counts() == {"queued": 2, "running": 1, "succeeded": 1, "cancelled": 1}


def test_reopened_store_holds_everything_committed(opener: Opener) -> None:
    first = opener()
    job = make_job("persisted", 3, state=JobState.RUNNING, attempts=1)
    first.add(job)
    first.save(job, WebhookRow(job.id, "http://hook", b'{"a": 1}', job.owner, 0, 5.0))
    first.add_upload(UploadRow("tok-12345678", "o", "a.png", "image/png", None, 1.0, 9.0))
    # no close(): a crash leaves the connection open
    second = opener()
    assert second.get(job.id, with_input=True) == job
    assert [j.id for j in second.unfinished()] == [job.id]
    assert second.webhooks_due(10.0) == [WebhookRow(job.id, "http://hook", b'{"a": 1}', job.owner, 0, 5.0)]
    assert second.get_upload("tok-12345678") is not None
    second.add(make_job("after", 0))
    assert second.get("after").seq == job.seq + 1


def test_webhook_outbox_due_attempted_and_kept_while_pending(store: JobStore) -> None:
    for i, next_at in enumerate((30.0, 10.0, 20.0)):
        job = make_job(f"w{i}", i, state=JobState.SUCCEEDED, expires_at=100.0)
        store.add(job)
        store.save(job, WebhookRow(job.id, f"http://hook/{i}", b"{}", "", 0, next_at))
    assert store.webhooks_due(5.0) == []
    assert [r.request_id for r in store.webhooks_due(25.0)] == ["w1", "w2"]  # oldest due first
    assert store.next_webhook_at() == 10.0
    assert store.webhook_state("w1") == ("pending", 0, None)

    store.webhook_attempted("w1", 1, "pending", 40.0, "HTTP 500")
    assert store.webhook_state("w1") == ("pending", 1, "HTTP 500")
    assert [r.request_id for r in store.webhooks_due(25.0)] == ["w2"]
    store.webhook_attempted("w2", 1, "delivered", 21.0, None)
    store.webhook_attempted("w0", 10, "failed", 31.0, "HTTP 503")
    assert store.next_webhook_at() == 40.0
    assert [(r.request_id, r.attempts) for r in store.webhooks_due(1e9)] == [("w1", 1)]

    # Deleting expired jobs drops finished webhooks but keeps one still to deliver.
    store.delete(["w0", "w1", "w2"])
    assert store.webhook_state("w0") is None and store.webhook_state("w2") is None
    assert store.webhook_state("w1") == ("pending", 1, "HTTP 500")


def test_saving_a_webhook_again_resets_it(store: JobStore) -> None:
    job = make_job("again", 1, state=JobState.SUCCEEDED)
    store.add(job)
    store.save(job, WebhookRow(job.id, "http://hook", b"1", "", 0, 1.0))
    store.webhook_attempted(job.id, 3, "failed", 2.0, "HTTP 500")
    store.save(job, WebhookRow(job.id, "http://hook", b"2", "", 0, 3.0))
    assert store.webhook_state(job.id) == ("pending", 0, None)
    assert store.webhooks_due(3.0)[0].body == b"2"


def test_expired_returns_only_what_is_due(store: JobStore) -> None:
    store.add(make_job("old", 1, state=JobState.SUCCEEDED, expires_at=100.0))
    store.add(make_job("new", 2, state=JobState.SUCCEEDED, expires_at=200.0))
    store.add(make_job("live", 3))
    assert store.expired(99.9) == []
    assert [j.id for j in store.expired(100.0)] == ["old"]
    assert sorted(j.id for j in store.expired(1e9)) == ["new", "old"]
    assert len(store.expired(1e9, limit=1)) == 1
    store.delete(["old", "new"])
    assert store.expired(1e9) == [] and store.get("live") is not None


def test_recent_lists_an_owners_live_requests_newest_first(store: JobStore) -> None:
    store.add(make_job("first", 0, state=JobState.SUCCEEDED, started_at=1001.0, finished_at=1002.5, inference_time=1.5))
    store.add(make_job("gone", 0, state=JobState.SUCCEEDED, expires_at=500.0))
    theirs = make_job("theirs", 0)
    theirs.owner = "owner-2"
    store.add(theirs)
    store.add(make_job("last", 0, state=JobState.CANCELLED, error_type="cancelled"))
    rows = store.recent("owner-1", 10, now=1000.0)
    assert [r.id for r in rows] == ["last", "first"]  # arrival order, newest first; not expired, not another's
    assert rows[0].state is JobState.CANCELLED and rows[0].error_type == "cancelled"
    first = rows[1]
    assert (first.app_id, first.created_at, first.started_at, first.finished_at) == (
        "fal-ai/hyper-sdxl/inpainting",
        1000.5,
        1001.0,
        1002.5,
    )
    assert first.inference_time == 1.5
    assert [r.id for r in store.recent("owner-1", 1, now=1000.0)] == ["last"]
    assert [r.id for r in store.recent("owner-2", 10, now=1000.0)] == ["theirs"]


def test_uploads_round_trip_and_expire(store: JobStore) -> None:
    row = UploadRow("tok-aaaaaaaa", "owner", "photo.png", "image/png", None, 10.0, 20.0)
    parts = UploadRow("tok-bbbbbbbb", "owner", "big.bin", "application/octet-stream", None, 10.0, 50.0, 5.0, "m", "r")
    store.add_upload(row)
    store.add_upload(parts)
    assert store.get_upload(row.token) == row and store.get_upload(parts.token) == parts
    store.set_upload_size(row.token, 1234)
    assert store.get_upload(row.token).size == 1234
    assert store.expired_uploads(19.9) == []
    assert store.expired_uploads(20.0) == [store.get_upload(row.token)]
    store.set_upload_size(parts.token, 99, expires_at=15.0)  # stored: its own lifetime from now on
    assert sorted(r.token for r in store.expired_uploads(20.0)) == [row.token, parts.token]
    store.delete_uploads([row.token, parts.token])
    assert store.get_upload(row.token) is None and store.get_upload("missing") is None


def test_files_with_a_lifecycle_of_their_own_expire_before_the_request(store: JobStore) -> None:
    job = make_job("short-files", 1)
    store.add(job)
    job.state, job.files, job.expires_at, job.files_expire_at = JobState.SUCCEEDED, ["0.jpeg"], 100.0, 30.0
    assert store.save(job)
    assert store.expired_files(29.9) == [] and store.expired_files(30.0) == ["short-files"]
    store.forget_files(["short-files"])
    kept = store.get("short-files")
    assert (kept.files, kept.files_expire_at, kept.expires_at) == ([], None, 100.0)
    assert store.expired_files(1e9) == []


def test_a_failed_transaction_leaves_nothing_behind(store: JobStore) -> None:
    """A job's terminal state and its webhook are written together or not at all."""
    job = make_job("atomic", 1)
    store.add(job)
    job.state = JobState.SUCCEEDED
    bad_hook = WebhookRow(job.id, None, b"{}", "", 0, 1.0)  # type: ignore[arg-type]  # url NOT NULL
    with pytest.raises(INTEGRITY):
        store.save(job, bad_hook)
    assert store.get(job.id).state is JobState.QUEUED
    assert store.webhook_state(job.id) is None
    store.save(job)  # the connection is usable afterwards
    assert store.get(job.id).state is JobState.SUCCEEDED


# ---------------------------------------------------------------------- claims and leases


def queued(store: JobStore, specs: list[tuple[str, str, int]], priority: int = 0, start: int = 1) -> None:
    """Add queued jobs given as (id, batch key, rows), in arrival order."""
    for offset, (job_id, key, rows) in enumerate(specs):
        store.add(make_job(job_id, start + offset, priority=priority, batch_key=key, rows=rows))


def test_arrival_numbers_are_unique_and_ordered_across_nodes(opener: Opener) -> None:
    node_a, node_b = opener(), opener()
    for i in range(6):
        (node_a if i % 2 else node_b).add(make_job(f"n{i}", 0))
    assert [node_a.get(f"n{i}").seq for i in range(6)] == [1, 2, 3, 4, 5, 6]


def test_queue_head_is_priority_then_arrival_without_cancelled_jobs(store: JobStore) -> None:
    queued(store, [("low", "k", 1)], priority=1)
    queued(store, [("a", "k", 2), ("gone", "j", 1), ("b", "j", 4)], start=2)
    store.add(make_job("deadline", 0, batch_key="k", start_deadline=50.0))
    assert store.request_cancel("gone") and store.cancel_requested(["gone", "a", "low"]) == {"gone"}
    head = store.queue_head(10)
    assert [r.id for r in head] == ["a", "b", "deadline", "low"]
    assert (head[0].batch_key, head[0].rows, head[1].rows, head[2].start_deadline) == ("k", 2, 4, 50.0)
    assert [r.id for r in store.queue_head(2)] == ["a", "b"]
    assert store.queued_count() == 5  # the flagged job is still queued until a sweeper cancels it
    assert not store.request_cancel("missing")


def test_claim_takes_only_what_is_still_claimable(store: JobStore) -> None:
    queued(store, [("a", "k", 2), ("b", "k", 1), ("taken", "k", 1), ("gone", "k", 1), ("late", "k", 1)])
    late = store.get("late")
    late.start_deadline = 100.0
    assert store.save(late, queued=True)
    assert [j.id for j in store.claim("other", ["taken"], 90.0, 30.0)] == ["taken"]
    store.request_cancel("gone")
    claimed = store.claim("w1", ["b", "a", "taken", "gone", "late", "missing"], 100.0, 30.0, "Claimed ({n} jobs)")
    assert [j.id for j in claimed] == ["a", "b"]  # queue order; late is past its deadline at 100.0
    for job in claimed:
        assert job.state is JobState.RUNNING and job.worker == "w1" and job.lease_until == 130.0
        assert job.attempts == 1 and job.started_at == 100.0 and job.logs[-1]["message"] == "Claimed (2 jobs)"
        assert store.get(job.id) == job and store.versions([job.id]) == {job.id: job.version}
    assert store.get("taken").worker == "other"
    assert store.claim("w2", ["a", "b"], 100.0, 30.0) == []  # never twice
    assert store.holders() == {"w1", "other"}


def test_a_write_conditioned_on_state_or_lease_fails_when_the_row_moved_on(store: JobStore) -> None:
    queued(store, [("q", "k", 1)])
    stale = store.get("q")
    store.claim("w", ["q"], 1.0, 5.0)
    stale.state = JobState.CANCELLED
    assert not store.save(stale, queued=True)  # a cancel that raced a claim: the claim won
    running = store.get("q")
    assert not store.save(running, holder="someone-else")
    assert not store.save(running, lost=("w", 99.0))  # the lease moved on: not the one the sweeper saw
    running.add_log("still mine")
    assert store.save(running, holder="w")
    assert store.get("q").logs[-1]["message"] == "still mine"


def test_a_running_job_keeps_only_its_newest_preview_and_loses_it_when_it_ends(opener: Opener) -> None:
    store, other_node = opener(), opener()
    queued(store, [("p", "k", 1), ("q", "k", 1)])
    p, q = store.claim("w", ["p", "q"], 1.0, 30.0)
    assert store.preview("p") is None
    p.add_log("Step 1/2")
    store.progress("w", [p, q], {"p": {"step": 1, "previews": ["a"]}})
    assert other_node.preview("p") == {"step": 1, "previews": ["a"]} and other_node.preview("q") is None
    assert other_node.get("p").logs[-1]["message"] == "Step 1/2"
    store.progress("w", [p], {"p": {"step": 2, "previews": ["b"]}})
    store.progress("w", [p])  # logs only: the preview stays
    assert other_node.preview("p") == {"step": 2, "previews": ["b"]}
    store.progress("someone-else", [q], {"q": {"step": 1}})  # not the holder: nothing is written
    assert store.preview("q") is None
    p.state = JobState.SUCCEEDED
    assert store.save(p, holder="w")
    assert other_node.preview("p") is None  # dropped with the terminal write


def test_queue_position_comes_from_the_store(opener: Opener) -> None:
    node_a, node_b = opener(), opener()
    assert node_b.queued_totals() == (0, 0)
    queued(node_a, [("a", "k", 1), ("b", "k", 1), ("c", "k", 4)])
    queued(node_a, [("low", "k", 1)], priority=1, start=4)
    assert [node_b.position(i) for i in ("a", "b", "c", "low")] == [0, 1, 2, 3]
    assert node_b.queued_totals() == (4, 7)  # requests and image rows: what the queue's bound counts
    node_a.claim("w", ["a"], 1.0, 5.0)
    assert [node_b.position(i) for i in ("a", "b", "c", "low")] == [None, 0, 1, 2]
    assert node_b.queued_totals() == (3, 6)
    assert node_b.position("missing") is None


def test_renew_keeps_a_live_worker_and_a_lost_lease_is_taken_back_once(opener: Opener) -> None:
    store, other_node = opener(), opener()
    queued(store, [("slow", "k", 1), ("dead", "j", 1)])
    (slow,) = store.claim("live-worker", ["slow"], now=0.0, lease_s=10.0)
    (dead,) = store.claim("dead-worker", ["dead"], now=0.0, lease_s=10.0)
    assert store.renew("live-worker", ["slow", "dead"], now=8.0, lease_s=10.0) == {"slow"}  # not the other's job
    assert [j.id for j in other_node.lost_leases(now=12.0)] == ["dead"]  # slow was renewed to 18
    assert [j.id for j in other_node.lost_leases(now=1.0, dead=["dead-worker"])] == ["dead"]  # known dead: at once
    job = other_node.lost_leases(now=12.0)[0]
    seen_lease = job.lease_until
    job.state, job.worker, job.lease_until = JobState.QUEUED, None, None
    job.add_log("Interrupted: its worker stopped; running again (attempt 2)", "WARN")
    assert other_node.save(job, lost=("dead-worker", seen_lease))
    assert not store.save(job, lost=("dead-worker", seen_lease))  # once only
    requeued = store.get("dead")
    assert requeued.state is JobState.QUEUED and requeued.worker is None and requeued.attempts == 1
    assert requeued.logs[-1]["message"].startswith("Interrupted")
    # The dead worker comes back: its lease is gone, so it can neither renew nor finish the job.
    assert store.renew("dead-worker", ["dead"], now=13.0, lease_s=10.0) == set()
    dead.state = JobState.SUCCEEDED
    assert not store.save(dead, holder="dead-worker")
    assert store.get("dead").state is JobState.QUEUED
    (again,) = store.claim("second-worker", ["dead"], now=13.0, lease_s=10.0)
    assert again.attempts == 2 and again.seed == dead.seed
    # The live worker finishes its own job, with the webhook, in one write.
    slow.state = JobState.SUCCEEDED
    assert store.save(slow, WebhookRow("slow", "http://hook", b"{}", "", 0, 1.0), holder="live-worker")
    assert store.get("slow").state is JobState.SUCCEEDED and store.webhook_state("slow") == ("pending", 0, None)
    assert [j.id for j in other_node.lost_leases(now=1e9)] == ["dead"]


def test_a_job_left_running_without_a_lease_is_taken_back_once(store: JobStore) -> None:
    """A store written before leases: running rows with no holder and no lease."""
    store.add(make_job("old", 0, state=JobState.RUNNING, attempts=1))
    (job,) = store.lost_leases(now=0.0)
    job.state = JobState.QUEUED
    assert not store.save(job, lost=("someone", None)) and store.save(job, lost=(None, None))
    assert not store.save(job, lost=(None, None)) and store.lost_leases(now=1e9) == []


def _claim_a_batch(store: JobStore, name: str, max_rows: int = 8) -> list[Job]:
    """What a worker does: read the head, take the first job's batch-mates up to the rows, claim them."""
    head = store.queue_head(32)
    if not head:
        return []
    key, ids, rows = head[0].batch_key, [], 0
    for ref in head:
        if ref.batch_key == key and rows + ref.rows <= max_rows:
            ids.append(ref.id)
            rows += ref.rows
    return store.claim(name, ids, now=1.0, lease_s=60.0) or [Job.__new__(Job)]  # lost a race: look again


def test_concurrent_claimers_never_take_the_same_job(opener: Opener) -> None:
    """Four workers, each with its own connection, claim 120 jobs of three batch keys at once."""
    setup = opener()
    keys = ["a", "b", "c"]
    queued(setup, [(f"j{i:03d}", keys[i % 3], 1 + i % 2) for i in range(120)])
    workers = [opener() for _ in range(4)]
    taken: dict[str, list[str]] = {f"w{i}": [] for i in range(4)}
    errors: list[BaseException] = []

    def work(name: str, store: JobStore) -> None:
        try:
            while batch := _claim_a_batch(store, name):
                batch = [j for j in batch if hasattr(j, "id")]
                assert len({j.batch_key for j in batch}) <= 1 and sum(j.rows for j in batch) <= 8
                taken[name].extend(j.id for j in batch)
        except BaseException as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(f"w{i}", s)) for i, s in enumerate(workers)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert not errors, errors
    claimed = [job_id for ids in taken.values() for job_id in ids]
    assert sorted(claimed) == [f"j{i:03d}" for i in range(120)]  # every job once, none twice
    assert setup.counts() == {"running": 120}
    assert all(setup.get(job_id).worker == name for name, ids in taken.items() for job_id in ids)


# ---------------------------------------------------------------------- nodes, keys, the change feed


def node_row(node_id: str, heartbeat_at: float, pid: int | None = None, host: str | None = None) -> NodeRow:
    pid = os.getpid() if pid is None else pid
    return NodeRow(
        node_id, node_id.split("#")[0], "worker", host or this_host(), pid, process_start(pid), "cpu", 1.0,
        heartbeat_at, "ready", {"batches": 1},
    )  # fmt: skip


def test_nodes_register_heartbeat_and_are_found_dead_by_any_node(opener: Opener) -> None:
    mine, other_node = opener(), opener()
    live = node_row("live#1", heartbeat_at=100.0)
    mine.register_node(live)
    mine.register_node(node_row("stale#1", heartbeat_at=50.0, host="elsewhere"))
    mine.register_node(node_row("exited#1", heartbeat_at=100.0, pid=2**22 + 12345))  # no such process here
    live.heartbeat_at, live.state, live.stats = 110.0, "busy", {"batches": 2}
    assert mine.heartbeat(live)
    (row,) = [n for n in other_node.nodes() if n.id == "live#1"]
    assert (row.heartbeat_at, row.state, row.stats, row.is_worker) == (110.0, "busy", {"batches": 2}, True)
    ids = ["live#1", "stale#1", "exited#1", "never#1"]
    assert other_node.dead_nodes(ids, now=115.0, stale_s=30.0) == {"stale#1", "exited#1", "never#1"}
    other_node.remove_nodes(["stale#1", "exited#1"])
    assert sorted(n.id for n in mine.nodes()) == ["live#1"]
    assert not mine.heartbeat(node_row("stale#1", 120.0))  # taken for dead: it must register again


def test_a_dead_sqlite_node_is_known_at_once_by_its_lock_file(tmp_path: Path) -> None:
    """On one host, SQLite nodes hold a lock file while they live: a crash frees it with no heartbeat wait."""
    path = tmp_path / "jobs.sqlite3"
    crashed, watcher = SqliteStore(path), SqliteStore(path)
    try:
        crashed.register_node(node_row("w#1", heartbeat_at=100.0))
        assert watcher.dead_nodes(["w#1"], now=100.0, stale_s=30.0) == set()
        os.close(crashed._held.pop("w#1"))  # what the kernel does when the process dies
        assert watcher.dead_nodes(["w#1"], now=100.0, stale_s=30.0) == {"w#1"}
    finally:
        crashed.close()
        watcher.close()


def test_counters_are_shared_and_kept(opener: Opener) -> None:
    node_a, node_b = opener(), opener()
    assert node_a.counter("worker_milli_rows_per_s") is None
    node_a.set_counter("worker_milli_rows_per_s", 9500)
    node_b.set_counter("worker_milli_rows_per_s", 10250)
    assert node_a.counter("worker_milli_rows_per_s") == 10250 and opener().counter("worker_milli_rows_per_s") == 10250


def test_shared_keys_are_made_once_for_every_node(opener: Opener) -> None:
    node_a, node_b = opener(), opener()
    made: list[bytes] = []

    def make() -> bytes:
        made.append(os.urandom(32))
        return made[-1]

    key = node_a.shared_key("uploads", make)
    assert node_b.shared_key("uploads", make) == key == made[0] and len(made) == 1
    assert node_b.shared_key("webhooks", make) != key


def test_other_nodes_hear_of_every_committed_change(opener: Opener) -> None:
    writer, reader = opener(), opener()
    heard = threading.Event()
    reader.subscribe(heard.set)
    time.sleep(0.3)  # the feed is up
    queued(writer, [("x", "k", 1)])
    assert heard.wait(5), "a new job did not wake the other node"
    heard.clear()
    before = reader.versions(["x", "missing"])
    writer.request_cancel("x")
    assert heard.wait(5), "a cancel flag did not wake the other node"
    assert reader.versions(["x"])["x"] > before["x"] and "missing" not in before
    reader.unsubscribe(heard.set)


def test_webhook_claims_of_a_gone_node_are_released(opener: Opener) -> None:
    node_a, node_b = opener(), opener()
    job = make_job("hooked", 1, state=JobState.SUCCEEDED)
    node_a.add(job)
    node_a.save(job, WebhookRow(job.id, "http://hook", b"{}", "", 0, 5.0))
    assert len(node_a.webhooks_due(10.0, claimant="api-a", lease_s=300.0)) == 1
    assert node_b.webhook_claimants(20.0) == {"api-a"}
    assert node_b.release_webhooks(["api-a"]) == 1
    assert [r.request_id for r in node_b.webhooks_due(20.0, claimant="api-b")] == ["hooked"]


def test_a_webhook_is_claimed_by_one_node_at_a_time(opener: Opener) -> None:
    node_a, node_b = opener(), opener()
    job = make_job("hooked", 1, state=JobState.SUCCEEDED)
    node_a.add(job)
    node_a.save(job, WebhookRow(job.id, "http://hook", b"{}", "", 0, 5.0))
    assert [r.request_id for r in node_a.webhooks_due(10.0, claimant="api-a", lease_s=30.0)] == ["hooked"]
    assert node_b.webhooks_due(20.0, claimant="api-b", lease_s=30.0) == []  # a holds it
    assert [r.request_id for r in node_b.webhooks_due(41.0, claimant="api-b")] == ["hooked"]  # a's claim ran out
    node_b.webhook_attempted("hooked", 1, "delivered", 41.0, None)
    assert node_a.webhooks_due(1e9, claimant="api-a") == []


def test_an_older_sqlite_store_gets_the_new_columns(tmp_path: Path) -> None:
    """A store written before claims existed opens, and its queued jobs can be claimed."""
    path = tmp_path / "old.sqlite3"
    db = sqlite3.connect(path)
    db.executescript(
        "CREATE TABLE jobs (id TEXT PRIMARY KEY, seq INTEGER NOT NULL, app_id TEXT NOT NULL, endpoint TEXT NOT NULL,"
        " owner TEXT NOT NULL, state TEXT NOT NULL, priority INTEGER NOT NULL, input TEXT NOT NULL, seed INTEGER NOT"
        " NULL, attempts INTEGER NOT NULL, sync INTEGER NOT NULL, base_url TEXT NOT NULL, queue_prefix TEXT NOT NULL,"
        " webhook_url TEXT, start_deadline REAL, created_at REAL NOT NULL, started_at REAL, finished_at REAL,"
        " expires_at REAL, result TEXT, error TEXT, error_type TEXT, error_body TEXT, http_status INTEGER NOT NULL,"
        " logs TEXT NOT NULL, inference_time REAL, files TEXT NOT NULL, cancel_requested INTEGER NOT NULL DEFAULT 0);"
        " CREATE TABLE webhooks (request_id TEXT PRIMARY KEY, url TEXT NOT NULL, body BLOB NOT NULL, owner TEXT NOT"
        " NULL, attempts INTEGER NOT NULL DEFAULT 0, next_at REAL NOT NULL, state TEXT NOT NULL DEFAULT 'pending',"
        " last_error TEXT);"
        " INSERT INTO jobs VALUES ('old', 1, 'fal-ai/hyper-sdxl/inpainting', 'fal-ai/hyper-sdxl', 'o', 'queued', 0,"
        " '{}', 5, 0, 0, 'http://h', '/queue', NULL, NULL, 1.0, NULL, NULL, NULL, NULL, NULL, NULL, NULL, 200, '[]',"
        " NULL, '[]', 0);"
    )
    db.commit()
    db.close()
    store = SqliteStore(path)
    try:
        (ref,) = store.queue_head(8)
        assert ref.id == "old" and ref.batch_key == "" and ref.rows == 1
        (job,) = store.claim("w", ["old"], 2.0, 5.0)
        assert job.worker == "w" and job.attempts == 1 and job.no_retry is False
        store.add(make_job("new", 0))
        assert store.get("new").seq == 2  # the arrival counter starts past the old rows
    finally:
        store.close()


def test_submitted_jobs_carry_the_batch_key_and_rows_the_claim_uses() -> None:
    """Requests that may share a batch get equal keys from their JSON; textual inversions run alone."""
    from server.inputs.input_fetch import batch_key_of, rows_of

    base = {"num_inference_steps": "4", "strength": 0.95, "image_size": "square_hd", "num_images": 2}
    lightning = "fal-ai/fast-lightning-sdxl/inpainting"
    same = batch_key_of(lightning, {**base, "image_size": {"width": 1024, "height": 1024}}, "b")
    assert batch_key_of(lightning, base, "a") == same
    others = [
        batch_key_of(lightning, {**base, "num_inference_steps": "2"}, "a"),
        batch_key_of(lightning, {**base, "strength": 0.5}, "a"),
        batch_key_of(lightning, {**base, "image_size": "square"}, "a"),
        batch_key_of("fal-ai/hyper-sdxl/inpainting", base, "a"),
    ]
    assert len({same, *others}) == 5
    with_ti = {**base, "embeddings": [{"path": "https://x/ti.safetensors"}]}
    assert batch_key_of(lightning, with_ti, "a") != batch_key_of(lightning, with_ti, "b")
    assert [rows_of(base), rows_of({}), rows_of({"num_images": "x"})] == [2, 1, 1]


def test_a_cancel_left_half_done_is_finished_by_the_sweeper(opener: Opener) -> None:
    """The cancel flag was written, the cancelled state was not (a full disk between the two writes): no worker
    takes the job, so the sweeper cancels it."""
    store = opener()
    store.add(make_job("flagged", 1))
    store.add(make_job("other", 2))
    assert store.request_cancel("flagged")
    assert [job.id for job in store.cancelled_queued()] == ["flagged"]
    written: list[Job] = []
    sweeper = Sweeper(store, 30.0, 2, 60.0, lambda: 2000.0, written.append)
    assert sweeper.sweep() == 1
    job = store.get("flagged")
    assert (job.state, job.error_type, job.http_status) == (JobState.CANCELLED, "cancelled", 499)
    assert job.expires_at == 2060.0
    assert [job.id for job in written] == ["flagged"] and store.cancelled_queued() == []
    assert store.get("other").state is JobState.QUEUED
