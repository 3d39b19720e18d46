"""``serve --store postgresql://...``: the server on a real PostgreSQL, restarted under it.

A request held running (a test fault) and others queued while PostgreSQL restarts (fast shutdown):
submits and polls during the outage get a retryable 503 ``store_unavailable``, never a 500; the held
request finishes during the outage and its result is written when the database is back; the server
reconnects by itself and every acknowledged request completes, once. Then ``kill -9`` of the server: its
queue is in PostgreSQL, not in the server's data directory, and a new server on another data directory
runs it.
"""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest

from pipelines.tiny import tiny_cache_dir
from tests.api.queue_ops import APP, inpaint_input, status, submit, wait_all_completed, wait_status
from tests.live import ServerProcess

HOLD = json.dumps(
    [
        {"at": "denoise_step", "fault": "hang", "seconds": 8, "prompt": "hold on", "times": 1},
        {"at": "denoise_step", "fault": "hang", "seconds": 120, "prompt": "hold again", "times": 1},
    ]
)


@pytest.fixture
def spawn(serve_tiny: Callable[..., ServerProcess]) -> Callable[..., ServerProcess]:
    return lambda data_dir, store, **env: serve_tiny(data_dir, "--store", store, **env)


def wait_for_log(log: Path, line: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while line not in log.read_text():
        assert time.monotonic() < deadline, f"no {line!r} in the server log:\n{log.read_text()[-3000:]}"
        time.sleep(0.1)


def test_postgres_restart_and_server_kill_lose_nothing(
    postgres, spawn, data_dir: Path, tiny_cache: Path, tmp_path: Path
) -> None:
    url = postgres.fresh_url()
    log = tmp_path / "server.log"
    server = spawn(data_dir, url, INPAINT_TEST_FAULTS=HOLD)
    with httpx.Client(base_url=server.url, timeout=10) as client:
        held = submit(client, prompt="hold on", seed=1)
        wait_status(client, held, "IN_PROGRESS")
        waiting = [submit(client, seed=seed) for seed in (2, 3, 4)]
        assert [status(client, rid)["queue_position"] for rid in waiting] == [0, 1, 2]  # from the store

        postgres.stop("fast")
        try:
            refused = client.post(f"/queue/{APP}", json=inpaint_input(seed=99))
            assert refused.status_code == 503, refused.text
            assert refused.json()["error_type"] == "store_unavailable" and int(refused.headers["Retry-After"]) >= 1
            poll = client.get(f"/queue/{APP}/requests/{waiting[0]}/status")
            assert poll.status_code in (200, 202, 503), poll.text  # from memory, or a retryable 503
            # The held request finishes meanwhile (8 s after it started): its result waits in memory.
            wait_for_log(log, f"request {held} succeeded, but the job store is unavailable; saving it later")
        finally:
            postgres.start()

        # The server reconnects by itself: polls answer a retryable 503 until it has.
        back = time.monotonic()
        while client.get(f"/queue/{APP}/requests/{waiting[-1]}/status").status_code == 503:
            assert time.monotonic() - back < 30, "the server did not reconnect to PostgreSQL within 30 s"
            time.sleep(0.2)
        print(f"reconnected {time.monotonic() - back:.1f} s after PostgreSQL was back")
        ids = [held, *waiting]
        done = wait_all_completed(client, ids, timeout=120)
        assert all(body.get("error") is None for body in done.values()), done
        seeds = {rid: client.get(f"/queue/{APP}/requests/{rid}").json()["seed"] for rid in ids}
        assert seeds == dict(zip(ids, (1, 2, 3, 4), strict=True))
        # Status answers from memory at once; the durable write follows within a retry or two.
        wait_for_log(log, f"request {held}: its succeeded state is saved now that the store is back")

        # More work queued behind a held request, then the server is killed: the queue lives in PostgreSQL.
        held_again = submit(client, prompt="hold again", seed=5)
        wait_status(client, held_again, "IN_PROGRESS")
        queued = [submit(client, seed=seed) for seed in (6, 7)]
    server.kill9()
    other_data = tmp_path / "other-data"  # another data directory: nothing local carries over
    shutil.copytree(tiny_cache, tiny_cache_dir(other_data), symlinks=True)
    other = spawn(other_data, url)
    with httpx.Client(base_url=other.url, timeout=10) as client:
        done = wait_all_completed(client, [held_again, *queued], timeout=120)
        assert all(body.get("error") is None for body in done.values()), done
        logs = [entry["message"] for entry in status(client, held_again)["logs"]]
        assert "Interrupted: its worker stopped; running again (attempt 2)" in logs, logs
        assert client.get(f"/queue/{APP}/requests/{held_again}").json()["seed"] == 5
