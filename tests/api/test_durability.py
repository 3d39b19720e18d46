"""Durable state: ``kill -9`` and restart lose nothing acknowledged, interrupted jobs re-run a bounded
number of times with the same seed, and completed results live exactly ``result_retention_s``.

The restart tests run ``inpaint-server serve --models tiny`` as a subprocess on one data directory
(reliability cases R4, R5, R13); the rest build the app in-process.
"""

from __future__ import annotations

import sqlite3
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from itertools import count
from pathlib import Path
from typing import Any

import httpx
import pytest

from server.http.schemas import input_model
from server.jobs.job import Job, JobState
from server.jobs.store.sqlite import SqliteStore
from tests.api.fal_wire import FakeClock
from tests.api.queue_ops import (
    APP,
    BIG,
    ENDPOINT,
    image_bytes,
    inpaint_input,
    last_start,
    requests_url,
    result,
    status,
    submit,
    wait_all_completed,
    wait_status,
)
from tests.live import LOOPBACK, ServerProcess
from tests.webhook_receiver import HANG, WebhookReceiver

SERVER_ENV = {"INPAINT_FETCH_ALLOW": ",".join(LOOPBACK)}  # the webhook receiver listens on 127.0.0.1


@pytest.fixture
def spawn(serve_tiny: Callable[..., ServerProcess]) -> Callable[..., ServerProcess]:
    """``serve_tiny`` with the webhook receiver's loopback address allowed."""
    return lambda data_dir, **env: serve_tiny(data_dir, **{**SERVER_ENV, **env})


@pytest.fixture
def receiver() -> Iterator[WebhookReceiver]:
    hook = WebhookReceiver(script=[HANG])  # the first delivery is held open: it is in flight at the kill
    yield hook
    hook.close()


def stored_jobs(data_dir: Path, ids: list[str]) -> dict[str, Job | None]:
    """The job rows as a crashed server left them on disk."""
    store = SqliteStore(data_dir / "jobs.sqlite3")
    try:
        return {job_id: store.get(job_id) for job_id in ids}
    finally:
        store.close()


