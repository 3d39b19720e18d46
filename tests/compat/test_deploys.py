"""A deploy as the real fal clients see it: the server drains on SIGTERM while a batch runs, and restarts.

While it drains, ``fal_client.submit`` (Python, recipe B: URL constants patched) and ``fal.queue.submit``
(``@fal-ai/client`` in Node, custom ``fetch``) are taken, ``status`` and ``cancel`` answer, and a sync run is
refused with a retryable 503. Both clients then wait for their request across the restart, as a user's
``handle.get()`` / ``subscribeToStatus`` would (their polls retry the refused connections), and get its
result from the restarted server on the same port and data directory.
"""

from __future__ import annotations

import json
import os
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import fal_client
import fal_client.client
import httpx
import pytest

from server.app import create_app
from server.jobs.job import JobState
from server.jobs.store.sqlite import SqliteStore
from server.settings import load_settings
from tests.api import fal_wire as wire
from tests.compat.test_node_clients import NODE, NODE_DIR, UUID, ok
from tests.helpers import box_mask, noise_image, png
from tests.live import DrainingLiveServer, GatedEngine

LIGHTNING = wire.LIGHTNING
SEED_JS, SEED_JS_CANCELLED, SEED_PY, SEED_PY_CANCELLED = 21, 22, 31, 32

pytestmark = pytest.mark.skipif(NODE is None, reason="node is not installed (the JS client needs Node >= 18)")


def _reset_module_clients() -> None:
    """``fal_client``'s module-level clients cache their credentials and HTTP client: start afresh."""
    for client in (fal_client.sync_client, fal_client.async_client):
        for name in ("_auth", "_client", "_token_manager"):
            client.__dict__.pop(name, None)


@pytest.fixture
def serve(tmp_path: Path) -> Iterator[Callable[..., DrainingLiveServer]]:
    """``serve(engine, port=None)``: the app on ``tmp_path/data`` (one request per batch, a long grace period)."""
    servers: list[DrainingLiveServer] = []

    def start(engine: Any, port: int | None = None) -> DrainingLiveServer:
        settings = {"data_dir": tmp_path / "data", "warmup": False, "max_batch_size": 1, "drain_grace_s": 60}
        servers.append(DrainingLiveServer(create_app(load_settings(settings), engine=engine), port=port).start())
        return servers[-1]

    yield start
    for server in servers:
        server.stop()


@pytest.fixture
def python_client(monkeypatch: pytest.MonkeyPatch) -> Iterator[Callable[[str], None]]:
    """Point the module-level ``fal_client`` at a base URL (the spec's recipe B)."""
    monkeypatch.setenv("FAL_KEY", "any-key")
    _reset_module_clients()

    def point(base: str) -> None:
        monkeypatch.setattr(fal_client.client, "RUN_URL_FORMAT", f"{base}/")
        monkeypatch.setattr(fal_client.client, "QUEUE_URL_FORMAT", f"{base}/queue/")

    yield point
    _reset_module_clients()


