"""GPU faults through the server (reliability cases R5, R8, R9, R10), provoked in the real engine.

Out of memory is handled inside the engine (tests/pipelines/test_engine_faults.py has the policy);
here: the job that ran out of memory once succeeds, one that never fits fails ``gpu_oom`` (500) while
its batch-mate and the next job succeed. A fatal CUDA error or a hung step (the watchdog) turns
readiness 503, leaves the running job ``running`` in the store and ends the process with status 75;
after the restart the job runs again, and a job that took the process down twice fails
``interrupted`` while the others run.

In-process servers get faults through ``engine.fault_hook`` and record the exit instead of exiting;
subprocess servers (``inpaint-server serve --models tiny``) get them from ``INPAINT_TEST_FAULTS``.
"""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from pipelines.fault_injection import ENV_VAR, FaultInjector, FaultPoint
from server.app import create_app
from server.jobs.gpu_exit import EXIT_GPU_FAULT
from server.jobs.job import Job, JobState
from server.jobs.store.sqlite import SqliteStore
from server.settings import load_settings
from tests.api.queue_ops import (
    image_bytes,
    requests_url,
    result,
    status,
    submit,
    wait_all_completed,
    wait_status,
)
from tests.live import REPO, SUBPROCESS_ENV, LiveServer, ServerProcess

# As in test_durability: one request per batch (so a poison job runs alone), one variant, one torch thread.
SERVER_ENV = {**SUBPROCESS_ENV, "INPAINT_APPS": "fast-lightning-sdxl:4"}


# ---------------------------------------------------------------------- in-process servers


class Blocker:
    """A fault hook that holds a batch whose prompt contains ``prompt`` at its first step until released."""

    def __init__(self, prompt: str) -> None:
        self.prompt = prompt
        self.started = threading.Event()
        self.release = threading.Event()

    def __call__(self, point: FaultPoint) -> None:
        if point.name == "denoise_step" and any(self.prompt in p for p in point.prompts):
            self.started.set()
            self.release.wait(60)


@pytest.fixture
def faults(engine: Any) -> Iterator[Callable[..., FaultInjector]]:
    """``faults(rules, *blockers)`` hooks an injector (and blockers) into the shared engine until the test ends."""
    blockers: list[Blocker] = []

    def install(rules: Any, *holds: Blocker) -> FaultInjector:
        injector = FaultInjector.from_spec(rules)
        blockers.extend(holds)

        def hook(point: FaultPoint) -> None:
            for blocker in holds:
                blocker(point)
            injector(point)

        engine.fault_hook = hook
        return injector

    yield install
    for blocker in blockers:
        blocker.release.set()
    engine.fault_hook = None


@pytest.fixture
def serve(engine: Any, tmp_path: Path) -> Iterator[Callable[..., tuple[LiveServer, list[int]]]]:
    """``serve(data_dir, **settings)``: the real app on the tiny engine; returns it and the exit statuses
    it asked for (recorded: an in-process server must not end the test process)."""
    servers: list[LiveServer] = []

    def start(data_dir: Path | None = None, **settings: Any) -> tuple[LiveServer, list[int]]:
        exits: list[int] = []
        settings = {"data_dir": data_dir or tmp_path / f"data{len(servers)}", "warmup": False, **settings}
        app = create_app(load_settings(settings), engine=engine, exit_process=exits.append)
        server = LiveServer(app).start()
        servers.append(server)
        return server, exits

    yield start
    for server in servers:
        server.stop()


def _messages(body: dict[str, Any]) -> list[str]:
    return [entry["message"] for entry in body["logs"]]


