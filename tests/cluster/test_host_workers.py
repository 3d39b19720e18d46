"""Every GPU of a host: ``serve --devices cpu,cpu`` on the embedded SQLite store starts one worker process per
device (tiny models on CPU stand in for GPUs). Both take batches; a worker killed with ``kill -9`` leaves the
other serving (its batch runs again there), and the server starts a new one in its place."""

from __future__ import annotations

import os
import signal
import sqlite3
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx

from tests.api.queue_ops import submit, wait_status
from tests.cluster.conftest import APP_VARIANT, Cluster, poll_until
from tests.live import SUBPROCESS_ENV, ServerProcess


def _query(db: Path, sql: str, params: tuple = ()) -> list[tuple]:
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=10)
    try:
        return conn.execute(sql, params).fetchall()
    finally:
        conn.close()


def _workers(db: Path) -> dict[str, tuple[str, int, str]]:
    """name -> (incarnation id, pid, state) of the worker rows, the newest per name."""
    found = _query(db, "SELECT name, id, pid, state FROM nodes WHERE kind = 'worker' ORDER BY started_at")
    return {name: (node_id, pid, state) for name, node_id, pid, state in found}


def test_serve_devices_runs_a_worker_per_device_and_survives_losing_one(
    tmp_path: Path, cluster: Callable[..., Cluster]
) -> None:
    nodes = cluster("unused")
    data = str(nodes.data_dir("host"))
    db = Path(data) / "jobs.sqlite3"
    server = ServerProcess(
        ["--devices", "cpu,cpu", "--node-name", "host", "--models", "tiny", "--app", APP_VARIANT, "--data-dir", data],
        env={**SUBPROCESS_ENV, "INPAINT_MAX_BATCH_SIZE": "2", "INPAINT_LEASE_S": "3"},
        log=tmp_path / "host.log",
    )
    nodes.procs.append(server)
    server.start()
    try:
        _run(server, db)
    except AssertionError:
        print(nodes.logs())
        raise


def _run(server: ServerProcess, db: Path) -> None:
    names = {"host/cpu.0", "host/cpu.1"}
    poll_until(
        lambda: db.exists() and {n for n, (_, _, s) in _workers(db).items() if s == "ready"} == names,
        "both workers ready",
        timeout=120,
    )
    with httpx.Client(base_url=server.url, timeout=30) as client:
        first = [submit(client, seed=i) for i in range(40)]
        poll_until(lambda: _done(db, first), "40 requests done", timeout=120)
        took = {w.split("#")[0] for (w,) in _query(db, "SELECT worker FROM jobs WHERE state = 'succeeded'")}
        assert took == names, took  # both workers took batches

        # kill -9 one worker while it runs a batch (a BIG image: seconds on one CPU thread).
        victim_job = submit(client, seed=77, image_size={"width": 640, "height": 640})
        wait_status(client, victim_job, "IN_PROGRESS")
        holder = _query(db, "SELECT worker FROM jobs WHERE id = ?", (victim_job,))[0][0]
        name = holder.split("#")[0]
        os.kill(_workers(db)[name][1], signal.SIGKILL)
        more = [submit(client, seed=100 + i) for i in range(10)]
        poll_until(lambda: _done(db, [victim_job, *more]), "requests done after a worker was killed", timeout=120)
        state, attempts, logs = _query(db, "SELECT state, attempts, logs FROM jobs WHERE id = ?", (victim_job,))[0]
        assert (state, attempts) == ("succeeded", 2) and "Interrupted: its worker stopped" in logs
        assert client.get(f"/queue/fal-ai/fast-lightning-sdxl/requests/{victim_job}").json()["seed"] == 77

        # The server started a new worker process in the dead one's place (a new incarnation, same name); the
        # dead one's row may be gone meanwhile (a sweeper forgets dead nodes that hold nothing).
        def restarted() -> bool:
            node_id, _, state = _workers(db).get(name, (holder, 0, "gone"))
            return node_id != holder and state == "ready"

        poll_until(restarted, "worker restarted")
        ready = client.get("/health/ready").json()
        assert sorted(w["name"] for w in ready["workers"]) == sorted(names), ready


def _done(db: Path, ids: list[Any]) -> bool:
    marks = ",".join("?" * len(ids))
    found = _query(db, f"SELECT state FROM jobs WHERE id IN ({marks})", tuple(ids))
    return len(found) == len(ids) and all(s == "succeeded" for (s,) in found)
