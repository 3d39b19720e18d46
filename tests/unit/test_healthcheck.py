"""``inpaint-server health``: the image's HEALTHCHECK and the README's wait-until-ready."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from fastapi import FastAPI
from fastapi.responses import JSONResponse

from server.healthcheck import local_url
from server.settings import Settings
from tests.live import LiveServer, free_port

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def fake_server():
    """A server whose /health/ready answers what ``state["ready"]`` says (a reason while it is not)."""
    state = {"ready": True, "asked": 0}
    app = FastAPI()

    @app.get("/health/live")
    def live() -> dict:
        return {"status": "ok"}

    @app.get("/health/ready")
    def ready() -> JSONResponse:
        state["asked"] += 1
        if state["ready"]:
            return JSONResponse({"status": "ready"})
        if state.get("failed"):
            detail = "ModelFileError: 3 model files are missing ... Fetch them with `inpaint-server download`"
            return JSONResponse({"status": "failed", "detail": detail}, status_code=503)
        return JSONResponse({"status": "loading", "detail": "models are loading"}, status_code=503)

    with LiveServer(app) as server:
        yield server, state


def health(*args: str, **env: str) -> subprocess.CompletedProcess:
    environment = {k: v for k, v in os.environ.items() if not k.startswith("INPAINT_")}
    environment |= {"PYTHONPATH": str(ROOT), **env}
    return subprocess.run(
        [sys.executable, "-m", "server.cli", "health", *args],
        env=environment,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_live_and_ready_exit_0_with_the_body(fake_server) -> None:
    server, _ = fake_server
    live = health("--url", server.url)
    assert live.returncode == 0 and '"ok"' in live.stdout
    ready = health("--url", server.url, "--ready")
    assert ready.returncode == 0 and '"ready"' in ready.stdout


def test_not_ready_exits_1_with_the_servers_reason(fake_server) -> None:
    server, state = fake_server
    state["ready"] = False
    proc = health("--url", server.url, "--ready")
    assert proc.returncode == 1
    assert "503 loading: models are loading" in proc.stderr and proc.stdout == ""
    assert health("--url", server.url).returncode == 0  # still live


def test_wait_reports_each_reason_once_then_succeeds(fake_server) -> None:
    server, state = fake_server
    state["ready"] = False
    flip = threading.Timer(2.5, lambda: state.update(ready=True))
    flip.start()
    try:
        proc = health("--url", server.url, "--ready", "--wait", "30")
    finally:
        flip.cancel()
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr.count("not ready yet: 503 loading: models are loading") == 1, proc.stderr
    assert state["asked"] >= 3  # it kept asking, once a second, but said so once


def test_wait_stops_at_once_when_the_models_failed_to_load(fake_server) -> None:
    """Waiting cannot help a server whose models are missing: exit 1 with its reason, not after --wait."""
    server, state = fake_server
    state.update(ready=False, failed=True, asked=0)
    started = time.monotonic()
    proc = health("--url", server.url, "--ready", "--wait", "600")
    assert proc.returncode == 1 and time.monotonic() - started < 60
    assert state["asked"] == 1
    assert "/health/ready: cannot become ready: 503 failed: ModelFileError: 3 model files" in proc.stderr
    assert "`inpaint-server download`" in proc.stderr


def test_no_server_is_a_clear_failure() -> None:
    port = free_port()
    proc = health("--url", f"http://127.0.0.1:{port}", "--wait", "1")
    assert proc.returncode == 1
    assert f"http://127.0.0.1:{port} does not answer: ConnectError" in proc.stderr


def test_url_comes_from_the_servers_settings(fake_server) -> None:
    """Without --url: the port from INPAINT_PORT, loopback for 0.0.0.0 (as in the image)."""
    server, _ = fake_server
    proc = health(INPAINT_HOST="0.0.0.0", INPAINT_PORT=str(server.port))
    assert proc.returncode == 0, proc.stderr
    bad = health(INPAINT_PORT="not-a-port")
    assert bad.returncode == 2 and "port" in bad.stderr


@pytest.mark.parametrize(
    ("host", "tls", "url"),
    [
        ("0.0.0.0", False, "http://127.0.0.1:8000"),
        ("::", False, "http://[::1]:8000"),
        ("10.1.2.3", False, "http://10.1.2.3:8000"),
        ("127.0.0.1", True, "https://127.0.0.1:8000"),
    ],
)
def test_local_url(host: str, tls: bool, url: str, tmp_path: Path) -> None:
    files = {}
    if tls:
        for name in ("tls_cert", "tls_key"):
            (tmp_path / name).write_text("pem")
            files[name] = tmp_path / name
    settings = Settings(host=host, port=8000, data_dir=tmp_path, **files)
    assert local_url(settings) == url