def test_oom_once_is_retried_and_the_job_and_the_next_succeed(serve: Any, faults: Any) -> None:
    """R8: out of memory in the VAE decode once: the job is retried in low-memory mode and succeeds."""
    injector = faults({"at": "decode", "fault": "oom", "times": 1})
    server, exits = serve()
    with httpx.Client(base_url=server.url, timeout=30) as client:
        first = submit(client, seed=5)
        body = wait_all_completed(client, [first])[first]
        assert "error" not in body, body
        assert [(p.request_ids, p.vae_tiling) for p in injector.seen if p.name == "decode"] == [
            ((first,), False),
            ((first,), True),  # alone already: straight to the VAE-tiling retry
        ]
        assert len(injector.fired) == 1

        second = submit(client, seed=5)  # same input and seed: the retry gave the image a clean run gives
        wait_all_completed(client, [second])
        assert image_bytes(client, result(client, second)) == image_bytes(client, result(client, first))
        assert client.get("/health/ready").status_code == 200
    assert exits == []


def _wait_prepared(server: LiveServer, ids: list[str], timeout: float = 30.0) -> None:
    """Until the inputs of ``ids`` are fetched and decoded, so the worker batches them together."""
    worker = server.app.state.service.worker
    deadline = time.monotonic() + timeout
    while not all(worker.is_prepared(job_id) for job_id in ids):
        assert time.monotonic() < deadline, "inputs were never prepared"
        time.sleep(0.01)


def test_request_that_never_fits_fails_gpu_oom_and_its_batch_mate_and_the_next_succeed(serve: Any, faults: Any) -> None:
    """R9: OOM in the batch, alone, and alone with VAE tiling: ``gpu_oom`` (500) for that request only."""
    blocker = Blocker("blocker")
    injector = faults({"at": "denoise_step", "fault": "oom", "prompt": "huge"}, blocker)
    server, exits = serve(max_batch_size=2)
    with httpx.Client(base_url=server.url, timeout=30) as client:
        held = submit(client, prompt="blocker", seed=1)
        assert blocker.started.wait(30)
        huge = submit(client, prompt="a huge castle", seed=2)
        fine = submit(client, prompt="a small boat", seed=3)
        _wait_prepared(server, [huge, fine])
        blocker.release.set()
        bodies = wait_all_completed(client, [held, huge, fine])

        assert [p.request_ids for p in injector.seen if p.name == "denoise_step" and p.step == 0] == [
            (held,),
            (huge, fine),  # one batch, out of memory
            (huge,),  # alone, out of memory
            (huge,),  # alone with VAE tiling, out of memory
            (fine,),
        ]
        assert "error" not in bodies[held] and "error" not in bodies[fine], bodies
        assert result(client, fine)["seed"] == 3

        assert bodies[huge]["error_type"] == "gpu_oom"
        answer = client.get(requests_url(huge))
        assert answer.status_code == 500  # not 503/504: clients would retry the same oversized request
        assert answer.headers["x-fal-error-type"] == "gpu_oom"
        detail = answer.json()
        assert detail["error_type"] == "gpu_oom" and "smaller image_size" in detail["detail"]
        assert "Traceback" not in answer.text and ".py" not in answer.text  # S19

        after = submit(client, seed=4)
        assert "error" not in wait_all_completed(client, [after])[after]
        assert client.get("/health/ready").status_code == 200
    assert exits == []