class NodeScenario:
    """``node drain.mjs`` in the background: its ``EVENT`` lines as they come, its observations at the end."""

    def __init__(self, base: str, image: Path, mask: Path) -> None:
        env = {k: v for k, v in os.environ.items() if not k.startswith("FAL_")}
        args = [str(NODE), "drain.mjs", f"--base={base}", f"--image={image}", f"--mask={mask}"]
        self.proc = subprocess.Popen(
            args, cwd=NODE_DIR, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        self.lines: list[str] = []
        self.submitted = threading.Event()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.append(line)
            if line.startswith("EVENT submitted"):
                self.submitted.set()

    def observations(self, timeout: float = 60) -> dict[str, Any]:
        try:
            code = self.proc.wait(timeout)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
        self._reader.join(10)
        stderr = self.proc.stderr.read() if self.proc.stderr else ""
        assert code == 0 and self.lines, f"node drain.mjs failed (rc {code}):\n{''.join(self.lines)}\n{stderr}"
        return json.loads(self.lines[-1])


def small_input(seed: int) -> dict[str, Any]:
    return {
        "image_url": wire.data_uri(png(noise_image(64, 48))),
        "mask_url": wire.data_uri(png(box_mask(64, 48))),
        "prompt": "a lighthouse at dusk",
        "image_size": {"width": 64, "height": 48},
        "num_inference_steps": "2",
        "seed": seed,
    }


def wait_draining(client: httpx.Client) -> None:
    deadline = time.monotonic() + 10
    while (ready := client.get("/health/ready")).status_code == 200:
        assert time.monotonic() < deadline, "the server never started draining"
        time.sleep(0.01)
    assert ready.json()["status"] == "draining", ready.text


def test_clients_submit_while_the_server_drains_and_get_results_after_the_restart(
    engine: Any, serve: Callable[..., DrainingLiveServer], python_client: Callable[[str], None], tmp_path: Path
) -> None:
    image, mask = tmp_path / "image.png", tmp_path / "mask.png"
    image.write_bytes(png(noise_image(64, 48)))
    mask.write_bytes(png(box_mask(64, 48)))
    gate = GatedEngine(engine)
    gate.hold = True
    first = serve(gate)
    python_client(first.url)
    got: dict[str, Any] = {}
    try:
        with httpx.Client(base_url=first.url, timeout=30) as client:
            blocker = client.post(f"/queue/{LIGHTNING}", json=wire.inpaint_input(seed=1)).json()["request_id"]
            assert gate.started.wait(30)
            first.sigterm()  # a deploy: the running batch gets its grace period
            wait_draining(client)

            node = NodeScenario(first.url, image, mask)
            handle = fal_client.submit(LIGHTNING, arguments=small_input(SEED_PY))
            queued = handle.status()
            other = fal_client.submit(LIGHTNING, arguments=small_input(SEED_PY_CANCELLED))
            other.cancel()
            cancelled = other.status()
            with pytest.raises(fal_client.FalClientHTTPError) as refused:
                fal_client.run(LIGHTNING, arguments=small_input(41))
            waiter = threading.Thread(target=lambda: got.update(result=handle.get()), daemon=True)
            waiter.start()  # polls on across the restart
            assert node.submitted.wait(30), "".join(node.lines)
    finally:
        gate.release.set()  # the blocker finishes; the drain ends; the server exits
    assert first.exited(30), "the first server did not exit after its batch"

    assert isinstance(queued, fal_client.Queued)
    assert isinstance(cancelled, fal_client.Completed) and cancelled.error_type == "cancelled"
    assert (refused.value.status_code, refused.value.error_type) == (503, "draining")
    assert "submit to the queue" in str(refused.value.message)
    store = SqliteStore(tmp_path / "data" / "jobs.sqlite3")
    try:
        jobs = {job.seed: job for job in (store.get(j.id) for j in store.unfinished())}
        assert store.get(blocker).state is JobState.SUCCEEDED
    finally:
        store.close()
    assert sorted(jobs) == [SEED_JS, SEED_PY] and all(j.state is JobState.QUEUED for j in jobs.values())

    second = serve(engine, port=first.port)  # the new version, same port and data directory
    obs = node.observations()
    waiter.join(60)
    assert got["result"]["seed"] == SEED_PY and len(got["result"]["images"]) == 1

    submitted = ok(obs["submit"], "submit while draining")
    assert UUID.match(submitted["request_id"]) and submitted["request_id"] == jobs[SEED_JS].id
    assert ok(obs["status"], "status while draining")["status"] == "IN_QUEUE"
    other_js = ok(obs["cancelled"], "submit and cancel while draining")
    assert other_js["status"]["status"] == "COMPLETED" and other_js["status"]["error_type"] == "cancelled"
    final = ok(obs["final"], "waiting across the restart")
    assert final["status"]["status"] == "COMPLETED" and final["seed"] == SEED_JS
    assert final["requestId"] == submitted["request_id"]
    refused_polls = [c for c in obs["calls"] if "status" not in c]  # calls that got no answer: the restart
    assert refused_polls, "the client never saw the server down; the test did not straddle a restart"
    assert not [c for c in obs["calls"] if c.get("refused")]
    assert second.app.state.store.get(jobs[SEED_JS].id).attempts == 1