def submit_until_killed(server: ServerProcess, min_acked: int) -> list[tuple[str, int]]:
    """Submit small jobs back to back from a thread and ``kill -9`` the server while that goes on.

    Returns (request id, seed) of every submit the server acknowledged, in order.
    """
    acked: list[tuple[str, int]] = []
    errors: list[BaseException] = []

    def loop() -> None:
        with httpx.Client(base_url=server.url, timeout=10) as client:
            for seed in count(100):
                try:
                    acked.append((submit(client, seed=seed), seed))
                except httpx.HTTPError:
                    return  # the server is gone; this submit was never acknowledged
                except BaseException as exc:
                    errors.append(exc)
                    return

    thread = threading.Thread(target=loop, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while len(acked) < min_acked and thread.is_alive():
        assert time.monotonic() < deadline, f"only {len(acked)} submits acknowledged in 30 s"
        time.sleep(0.005)
    server.kill9()
    thread.join(30)
    assert not errors, errors
    assert len(acked) >= min_acked
    return list(acked)


def test_kill9_loses_no_acknowledged_job_and_reruns_the_interrupted_one(
    data_dir: Path, spawn: Callable[..., ServerProcess], receiver: WebhookReceiver
) -> None:
    """R4: queued jobs survive in order, the running one re-runs once with its seed, results persist."""
    first = spawn(data_dir, INPAINT_WEBHOOK_TIMEOUT_S="60")
    with httpx.Client(base_url=first.url, timeout=30) as client:
        done_id = submit(client, webhook=receiver.url, seed=11)
        wait_all_completed(client, [done_id])
        done_output = result(client, done_id)
        done_image = image_bytes(client, done_output)
        receiver.wait_for(1)  # its webhook is being delivered (held open by the receiver) when the server dies
        big_id = submit(client, image_size=BIG)  # no seed given: the server draws one at submit
        wait_status(client, big_id, "IN_PROGRESS")
    acked = submit_until_killed(first, min_acked=4)
    acked_ids = [job_id for job_id, _ in acked]

    rows = stored_jobs(data_dir, [big_id, *acked_ids])
    big_row = rows[big_id]
    assert big_row is not None and big_row.state is JobState.RUNNING and big_row.attempts == 1
    for job_id in acked_ids:
        row = rows[job_id]
        assert row is not None, f"acknowledged request {job_id} is not in the store"
        assert row.state is JobState.QUEUED

    receiver.epoch = 2
    second = spawn(data_dir)
    with httpx.Client(base_url=second.url, timeout=30) as client:
        bodies = wait_all_completed(client, [big_id, *acked_ids])
        for job_id, body in bodies.items():
            assert "error" not in body, (job_id, body)

        # The interrupted job ran first again (lowest seq), then the queued ones in submission order.
        starts = [last_start(bodies[job_id]) for job_id in [big_id, *acked_ids]]
        assert starts == sorted(starts)

        messages = [entry["message"] for entry in bodies[big_id]["logs"]]
        assert "Interrupted: its worker stopped; running again (attempt 2)" in messages
        big_output = result(client, big_id)
        assert big_output["seed"] == big_row.seed
        for job_id, seed in acked:
            assert result(client, job_id)["seed"] == seed

        # The re-run gives exactly the image a fresh run with that input and seed gives.
        fresh_id = submit(client, image_size=BIG, seed=big_row.seed)
        wait_all_completed(client, [fresh_id])
        assert image_bytes(client, result(client, fresh_id)) == image_bytes(client, big_output)

        # A result completed before the crash is still served, file included.
        assert result(client, done_id) == done_output
        assert image_bytes(client, done_output) == done_image

        # Its webhook, in flight at the kill, is delivered by the new process.
        receiver.wait_for(1, answered=True)
        deliveries = receiver.for_request(done_id)
        assert [d.epoch for d in deliveries] == [1, 2]
        assert deliveries[1].status == 200 and deliveries[1].body == deliveries[0].body
        assert deliveries[1].json()["payload"] == done_output

    second.stop()
    rerun = stored_jobs(data_dir, [big_id])[big_id]
    assert rerun is not None and rerun.state is JobState.SUCCEEDED and rerun.attempts == 2


def _wait_for_sync_row(data_dir: Path, timeout: float = 30.0) -> str:
    """The id of the (only) synchronous run in the store, once its row is committed."""
    db = sqlite3.connect(f"file:{data_dir / 'jobs.sqlite3'}?mode=ro", uri=True)
    try:
        deadline = time.monotonic() + timeout
        while True:
            row = db.execute("SELECT id FROM jobs WHERE sync = 1").fetchone()
            if row is not None:
                return row[0]
            assert time.monotonic() < deadline, "the synchronous run was never stored"
            time.sleep(0.01)
    finally:
        db.close()


def test_job_killed_max_attempts_times_fails_as_interrupted_and_others_still_run(
    data_dir: Path, spawn: Callable[..., ServerProcess]
) -> None:
    """R5: the server dies twice while one job runs; the third start fails it and serves the rest."""
    first = spawn(data_dir)
    with httpx.Client(base_url=first.url, timeout=30) as client:
        big_id = submit(client, image_size=BIG)
        wait_status(client, big_id, "IN_PROGRESS")
        queued_id = submit(client, seed=3)
    first.kill9()

    second = spawn(data_dir)
    sync_answer: list[Any] = []
    with httpx.Client(base_url=second.url, timeout=30) as client:
        body = wait_status(client, big_id, "IN_PROGRESS")
        assert "Interrupted: its worker stopped; running again (attempt 2)" in [e["message"] for e in body["logs"]]

        def run_sync() -> None:
            try:
                sync_answer.append(httpx.post(f"{second.url}/{APP}", json=inpaint_input(), timeout=60))
            except httpx.HTTPError as exc:
                sync_answer.append(exc)

        caller = threading.Thread(target=run_sync, daemon=True)
        caller.start()
        sync_id = _wait_for_sync_row(data_dir)
        assert status(client, big_id)["status"] == "IN_PROGRESS"
    second.kill9()
    caller.join(30)
    assert len(sync_answer) == 1 and isinstance(sync_answer[0], httpx.HTTPError), sync_answer

    rows = stored_jobs(data_dir, [big_id, queued_id, sync_id])
    assert rows[big_id] is not None and rows[big_id].state is JobState.RUNNING and rows[big_id].attempts == 2
    assert rows[queued_id] is not None and rows[queued_id].state is JobState.QUEUED

    third = spawn(data_dir)
    with httpx.Client(base_url=third.url, timeout=30) as client:
        bodies = wait_all_completed(client, [big_id, sync_id, queued_id])
        assert bodies[big_id]["error_type"] == "interrupted"
        assert "2 times" in bodies[big_id]["error"]
        answer = client.get(requests_url(big_id))
        assert answer.status_code == 500
        assert answer.headers["x-fal-error-type"] == "interrupted"
        assert answer.json()["error_type"] == "interrupted"

        assert bodies[sync_id]["error_type"] == "interrupted"
        assert "synchronous" in bodies[sync_id]["error"]

        assert "error" not in bodies[queued_id]
        assert result(client, queued_id)["seed"] == 3
        assert client.get("/health/ready").status_code == 200


# ---------------------------------------------------------------------- recovery driven from a prepared store


def _stored(app_input: dict[str, Any], seq: int, state: JobState, **fields: Any) -> Job:
    job = Job(
        id=str(uuid.uuid4()),
        app_id=APP,
        endpoint=ENDPOINT,
        owner="",
        input=app_input,
        seed=fields.pop("seed", 1000 + seq),
        created_at=time.time(),
        base_url="http://old-host:8000",
        seq=seq,
        state=state,
        **fields,
    )
    job.add_log("Request queued")
    return job


@pytest.mark.parametrize("max_attempts", [2, 3])
def test_recover_requeues_or_fails_what_a_crash_left_running(
    make_server: Callable[..., Any], spec: Any, tmp_path: Path, max_attempts: int
) -> None:
    """A store left as a crash leaves it: running jobs with 1 or 2 attempts, sync runs, a queued job."""
    receiver = WebhookReceiver()
    try:
        app_input = input_model(spec.app("fast-lightning-sdxl")).model_validate(inpaint_input()).model_dump(mode="json")
        jobs = {
            "twice": _stored(app_input, 1, JobState.RUNNING, attempts=2, webhook_url=receiver.url),
            "once": _stored(app_input, 2, JobState.RUNNING, attempts=1, seed=4242),
            "sync_running": _stored(app_input, 3, JobState.RUNNING, attempts=1, sync=True),
            "sync_queued": _stored(app_input, 4, JobState.QUEUED, sync=True),
            "queued": _stored(app_input, 5, JobState.QUEUED),
            "cancelled": _stored(app_input, 6, JobState.RUNNING, attempts=1, cancel_requested=True),
        }
        data = tmp_path / "crashed"
        store = SqliteStore(data / "jobs.sqlite3")
        for job in jobs.values():
            store.add(job)
        store.close()

        server = make_server(
            data_dir=data, max_attempts=max_attempts, webhook_retry_base_s=0.1, max_batch_size=1, fetch_allow=LOOPBACK
        )
        ids = {name: job.id for name, job in jobs.items()}
        with httpx.Client(base_url=server.url, timeout=30) as client:
            bodies = {name: wait_all_completed(client, [job_id])[job_id] for name, job_id in ids.items()}

            for name in ("sync_running", "sync_queued"):
                assert bodies[name]["error_type"] == "interrupted", bodies[name]
                assert "synchronous run" in bodies[name]["error"]

            # A cancel acknowledged before the crash stays a cancel: the job is not run again.
            assert bodies["cancelled"]["error_type"] == "cancelled", bodies["cancelled"]
            assert client.get(requests_url(ids["cancelled"])).status_code == 499

            assert "error" not in bodies["once"] and "error" not in bodies["queued"]
            once_logs = [entry["message"] for entry in bodies["once"]["logs"]]
            assert "Interrupted: its worker stopped; running again (attempt 2)" in once_logs
            assert result(client, ids["once"])["seed"] == 4242  # the seed it was stored with
            assert last_start(bodies["once"]) < last_start(bodies["queued"])

            webhook = receiver.wait_for(1)[0].json()
            assert webhook["request_id"] == ids["twice"]
            if max_attempts == 2:  # two runs already: not a third
                assert bodies["twice"]["error_type"] == "interrupted"
                assert "2 times" in bodies["twice"]["error"]
                assert client.get(requests_url(ids["twice"])).status_code == 500
                assert webhook["status"] == "ERROR" and webhook["error"] == "Invalid status code: 500"
                assert webhook["payload"]["error_type"] == "interrupted"
            else:
                assert "error" not in bodies["twice"]
                assert webhook["status"] == "OK" and webhook["payload"]["seed"] == jobs["twice"].seed
                assert last_start(bodies["twice"]) < last_start(bodies["once"])

        attempts = {name: server.app.state.store.get(job_id).attempts for name, job_id in ids.items()}
        assert attempts["once"] == 2 and attempts["queued"] == 1 and attempts["cancelled"] == 1
        assert attempts["twice"] == (2 if max_attempts == 2 else 3)
    finally:
        receiver.close()


# ---------------------------------------------------------------------- retention


def test_results_files_and_uploads_are_collected_after_retention_and_not_before(
    make_server: Callable[..., Any],
) -> None:
    """R13: a result lives ``result_retention_s`` after completion; then status, result and files are 404."""
    clock = FakeClock(1_700_000_000.0)
    server = make_server(clock=clock, result_retention_s=3600)
    service = server.app.state.service
    with httpx.Client(base_url=server.url, timeout=30) as client:
        job_id = submit(client, seed=1)
        wait_all_completed(client, [job_id])
        output = result(client, job_id)
        file_path = httpx.URL(output["images"][0]["url"]).path
        upload = client.post("/storage/upload/initiate", json={"content_type": "image/png", "file_name": "a.png"})
        assert upload.status_code == 200, upload.text
        upload_path = httpx.URL(upload.json()["upload_url"]).path
        assert client.put(upload_path, content=b"\x89PNG fake").status_code == 200

        def alive() -> list[int]:
            return [
                client.get(requests_url(job_id, "/status")).status_code,
                client.get(requests_url(job_id)).status_code,
                client.get(file_path).status_code,
                client.get(upload_path).status_code,
            ]

        assert alive() == [200, 200, 200, 200]
        clock.now += 3599
        assert service.collect_garbage() == 0
        assert alive() == [200, 200, 200, 200]
        assert client.get(file_path).content == image_bytes(client, output)

        clock.now += 1
        assert alive() == [404, 404, 404, 404]  # expired: gone at once, before the collector runs
        assert service.collect_garbage() == 1
        assert alive() == [404, 404, 404, 404]
        data_dir = server.app.state.settings.data_dir
        assert not (data_dir / "files" / job_id).exists()
        assert not any((data_dir / "uploads").iterdir())
        assert server.app.state.store.get(job_id) is None
        assert service.collect_garbage() == 0