def test_watchdog_marks_the_server_not_ready_and_leaves_the_job_for_the_restart(
    serve: Any, faults: Any, tmp_path: Path
) -> None:
    """R10 in-process: a step that hangs past ``step_timeout_s``: readiness 503 with the reason, the job
    stays running (attempt counted), the lane stops, exit status 75; a restart runs the job again."""
    hang = Blocker("stuck")
    faults([], hang)
    data = tmp_path / "data"
    # One job per batch: the job submitted next must stay queued behind the hung batch, not join it (with
    # batches of several it joins whenever its inputs are decoded before the first job starts).
    server, exits = serve(data, step_timeout_s=0.5, gpu_fault_exit_delay_s=0, batch_window_ms=0, max_batch_size=1)
    with httpx.Client(base_url=server.url, timeout=30) as client:
        stuck = submit(client, prompt="stuck", seed=8)
        queued = submit(client, seed=9)
        assert hang.started.wait(30)
        deadline = time.monotonic() + 30
        while not exits:
            assert time.monotonic() < deadline, "the watchdog never fired"
            time.sleep(0.02)
        assert exits == [EXIT_GPU_FAULT]

        ready = client.get("/health/ready")
        assert ready.status_code == 503
        assert ready.json()["status"] == "gpu_fault"
        assert "no progress" in ready.json()["detail"] and "step_timeout_s=0.5" in ready.json()["detail"]
        body = status(client, stuck)
        assert body["status"] == "IN_PROGRESS"
        assert any("GPU fault" in message for message in _messages(body))
        assert status(client, queued)["status"] == "IN_QUEUE"  # nothing else runs on a hung GPU
        row = server.app.state.store.get(stuck)
        assert row.state is JobState.RUNNING and row.attempts == 1
        late = submit(client, seed=10)  # still accepted: stored, it runs after the restart
    hang.release.set()
    server.stop()

    restarted, exits_after = serve(data)
    with httpx.Client(base_url=restarted.url, timeout=30) as client:
        bodies = wait_all_completed(client, [stuck, queued, late])
        assert all("error" not in body for body in bodies.values()), bodies
        assert "Interrupted: its worker stopped; running again (attempt 2)" in _messages(bodies[stuck])
        assert result(client, stuck)["seed"] == 8
    assert exits_after == []


# ---------------------------------------------------------------------- subprocess servers: real exits


@pytest.fixture
def spawn(tmp_path: Path) -> Iterator[Callable[..., ServerProcess]]:
    """``spawn(data_dir, faults=None, wait=True, **env)``: ``inpaint-server serve --models tiny`` with
    ``faults`` as INPAINT_TEST_FAULTS; ``wait=False`` does not wait for readiness (it may crash first)."""
    procs: list[ServerProcess] = []

    def start(data_dir: Path, faults: Any = None, wait: bool = True, **env: str) -> ServerProcess:
        if faults is not None:
            env[ENV_VAR] = json.dumps(faults)
        proc = ServerProcess(
            ["--models", "tiny", "--data-dir", str(data_dir)], env={**SERVER_ENV, **env}, log=tmp_path / "server.log"
        )
        procs.append(proc)
        if wait:
            return proc.start()
        with (tmp_path / "server.log").open("ab") as out:
            proc.proc = subprocess.Popen(
                [sys.executable, "-m", "server.cli", *proc.args], cwd=REPO, env=proc.env, stdout=out, stderr=out
            )
        return proc

    yield start
    for proc in procs:
        proc.stop()


def _exit_status(server: ServerProcess, timeout: float = 60.0) -> int:
    assert server.proc is not None
    return server.proc.wait(timeout=timeout)


def _stored(data_dir: Path, ids: list[str]) -> dict[str, Job | None]:
    store = SqliteStore(data_dir / "jobs.sqlite3")
    try:
        return {job_id: store.get(job_id) for job_id in ids}
    finally:
        store.close()


def _readiness_until_exit(server: ServerProcess, client: httpx.Client) -> dict[str, Any] | None:
    """Poll /health/ready until the process is gone; the last 503 body seen (None if none)."""
    not_ready = None
    while server.proc is not None and server.proc.poll() is None:
        try:
            answer = client.get("/health/ready")
        except httpx.HTTPError:
            break
        if answer.status_code == 503:
            not_ready = answer.json()
        time.sleep(0.02)
    return not_ready


