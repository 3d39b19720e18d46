"""No leaks (security cases S15, S19): error answers carry no stack traces, local paths or secrets, and
``/files/`` serves only the files the server wrote, under the names it chose, never through a symlink."""

from __future__ import annotations

import shutil
import socket
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import httpx
import pytest
from starlette.testclient import TestClient

from pipelines.errors import InputError, ModelFileError
from server.app import create_app
from server.settings import load_settings
from tests.api.fal_wire import data_uri
from tests.api.queue_ops import APP, inpaint_input, requests_url, result, status, submit, wait_all_completed
from tests.helpers import noise_image, png
from tests.live import REPO

API_KEY = "sk-live-0123456789abcdefSECRET"
AUTH = {"Authorization": f"Key {API_KEY}"}


def assert_clean(text: str, *local: Path | str) -> None:
    """No traceback, no source line, no local path, no key in an answer."""
    needles = ["Traceback", 'File "', ".py:", API_KEY, str(REPO), sys.prefix, *map(str, local)]
    for needle in needles:
        assert needle not in text, f"{needle!r} leaked in: {text}"


def answers(client: httpx.Client, request_id: str, headers: dict[str, str] | None = None) -> list[str]:
    """Everything a client can read about a request: status with logs, and the result."""
    return [
        client.get(requests_url(request_id, "/status"), params={"logs": "1"}, headers=headers).text,
        client.get(requests_url(request_id), headers=headers).text,
    ]


class LeakyEngine:
    """The real engine, but chosen requests fail with messages full of paths (as library errors are)."""

    def __init__(self, engine: Any, secret_dir: Path) -> None:
        self.engine = engine
        self.secret_dir = secret_dir

    def __getattr__(self, name: str) -> Any:
        return getattr(self.engine, name)

    def prepare(self, request: Any) -> Any:
        if request.prompt == "input error":
            raise InputError("image_url", f"cannot read '{self.secret_dir}/inputs/a.png' (see {REPO}/pipelines)")
        if request.prompt == "model error":
            raise ModelFileError(
                f'Traceback (most recent call last):\n  File "{REPO}/pipelines/engine.py", line 1, in x\n'
                f"ModelFileError: {self.secret_dir}/models/unet.safetensors is truncated"
            )
        return self.engine.prepare(request)

    def run(self, requests: Sequence[Any], should_stop: Any = None, on_progress: Any = None) -> Any:
        if any(r.request.prompt == "crash" for r in requests):
            raise RuntimeError(f"CUDA error in {self.secret_dir}/kernels.cu with key {API_KEY}")
        return self.engine.run(requests, should_stop, on_progress)


def test_failed_requests_say_what_went_wrong_without_internals(
    make_server: Callable[..., Any], engine: Any, tmp_path: Path, small_work: None
) -> None:
    secret_dir = tmp_path / "secret-models"
    server = make_server(engine_override=LeakyEngine(engine, secret_dir), api_keys=[API_KEY])
    data_dir = server.app.state.settings.data_dir
    cases = {
        "not an image": inpaint_input(image_url=data_uri(b"this is not an image")),
        "truncated png": inpaint_input(image_url=data_uri(png(noise_image(64, 48))[:80])),
        "input error": inpaint_input(prompt="input error"),
        "model error": inpaint_input(prompt="model error"),
        "crash": inpaint_input(prompt="crash"),
    }
    with httpx.Client(base_url=server.url, timeout=30, headers=AUTH) as client:
        ids = {}
        for name, body in cases.items():
            response = client.post(f"/queue/{APP}", json=body)
            assert response.status_code == 200, response.text
            ids[name] = response.json()["request_id"]
        bodies = wait_all_completed(client, ids.values())
        for name, request_id in ids.items():
            assert bodies[request_id].get("error"), (name, bodies[request_id])
            for text in answers(client, request_id):
                assert_clean(text, data_dir, secret_dir, tmp_path)
        # Still useful: the field, and what was wrong with it.
        assert bodies[ids["input error"]]["error"].startswith("image_url: cannot read '<path>'")
        assert "is truncated" in bodies[ids["model error"]]["error"]
        assert bodies[ids["crash"]]["error"] == "inference failed: RuntimeError"


