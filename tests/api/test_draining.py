"""Draining on SIGTERM (reliability case R6).

While draining, ``/health/ready`` is 503 ``draining``, queue submits are still taken (they stay queued and
run after the restart), sync runs are refused with 503, Retry-After and ``Connection: close``, status polls
still answer, the running batch gets ``drain_grace_s`` to finish, queued requests stay queued in the store
for the next start, and the process exits 0. A batch still running when the grace period ends stays
``running`` in the store and runs again after the restart.

The first tests send a real SIGTERM to ``inpaint-server serve --models tiny``; the in-process ones drive
the same :class:`server.http.draining.DrainingServer` over a held engine, to check each step without timing.
"""

from __future__ import annotations

import signal
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from server.app import create_app
from server.jobs.job import Job, JobState
from server.jobs.store.sqlite import SqliteStore
from server.settings import load_settings
from tests.api.queue_ops import (
    APP,
    BIG,
    inpaint_input,
    requests_url,
    result,
    status,
    submit,
    wait_all_completed,
    wait_status,
)
from tests.live import DrainingLiveServer, GatedEngine, ServerProcess

ABANDONED = "The server shut down before this request finished"


@pytest.fixture
def spawn(serve_tiny: Callable[..., ServerProcess]) -> Callable[..., ServerProcess]:
    return serve_tiny


def stored(data_dir: Path, ids: list[str]) -> dict[str, Job]:
    store = SqliteStore(data_dir / "jobs.sqlite3")
    try:
        rows = {job_id: store.get(job_id) for job_id in ids}
    finally:
        store.close()
    assert all(row is not None for row in rows.values()), rows
    return rows  # type: ignore[return-value]


def wait_draining(client: httpx.Client) -> None:
    """Until the server has seen the signal (the handler runs on the server's loop, a moment later)."""
    deadline = time.monotonic() + 10
    while True:
        response = client.get("/health/ready")
        if response.status_code == 503:
            assert response.json()["status"] == "draining", response.text
            return
        assert response.status_code == 200 and time.monotonic() < deadline, response.text
        time.sleep(0.01)


def assert_refused(response: httpx.Response) -> None:
    assert response.status_code == 503, response.text
    assert response.headers["x-fal-error-type"] == "draining"
    assert int(response.headers["retry-after"]) > 0
    assert response.headers["connection"] == "close"  # the retry opens a new connection (another instance)
    assert response.json()["error_type"] == "draining"


def messages(body: dict[str, Any]) -> list[str]:
    return [entry["message"] for entry in body["logs"]]


# ---------------------------------------------------------------------- real SIGTERM to a server process


def test_sigterm_finishes_the_running_job_keeps_the_queue_and_exits_0(
    data_dir: Path, spawn: Callable[..., ServerProcess]
) -> None:
    server = spawn(data_dir, INPAINT_DRAIN_GRACE_S="60")
    with httpx.Client(base_url=server.url, timeout=30) as client:
        running_id = submit(client, image_size=BIG, seed=7)  # seconds on one CPU thread
        wait_status(client, running_id, "IN_PROGRESS")
        queued = {submit(client, seed=seed): seed for seed in (1, 2)}

        assert server.proc is not None
        server.proc.send_signal(signal.SIGTERM)
        wait_draining(client)
        queued[submit(client, seed=4)] = 4  # taken while draining: it runs after the restart
        assert_refused(client.post(f"/{APP}", json=inpaint_input()))
        # Polls still answer during the grace period.
        assert status(client, running_id)["status"] == "IN_PROGRESS"
        assert status(client, next(iter(queued)))["status"] == "IN_QUEUE"

    assert server.proc.wait(timeout=60) == 0
    rows = stored(data_dir, [running_id, *queued])
    assert rows[running_id].state is JobState.SUCCEEDED, rows[running_id]
    assert (data_dir / "files" / running_id / rows[running_id].files[0]).is_file()
    for job_id in queued:
        assert rows[job_id].state is JobState.QUEUED and rows[job_id].attempts == 0, rows[job_id]

    restarted = spawn(data_dir)
    with httpx.Client(base_url=restarted.url, timeout=30) as client:
        bodies = wait_all_completed(client, list(queued))
        for job_id, seed in queued.items():
            assert "error" not in bodies[job_id], bodies[job_id]
            assert result(client, job_id)["seed"] == seed
        assert result(client, running_id)["seed"] == 7


def test_a_job_longer_than_the_grace_period_runs_again_after_the_restart(
    data_dir: Path, spawn: Callable[..., ServerProcess]
) -> None:
    server = spawn(data_dir, INPAINT_DRAIN_GRACE_S="0.3")
    with httpx.Client(base_url=server.url, timeout=30) as client:
        running_id = submit(client, image_size=BIG)  # the server draws the seed
        wait_status(client, running_id, "IN_PROGRESS")
        assert server.proc is not None
        server.proc.send_signal(signal.SIGTERM)
        assert server.proc.wait(timeout=60) == 0

    row = stored(data_dir, [running_id])[running_id]
    assert row.state is JobState.RUNNING and row.attempts == 1, row
    assert any(ABANDONED in entry["message"] for entry in row.logs), row.logs

    restarted = spawn(data_dir)
    with httpx.Client(base_url=restarted.url, timeout=30) as client:
        body = wait_all_completed(client, [running_id])[running_id]
        assert "error" not in body, body
        assert "Interrupted: its worker stopped; running again (attempt 2)" in messages(body)
        assert result(client, running_id)["seed"] == row.seed
    restarted.stop()
    assert stored(data_dir, [running_id])[running_id].attempts == 2