def test_gpu_faults_end_the_process_and_restarts_rerun_or_quarantine_the_jobs(
    data_dir: Path, spawn: Callable[..., ServerProcess]
) -> None:
    """R9, R10, R5 through real restarts (one scenario, three processes, to keep the run short).

    1. A batch of ``victim``, ``poison`` and ``careful`` (sent with ``x-fal-no-retry: 1``) hits an illegal
       memory access: readiness 503 with the reason, exit status 75, the three rows left running (attempt 1);
       ``other`` stays queued.
    2. After the restart ``careful`` fails ``interrupted`` without running again (x-fal-no-retry); ``victim``
       (sent with ``x-fal-no-retry: 0`` and fal's no-op headers) runs again and completes; ``poison`` runs
       again and hangs: the watchdog (step_timeout_s=1) ends the process with status 75 again (attempt 2).
    3. ``poison`` has taken the process down twice (max_attempts=2): failed ``interrupted``, not run a
       third time although it would crash again; ``other`` and new jobs run.
    """
    poison_fatal = {"at": "decode", "fault": "fatal", "prompt": "poison"}
    hold = {"at": "denoise_step", "fault": "hang", "prompt": "blocker", "seconds": 2}  # lets a batch form
    first = spawn(data_dir, faults=[hold, poison_fatal], INPAINT_MAX_BATCH_SIZE="3", INPAINT_GPU_FAULT_EXIT_DELAY_S="1")
    retried = {"x-fal-no-retry": "0", "X-Fal-Runner-Hint": "gpu-a", "X-Fal-Store-IO": "1"}  # accepted, no-ops
    with httpx.Client(base_url=first.url, timeout=10) as client:
        blocker = submit(client, prompt="blocker", seed=1)
        wait_status(client, blocker, "IN_PROGRESS")
        victim = submit(client, prompt="a victim", seed=2, headers=retried)
        poison = submit(client, prompt="poison", seed=3)
        careful = submit(client, prompt="a careful fox", seed=6, headers={"x-fal-no-retry": "1"})
        other = submit(client, prompt="a boat", seed=4)  # the batch holds three: this one waits
        not_ready = _readiness_until_exit(first, client)
    assert _exit_status(first) == EXIT_GPU_FAULT
    assert not_ready is not None and not_ready["status"] == "gpu_fault", not_ready
    assert "illegal memory access" in not_ready["detail"]
    rows = _stored(data_dir, [blocker, victim, poison, careful, other])
    assert rows[blocker].state is JobState.SUCCEEDED
    for job_id in (victim, poison, careful):
        assert rows[job_id].state is JobState.RUNNING and rows[job_id].attempts == 1
        assert any("GPU fault" in entry["message"] for entry in rows[job_id].logs)
    assert rows[careful].no_retry and not rows[victim].no_retry
    assert "instead of running again" in rows[careful].logs[-1]["message"]
    assert rows[other].state is JobState.QUEUED

    poison_hang = {"at": "denoise_step", "fault": "hang", "prompt": "poison"}
    second = spawn(
        data_dir, faults=poison_hang, wait=False, INPAINT_STEP_TIMEOUT_S="1", INPAINT_GPU_FAULT_EXIT_DELAY_S="0.2"
    )
    assert _exit_status(second) == EXIT_GPU_FAULT
    rows = _stored(data_dir, [victim, poison, careful, other])
    assert rows[victim].state is JobState.SUCCEEDED and rows[victim].attempts == 2
    assert rows[poison].state is JobState.RUNNING and rows[poison].attempts == 2
    assert rows[careful].state is JobState.FAILED and rows[careful].attempts == 1  # failed once, not run again
    assert rows[other].state is JobState.QUEUED

    third = spawn(data_dir, faults=poison_fatal, INPAINT_MAX_ATTEMPTS="2")
    with httpx.Client(base_url=third.url, timeout=30) as client:
        bodies = wait_all_completed(client, [victim, poison, careful, other])
        assert "error" not in bodies[victim], bodies[victim]
        assert "Interrupted: its worker stopped; running again (attempt 2)" in _messages(bodies[victim])
        assert result(client, victim)["seed"] == 2
        assert bodies[poison]["error_type"] == "interrupted" and "2 times" in bodies[poison]["error"]
        assert client.get(requests_url(poison)).status_code == 500
        assert bodies[careful]["error_type"] == "interrupted" and "x-fal-no-retry" in bodies[careful]["error"]
        assert not any(m.startswith("Interrupted") for m in _messages(bodies[careful]))
        assert "error" not in bodies[other], bodies[other]
        later = submit(client, seed=5)
        assert "error" not in wait_all_completed(client, [later])[later]
        assert client.get("/health/ready").status_code == 200
    assert third.proc is not None and third.proc.poll() is None