def test_unexpected_exceptions_answer_a_bare_500(
    make_server: Callable[..., Any], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    server = make_server(api_keys=[API_KEY])
    data_dir = server.app.state.settings.data_dir

    def broken(*args: Any, **kwargs: Any) -> Any:
        raise RuntimeError(f"database {data_dir}/jobs.sqlite3 is locked (key {API_KEY})")

    monkeypatch.setattr(server.app.state.service, "get", broken)
    with httpx.Client(base_url=server.url, timeout=30, headers=AUTH) as client:
        response = client.get(requests_url("0" * 36, "/status"))
        assert response.status_code == 500
        assert response.json() == {
            "detail": "internal server error",
            "error_type": "internal_error",
            "message": "internal server error",
        }
        assert_clean(response.text, data_dir, tmp_path)


def test_a_model_that_fails_to_load_is_reported_without_its_path(tmp_path: Path) -> None:
    models = tmp_path / "secret-models"
    settings = load_settings(
        {
            "data_dir": tmp_path / "data",
            "warmup": False,
            "api_keys": [API_KEY],
            "apps": ["fast-lightning-sdxl:4"],
            "model_paths": {"base": str(models / "base"), "fast-lightning-sdxl:4": str(models / "unet.safetensors")},
        }
    )
    app = create_app(settings)
    with TestClient(app) as client:
        deadline = time.monotonic() + 60
        while (ready := client.get("/health/ready")).json()["status"] != "failed":
            assert time.monotonic() < deadline, ready.text
            time.sleep(0.05)
        assert str(models) in app.state.host.error  # the log and the operator see it; clients do not
        refused = client.post(f"/queue/{APP}", json=inpaint_input(), headers=AUTH)
        assert refused.status_code == 500 and refused.json()["error_type"] == "engine_unavailable"
        for response in (ready, refused):
            assert "ModelFileError" in response.text and "<path>" in response.text
            assert_clean(response.text, models, tmp_path)


# ---------------------------------------------------------------------- /files


def raw_get(port: int, target: str) -> tuple[int, bytes]:
    """GET ``target`` byte for byte (httpx would normalise ``..`` and percent-escapes away)."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(f"GET {target} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n".encode())
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    return int(head.split()[1]), body


def test_path_traversal_never_reaches_a_file(make_server: Callable[..., Any]) -> None:
    server = make_server()
    with httpx.Client(base_url=server.url, timeout=30) as client:
        request_id = submit(client, seed=1)
        wait_all_completed(client, [request_id])
    targets = [
        "/files/../../etc/passwd",
        "/files/../jobs.sqlite3",
        f"/files/{request_id}/../../jobs.sqlite3",
        f"/files/{request_id}/..",
        "/files/%2e%2e%2f%2e%2e%2fetc%2fpasswd",
        f"/files/{request_id}/%2e%2e%2f%2e%2e%2fjobs.sqlite3",
        f"/files/%2e%2e/{request_id}",
        "/files/..%5c..%5cetc%5cpasswd",
        f"/files/{request_id}/..%5c..%5cjobs.sqlite3",
        "/files/%2e%2e%5c%2e%2e%5cupload-secret.key/x.png",
        f"/files/{request_id}/0.png%00.png",
        "/files/" + "/".join([".."] * 8) + "/etc/passwd",
    ]
    for target in targets:
        code, body = raw_get(server.port, target)
        assert code in (400, 404), (target, code, body[:200])
        assert b"root:" not in body and b"SQLite" not in body, target


def test_only_server_written_files_are_served_and_symlinks_are_refused(
    make_server: Callable[..., Any], tmp_path: Path
) -> None:
    server = make_server()
    results_dir = server.app.state.settings.data_dir / "files"
    outside = tmp_path / "outside"
    outside.mkdir()
    with httpx.Client(base_url=server.url, timeout=30) as client:
        first, second = submit(client, seed=1), submit(client, seed=2)
        wait_all_completed(client, [first, second])
        url = httpx.URL(result(client, first)["images"][0]["url"]).path
        served = client.get(url)
        assert served.status_code == 200
        assert served.headers["content-type"] == "image/png"
        assert served.headers["x-content-type-options"] == "nosniff"
        image = results_dir / first / "0.png"
        assert served.content == image.read_bytes()

        def refused(path: str = url) -> None:
            response = client.get(path)
            assert response.status_code == 404, (path, response.status_code)
            assert_clean(response.text, results_dir)

        # A file the server did not write, under a name it could have chosen.
        shutil.copy(image, results_dir / first / "1.png")
        refused(url.replace("0.png", "1.png"))

        # The image replaced by a symlink: to a file outside, or to another request's real image.
        saved = image.read_bytes()
        (outside / "secret.png").write_bytes(b"\x89PNG secret")
        for target in (outside / "secret.png", results_dir / second / "0.png", Path("/etc/passwd")):
            image.unlink()
            image.symlink_to(target)
            refused()
        image.unlink()
        image.write_bytes(saved)
        assert client.get(url).status_code == 200

        # The request's folder replaced by a symlink to a folder holding the same name.
        (outside / "0.png").write_bytes(saved)
        shutil.rmtree(results_dir / first)
        (results_dir / first).symlink_to(outside, target_is_directory=True)
        refused()
        # A symlink loop is a 404 too, not a 500.
        (results_dir / first).unlink()
        (results_dir / first).mkdir()
        (results_dir / first / "0.png").symlink_to(results_dir / first / "0.png")
        refused()
        assert status(client, first)["status"] == "COMPLETED"


def test_uploads_are_served_only_from_the_file_the_upload_wrote(
    make_server: Callable[..., Any], tmp_path: Path
) -> None:
    server = make_server()
    uploads = server.app.state.settings.data_dir / "uploads"
    with httpx.Client(base_url=server.url, timeout=30) as client:
        initiated = client.post("/storage/upload/initiate", json={"content_type": "image/png", "file_name": "a.png"})
        assert initiated.status_code == 200, initiated.text
        path = httpx.URL(initiated.json()["upload_url"]).path
        assert client.put(path, content=b"\x89PNG upload").status_code == 200
        served = client.get(path)
        assert served.status_code == 200 and served.content == b"\x89PNG upload"
        assert served.headers["x-content-type-options"] == "nosniff"

        token = path.split("/")[2]
        (tmp_path / "secret").write_bytes(b"secret bytes")
        (uploads / token).unlink()
        (uploads / token).symlink_to(tmp_path / "secret")
        refused = client.get(path)
        assert refused.status_code == 404 and b"secret" not in refused.content