# ---------------------------------------------------------------------- in process, over a held engine


@pytest.fixture
def draining_server(engine: Any, tmp_path: Path, small_work: None) -> Iterator[Callable[..., DrainingLiveServer]]:
    servers: list[DrainingLiveServer] = []
    gates: list[GatedEngine] = []

    def make(gate: GatedEngine, **settings: Any) -> DrainingLiveServer:
        settings = {"data_dir": tmp_path / "data", "warmup": False, "max_batch_size": 1, **settings}
        server = DrainingLiveServer(create_app(load_settings(settings), engine=gate)).start()
        servers.append(server)
        gates.append(gate)
        return server

    yield make
    for gate in gates:
        gate.release.set()
    for server in servers:
        server.stop()


def test_drain_takes_queue_submits_refuses_sync_runs_and_lets_the_batch_finish(
    engine: Any, draining_server: Callable[..., DrainingLiveServer], tmp_path: Path
) -> None:
    gate = GatedEngine(engine)
    server = draining_server(gate, drain_grace_s=60)
    with httpx.Client(base_url=server.url, timeout=30) as client:
        gate.hold = True
        running_id = submit(client, seed=5)
        assert gate.started.wait(30)
        queued_id = submit(client, seed=6)
        sync_answers: list[httpx.Response] = []
        waiting_sync = threading.Thread(
            target=lambda: sync_answers.append(httpx.post(f"{server.url}/{APP}", json=inpaint_input(), timeout=30))
        )
        waiting_sync.start()
        deadline = time.monotonic() + 10
        store = server.app.state.store
        while store.position(queued_id) is None or store.queued_count() < 2:
            assert time.monotonic() < deadline, "the synchronous run was never queued"
            time.sleep(0.01)

        server.sigterm()
        wait_draining(client)
        # A synchronous run still waiting will not run in this process, nor after a restart: retryable 503 now.
        waiting_sync.join(30)
        assert len(sync_answers) == 1
        assert_refused(sync_answers[0])
        assert_refused(client.post(f"/{APP}", json=inpaint_input()))
        during_id = submit(client, seed=8)  # a queue submit is taken, and waits for the next start
        assert status(client, during_id)["status"] == "IN_QUEUE"
        assert client.get("/health/live").status_code == 200
        metrics = client.get("/metrics").text
        assert "inpaint_ready 0.0" in metrics
        time.sleep(0.3)  # the held job is not abandoned, the queued one not started, however long we wait
        assert status(client, running_id)["status"] == "IN_PROGRESS"
        assert status(client, queued_id)["status"] == "IN_QUEUE"
        assert [len(batch) for batch in gate.batches] == [1]

        gate.release.set()
        assert server.exited(30), "the server did not exit after the batch finished"
    rows = stored(tmp_path / "data", [running_id, queued_id, during_id])
    assert rows[running_id].state is JobState.SUCCEEDED
    assert rows[queued_id].state is JobState.QUEUED and rows[during_id].state is JobState.QUEUED
    assert len(gate.batches) == 1


def test_grace_period_over_leaves_the_batch_running_in_the_store_and_a_restart_reruns_it(
    engine: Any, draining_server: Callable[..., DrainingLiveServer], tmp_path: Path
) -> None:
    gate = GatedEngine(engine)
    server = draining_server(gate, drain_grace_s=0.2)
    with httpx.Client(base_url=server.url, timeout=30) as client:
        gate.hold = True
        running_id = submit(client, seed=9)
        assert gate.started.wait(30)
        server.sigterm()
        wait_draining(client)
    store_path = tmp_path / "data"
    deadline = time.monotonic() + 10
    while not any(ABANDONED in e["message"] for e in stored(store_path, [running_id])[running_id].logs):
        assert time.monotonic() < deadline, "the drain never gave up on the held batch"
        time.sleep(0.02)
    gate.release.set()  # the engine goes on, is told to stop at the next step, and nothing is finalized
    assert server.exited(30)
    row = stored(store_path, [running_id])[running_id]
    assert row.state is JobState.RUNNING and row.attempts == 1 and row.error is None, row

    again = draining_server(GatedEngine(engine))
    with httpx.Client(base_url=again.url, timeout=30) as client:
        body = wait_all_completed(client, [running_id])[running_id]
        assert "error" not in body, body
        assert result(client, running_id)["seed"] == 9
        assert client.get(requests_url(running_id)).status_code == 200
