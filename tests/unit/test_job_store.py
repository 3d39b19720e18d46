"""server.store.JobStore: every persistent field round-trips, queue order, the webhook outbox, expiry,
uploads, and what a reopened file still holds."""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from server.jobs import Job, JobState
from server.store import JobStore, UploadRow, WebhookRow


@pytest.fixture
def store(tmp_path: Path) -> Iterator[JobStore]:
    store = JobStore(tmp_path / "db" / "jobs.sqlite3")
    yield store
    store.close()


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
    )
    job.add_log("Request queued", when=1000.5)
    job.add_log("Step 1/2", "WARN", when=1001.5)
    store.add(job)
    loaded = store.get(job.id)
    assert loaded == job
    assert loaded is not job and loaded.state is JobState.FAILED and loaded.sync is True


def test_missing_job_is_none_and_duplicate_id_is_refused(store: JobStore) -> None:
    assert store.get("nope") is None
    store.add(make_job("dup", 1))
    with pytest.raises(sqlite3.IntegrityError):
        store.add(make_job("dup", 2))
    assert store.get("dup").seq == 1
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
    assert store.next_seq() == 6
    assert store.counts() == {"queued": 2, "running": 1, "succeeded": 1, "cancelled": 1}


def test_reopened_store_holds_everything_committed(tmp_path: Path) -> None:
    path = tmp_path / "jobs.sqlite3"
    first = JobStore(path)
    job = make_job("persisted", 3, state=JobState.RUNNING, attempts=1)
    first.add(job)
    first.save(job, WebhookRow(job.id, "http://hook", b'{"a": 1}', job.owner, 0, 5.0))
    first.add_upload(UploadRow("tok-12345678", "o", "a.png", "image/png", None, 1.0, 9.0))
    # no close(): a crash leaves the connection open
    second = JobStore(path)
    try:
        assert second.get(job.id) == job
        assert [j.id for j in second.unfinished()] == [job.id]
        assert second.webhooks_due(10.0) == [WebhookRow(job.id, "http://hook", b'{"a": 1}', job.owner, 0, 5.0)]
        assert second.get_upload("tok-12345678") is not None
        assert second.next_seq() == 4
    finally:
        second.close()
        first.close()


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


def test_uploads_round_trip_and_expire(store: JobStore) -> None:
    row = UploadRow("tok-aaaaaaaa", "owner", "photo.png", "image/png", None, 10.0, 20.0)
    store.add_upload(row)
    assert store.get_upload(row.token) == row
    store.set_upload_size(row.token, 1234)
    assert store.get_upload(row.token).size == 1234
    assert store.expired_uploads(19.9) == []
    assert store.expired_uploads(20.0) == [row.token]
    store.delete_uploads([row.token])
    assert store.get_upload(row.token) is None and store.get_upload("missing") is None


def test_a_failed_transaction_leaves_nothing_behind(store: JobStore) -> None:
    """A job's terminal state and its webhook are written together or not at all."""
    job = make_job("atomic", 1)
    store.add(job)
    job.state = JobState.SUCCEEDED
    bad_hook = WebhookRow(job.id, None, b"{}", "", 0, 1.0)  # type: ignore[arg-type]  # url NOT NULL
    with pytest.raises(sqlite3.IntegrityError):
        store.save(job, bad_hook)
    assert store.get(job.id).state is JobState.QUEUED
    assert store.webhook_state(job.id) is None
    store.save(job)  # the connection is usable afterwards
    assert store.get(job.id).state is JobState.SUCCEEDED
