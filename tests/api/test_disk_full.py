"""A full disk (issue 13, item 22), on small tmpfs mounts made by the test, with the real Python fal client.

* The default layout (job store and files on one disk, ``disk_reserve_bytes`` set): submits, sync runs and uploads
  get 507 ``insufficient_storage`` before anything is written (the JS client too, which does not retry it);
  ``/health/ready`` says so; a request running when the disk filled and one queued then finish once space is
  freed, without a restart.
* The real failures (store and files on two disks, no reserve): an upload whose bytes find no space, a request
  whose images cannot be written (it fails clearly, and that failure is stored) and a submit whose row finds no
  space (``SQLITE_FULL``) each get a clear 507, and leave nothing behind.

Both end with a restart: every request answers what clients saw before it.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import fal_client
import fal_client.client
import httpx
import pytest

import server.disk_space
from tests.api import fal_wire
from tests.compat.test_node_clients import NODE, NODE_DIR, run_node
from tests.disk import fill
from tests.helpers import noise_image, png
from tests.live import GatedEngine, LiveServer

KEY = "disk-key"
APP = fal_wire.LIGHTNING
PNG = png(noise_image(64, 48, seed=5))


@pytest.fixture
def client(monkeypatch: pytest.MonkeyPatch) -> Callable[[LiveServer], fal_client.SyncClient]:
    """``client(server)``: the real Python client, pointed at ``server`` (spec §8.1 recipe B)."""

    def point(server: LiveServer) -> fal_client.SyncClient:
        monkeypatch.setattr(fal_client.client, "RUN_URL_FORMAT", f"{server.url}/")
        monkeypatch.setattr(fal_client.client, "QUEUE_URL_FORMAT", f"{server.url}/queue/")
        monkeypatch.setattr(fal_client.client, "REST_URL", server.url)
        monkeypatch.setattr(fal_client.client, "CDN_URL", server.url)
        return fal_client.SyncClient(key=KEY)

    monkeypatch.setattr(server.disk_space, "CHECK_EVERY_S", 0.1)
    return point


def refused(call: Callable[[], Any]) -> fal_client.client.FalClientHTTPError:
    """The 507 a client call gets on a full disk (neither fal client retries 507)."""
    with pytest.raises(fal_client.client.FalClientHTTPError) as caught:
        call()
    assert caught.value.status_code == 507, caught.value
    assert caught.value.error_type == "insufficient_storage"
    assert "disk" in caught.value.message and "full" in caught.value.message
    return caught.value


def js_client_refused(server: LiveServer, tmp_path: Path) -> None:
    """``@fal-ai/client`` (proxy protocol): a submit and a Blob upload each get the 507 once, with its reason.
    Checked wherever Node is installed (CI); the fal JS packages must then be too."""
    if NODE is None:
        return
    assert (NODE_DIR / "node_modules" / "@fal-ai" / "client").is_dir(), "run `npm ci --prefix tests/compat/node`"
    image = tmp_path / "in.png"
    image.write_bytes(PNG)
    seen = run_node("disk_full.mjs", "--base", server.url, "--image", str(image), "--key", KEY)
    for step in ("submit", "upload"):
        error = seen[step]["error"]
        assert (error["status"], error["isApiError"]) == (507, True), seen
        assert "disk" in error["message"] and "full" in error["message"], seen
    assert [call["status"] for call in seen["calls"]] == [507, 507], seen  # one call each: neither retried
    assert seen["elapsedMs"] < 5000, seen


def ready(server: LiveServer) -> httpx.Response:
    return httpx.get(f"{server.url}/health/ready")


def wait_ready(server: LiveServer, code: int, timeout: float = 10.0) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while (response := ready(server)).status_code != code:
        assert time.monotonic() < deadline, response.text
        time.sleep(0.05)
    return response.json()


def answer(server: LiveServer, request_id: str) -> tuple[int, Any]:
    """The result route's answer (status code, body) once the request has completed."""
    url = fal_wire.request_url(server.url, APP, request_id)
    headers = {"Authorization": f"Key {KEY}"}
    deadline = time.monotonic() + 30
    while (status := httpx.get(f"{url}/status", headers=headers)).json()["status"] != "COMPLETED":
        assert time.monotonic() < deadline, status.text
        time.sleep(0.05)
    response = httpx.get(url, headers=headers)
    return response.status_code, response.json()


def status(server: LiveServer, request_id: str) -> dict[str, Any]:
    url = fal_wire.request_url(server.url, APP, request_id, "/status")
    return httpx.get(url, params={"logs": "1"}, headers={"Authorization": f"Key {KEY}"}).json()


def job_count(server: LiveServer) -> int:
    return sum(server.app.state.store.counts().values())


def upload_count(server: LiveServer) -> int:
    return len(server.app.state.store.expired_uploads(float("inf")))


def listing(root: Path) -> set[str]:
    """Every file under ``root`` but the filler: what the server wrote there."""
    return {str(p.relative_to(root)) for p in root.rglob("*") if p.is_file() and p.name != "filler"}


