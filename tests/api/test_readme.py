"""The README's copy-paste commands, run as they are: the queue with ``curl``, and the TLS files from ``openssl``."""

from __future__ import annotations

import json
import re
import shutil
import ssl
import subprocess
import sys
import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.live import REPO

README = (REPO / "README.md").read_text()
DEMO_PORT = "localhost:8000"  # where the README's commands expect the server


def bash_block_after(anchor: str) -> str:
    """The first fenced ``bash`` block after the README text ``anchor``."""
    match = re.compile(r"```bash\n(.*?)```", re.S).search(README, README.index(anchor))
    assert match is not None, f"no bash block after {anchor!r}"
    return match.group(1)


def run_bash(script: str, cwd: Path, timeout: float = 120) -> str:
    """``script`` in ``bash -euo pipefail`` (a failing command fails the test); its stdout."""
    proc = subprocess.run(
        ["bash", "-euo", "pipefail", "-c", script], cwd=cwd, capture_output=True, text=True, timeout=timeout
    )
    assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stdout}\n{proc.stderr}"
    return proc.stdout


class HoldUntilCancelled:
    """The real engine, except that every run after the first waits after its first step until it is cancelled:
    the README's cancel then always meets a running request, however fast the machine."""

    def __init__(self, engine: Any) -> None:
        self.engine = engine
        self.runs = 0
        self.release = threading.Event()  # set when the test ends, so that no engine thread is left waiting

    def __getattr__(self, name: str) -> Any:
        return getattr(self.engine, name)

    def run(self, requests: Sequence[Any], should_stop: Callable | None = None, on_progress: Callable | None = None):
        self.runs += 1
        hold = self.runs > 1

        def progress(request_id: str, step: int, total: int) -> None:
            if on_progress is not None:
                on_progress(request_id, step, total)
            while hold and should_stop is not None and not should_stop(request_id):
                if self.release.wait(0.02):
                    return

        return self.engine.run(requests, should_stop, progress)


def split_output(stdout: str) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """The JSON answers the commands printed, in order, and the status stream's events apart."""
    answers, events = [], []
    for line in filter(None, stdout.splitlines()):
        if line.startswith("data:"):
            events.append(json.loads(line[len("data:") :]))
        elif not line.startswith(":"):  # SSE comments (keep-alives)
            answers.append(json.loads(line))
    return answers, events


@pytest.mark.skipif(shutil.which("curl") is None, reason="the README's queue example uses curl")
def test_readme_queue_example_runs_as_written(make_server, engine, tmp_path: Path, request) -> None:
    gate = HoldUntilCancelled(engine)
    server = make_server(engine_override=gate)
    request.addfinalizer(gate.release.set)
    # The README's own inputs: photo.png and mask.png from the demo, IMG and MASK from "Run the server".
    demo = re.search(r"python - <<'PY'\n(.*?)\nPY\n", README, re.S)
    assert demo is not None
    subprocess.run([sys.executable, "-c", demo.group(1)], cwd=tmp_path, check=True, timeout=60)
    inputs = re.search(r"^IMG=.*$", README, re.M)
    assert inputs is not None
    script = inputs.group(0) + "\n" + bash_block_after("### The queue with `curl`")
    assert script.count(DEMO_PORT) == 1, "the block should name the server once (APP=...)"

    answers, events = split_output(run_bash(script.replace(DEMO_PORT, server.hostport), tmp_path))

    submitted, status, result, late_cancel, cancel, cancelled = answers
    rid = submitted["request_id"]
    assert submitted["status"] == "IN_QUEUE" and submitted["status_url"].endswith(f"/requests/{rid}/status")
    assert status["status"] in ("IN_QUEUE", "IN_PROGRESS", "COMPLETED") and status["request_id"] == rid
    assert "Request queued" in [log["message"] for log in status["logs"]]
    assert events[-1]["status"] == "COMPLETED" and all(e["request_id"] == rid for e in events)
    assert "error" not in events[-1]
    assert [(i["width"], i["height"]) for i in result["images"]] == [(512, 384)]
    assert result["images"][0]["url"].startswith(f"http://{server.hostport}/files/{rid}/")
    assert result["prompt"] == "a red balloon"
    assert late_cancel["status"] == "ALREADY_COMPLETED"
    assert cancel == {"status": "CANCELLATION_REQUESTED"}
    assert cancelled["error_type"] == "cancelled" and "cancelled" in cancelled["detail"]
    assert gate.runs == 2  # the second request did start, and the cancel stopped it


def test_readme_tls_commands_make_files_the_server_and_strict_clients_accept(make_server, tmp_path: Path) -> None:
    if shutil.which("openssl") is None:
        pytest.skip("the README's TLS recipe uses openssl")
    block = bash_block_after("a private one made with OpenSSL 3")
    assert block.count("gpu-box") == 2
    run_bash(block.replace("gpu-box", "localhost"), tmp_path)
    server = make_server(ssl_certfile=tmp_path / "server.pem", ssl_keyfile=tmp_path / "server.key")
    # Trusting ca.pem alone, with the checks Python 3.13 turns on by default (strict X.509).
    context = ssl.create_default_context(cafile=str(tmp_path / "ca.pem"))
    context.verify_flags |= ssl.VERIFY_X509_STRICT
    response = httpx.get(f"https://localhost:{server.port}/health/live", verify=context, timeout=30)
    assert response.status_code == 200
    with pytest.raises(httpx.ConnectError, match="CERTIFICATE_VERIFY_FAILED"):
        httpx.get(f"https://localhost:{server.port}/health/live", timeout=30)  # the system's CAs do not know it