def check_restart(make: Callable[[], LiveServer], seen: dict[str, tuple[int, Any]]) -> None:
    """After a restart, every request answers exactly what clients saw before."""
    restarted = make()
    for request_id, before in seen.items():
        assert answer(restarted, request_id) == before, request_id


def test_a_full_disk_refuses_new_work_and_finishes_what_it_took(
    tmpfs: Callable[[str, int], Path],
    make_server: Callable[..., LiveServer],
    engine: Any,
    client: Callable,
    tmp_path: Path,
) -> None:
    disk = tmpfs("data", 8192)
    gate = GatedEngine(engine)
    settings = {"data_dir": disk, "api_keys": [KEY], "disk_reserve_bytes": 1 << 20}
    server = make_server(engine_override=gate, **settings)
    fal = client(server)
    seen = {}
    done = fal.submit(APP, fal_wire.inpaint_input(seed=1)).request_id
    seen[done] = answer(server, done)
    gate.hold = True
    running = fal.submit(APP, fal_wire.inpaint_input(seed=2)).request_id
    assert gate.started.wait(30)
    queued = fal.submit(APP, fal_wire.inpaint_input(seed=3)).request_id
    jobs, uploads, written = job_count(server), upload_count(server), listing(disk)

    filler = fill(disk)
    body = wait_ready(server, 503)
    assert body["status"] == "insufficient_storage"
    assert "job store" in body["detail"] and "full" in body["detail"]
    refused(lambda: fal.submit(APP, fal_wire.inpaint_input()))
    refused(lambda: fal.run(APP, fal_wire.inpaint_input()))
    refused(lambda: fal.upload(PNG, "image/png", "in.png"))  # fal's CDN flow, then its fallback (initiate + PUT)
    js_client_refused(server, tmp_path)
    assert (job_count(server), upload_count(server), listing(disk)) == (jobs, uploads, written)

    gate.hold = False
    gate.release.set()  # the running request's images find no space; the GPU takes no new batch
    time.sleep(0.5)
    assert status(server, queued)["status"] == "IN_QUEUE"
    assert ready(server).status_code == 503

    filler.unlink()
    wait_ready(server, 200)
    for request_id in (running, queued):  # finished without a restart: with their images, or failed clearly
        code, body = seen[request_id] = answer(server, request_id)
        logs = [(line["level"], line["message"]) for line in status(server, request_id)["logs"]]
        if request_id == queued or code == 200:
            [image] = body["images"]
            assert httpx.get(image["url"]).status_code == 200
            assert [m for _, m in logs if m.startswith("Done in")] and not [m for lv, m in logs if lv == "ERROR"]
        else:
            assert (code, body["error_type"]) == (507, "insufficient_storage"), body
        assert len([m for _, m in logs if m.startswith("Done in") or "disk is full" in m]) == 1, logs  # one outcome
    server.stop()
    check_restart(lambda: make_server(engine_override=engine, **settings), seen)


def test_writes_that_find_no_space_fail_clearly_and_leave_nothing(
    tmpfs: Callable[[str, int], Path], make_server: Callable[..., LiveServer], engine: Any, client: Callable
) -> None:
    store_disk, files_disk = tmpfs("store", 8192), tmpfs("files", 1024)
    gate = GatedEngine(engine)
    settings = {"data_dir": store_disk, "files": str(files_disk), "api_keys": [KEY], "disk_reserve_bytes": 0}
    server = make_server(engine_override=gate, **settings)
    fal = client(server)
    gate.hold = True
    running = fal.submit(APP, fal_wire.inpaint_input(seed=4)).request_id
    assert gate.started.wait(30)

    # The files' disk: an upload's bytes, then a result's images, find no space.
    filler = fill(files_disk)
    uploads = upload_count(server)
    refused(lambda: fal.upload(PNG, "image/png", "in.png"))
    assert upload_count(server) == uploads and listing(files_disk / "uploads") == set()
    body = wait_ready(server, 503)
    assert "result files and uploads" in body["detail"] and "job store" not in body["detail"]
    gate.hold = False
    gate.release.set()
    code, body = answer(server, running)  # at once: the failure could be stored
    assert (code, body["error_type"]) == (507, "insufficient_storage")
    assert "disk is full" in body["detail"]
    assert not (files_disk / "files" / running).exists()
    seen = {running: (code, body)}
    filler.unlink()
    wait_ready(server, 200)

    # The store's disk: a submit's row finds no space (SQLITE_FULL).
    filler = fill(store_disk)
    jobs = job_count(server)
    refused(lambda: fal.submit(APP, fal_wire.inpaint_input()))
    assert job_count(server) == jobs
    body = wait_ready(server, 503)
    assert "job store" in body["detail"] and "result files" not in body["detail"]
    filler.unlink()
    wait_ready(server, 200)
    after = fal.submit(APP, fal_wire.inpaint_input(seed=6)).request_id
    seen[after] = answer(server, after)
    assert seen[after][0] == 200
    server.stop()
    check_restart(lambda: make_server(engine_override=engine, **settings), seen)
