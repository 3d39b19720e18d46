"""The real fal clients' storage features against the server: object lifecycles (uploads made with
``StorageSettings(expires_in=...)`` / ``lifecycle: {expiresIn}``, outputs of a request made with
``X-Fal-Object-Lifecycle-Preference``), multipart uploads (Python over its lowered threshold, JS over its fixed
90 MB one), and where ``fal_client.upload*`` sends the API key under the environment-variable recipe."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import ssl
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import certifi
import fal_client
import fal_client.client
import httpx
import pytest
from fal_client import StorageSettings

from tests.compat import test_node_clients
from tests.compat.certs import make_tls_files
from tests.compat.test_python_client import KEY, _reset_module_clients, base_input
from tests.helpers import box_mask, noise_image, png
from tests.live import LOOPBACK, LiveServer

LIGHTNING = "fal-ai/fast-lightning-sdxl/inpainting"
GC_S = 0.2  # the collector's period in these tests: expired files are deleted this soon after they expire
JS_MULTIPART_BYTES = 90 * 1024 * 1024 + 1  # the JS client uploads a Blob in parts above 90 MB
node_modules = test_node_clients.node_modules  # the fixture that checks Node and the JS clients are installed


@pytest.fixture
def python_client(make_server: Callable[..., LiveServer], monkeypatch: pytest.MonkeyPatch) -> Iterator[Callable]:
    """``start(**settings)``: a plain-HTTP server (key ``KEY``) with the in-process client pointed at it."""
    monkeypatch.setenv("FAL_KEY", KEY)
    _reset_module_clients()

    def start(**settings: Any) -> LiveServer:
        server = make_server(api_keys=[KEY], gc_interval_s=GC_S, fetch_allow=LOOPBACK, **settings)
        monkeypatch.setattr(fal_client.client, "RUN_URL_FORMAT", f"{server.url}/")
        monkeypatch.setattr(fal_client.client, "QUEUE_URL_FORMAT", f"{server.url}/queue/")
        monkeypatch.setattr(fal_client.client, "REST_URL", server.url)
        monkeypatch.setattr(fal_client.client, "CDN_URL", server.url)
        return server

    yield start
    _reset_module_clients()


def upload_row(server: LiveServer, url: str) -> Any:
    token = httpx.URL(url).path.split("/")[2]
    return server.app.state.store.get_upload(token)


def wait_gone(url: str, timeout: float, verify: Any = True) -> float:
    """Poll ``url`` until it answers 404; returns when (monotonic)."""
    deadline = time.monotonic() + timeout
    while (status := httpx.get(url, verify=verify).status_code) == 200:
        assert time.monotonic() < deadline, f"{url} still served after {timeout} s"
        time.sleep(0.05)
    assert status == 404, status
    return time.monotonic()


def wait_deleted(path: Path, timeout: float = GC_S + 2) -> None:
    deadline = time.monotonic() + timeout
    while path.exists():
        assert time.monotonic() < deadline, f"{path} still on disk {timeout} s after it expired"
        time.sleep(0.05)


def test_python_upload_lifecycles_expire_on_time_and_never_outlive_the_retention(python_client) -> None:
    """``StorageSettings(expires_in=1)``: served, then 404 and deleted from disk about a second later; ``"1d"`` on a
    server that keeps files an hour is kept an hour; no lifecycle, the retention."""
    server = python_client(result_retention_s=3600)
    data = png(noise_image(64, 48, seed=8))
    short = fal_client.upload(data, "image/png", file_name="short.png", lifecycle=StorageSettings(expires_in=1))
    day = fal_client.upload(data, "image/png", file_name="day.png", lifecycle=StorageSettings(expires_in="1d"))
    plain = asyncio.run(fal_client.AsyncClient().upload(data, "image/png", file_name="plain.png"))
    assert httpx.get(short).content == httpx.get(day).content == httpx.get(plain).content == data

    rows = {name: upload_row(server, url) for name, url in (("short", short), ("day", day), ("plain", plain))}
    assert rows["short"].lifetime_s == 1 and rows["day"].lifetime_s is None and rows["plain"].lifetime_s is None
    for name in ("day", "plain"):  # kept for the retention, never longer
        assert 3590 < rows[name].expires_at - time.time() <= 3600, name
    assert rows["short"].expires_at - time.time() <= 1

    wait_gone(short, timeout=5)
    wait_deleted(server.app.state.settings.data_dir / "uploads" / rows["short"].token)
    assert httpx.get(day).status_code == httpx.get(plain).status_code == 200


def test_request_lifecycle_header_expires_that_requests_files_only(python_client) -> None:
    """``X-Fal-Object-Lifecycle-Preference`` (Python: ``headers=``): that request's image is 404 and deleted a
    second after it completed, its result JSON stays for the retention; another request's image is kept."""
    server = python_client()
    preference = {"X-Fal-Object-Lifecycle-Preference": json.dumps({"expiration_duration_seconds": 1})}
    short = fal_client.submit(LIGHTNING, base_input(seed=5), headers=preference)
    kept = fal_client.submit(LIGHTNING, base_input(seed=6))
    short_output, kept_output = short.get(), kept.get()
    short_url, kept_url = short_output["images"][0]["url"], kept_output["images"][0]["url"]
    assert httpx.get(short_url).status_code == httpx.get(kept_url).status_code == 200

    wait_gone(short_url, timeout=5)
    wait_deleted(server.app.state.settings.data_dir / "files" / short.request_id)
    assert httpx.get(kept_url).status_code == 200
    assert fal_client.result(LIGHTNING, short.request_id) == short_output  # the result keeps its (dead) URL
    assert fal_client.status(LIGHTNING, short.request_id).__class__.__name__ == "Completed"


def test_python_multipart_uploads(python_client, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """``upload``, ``upload_file`` and the async ``upload`` over the client's multipart threshold (lowered here
    from 100 MiB, the default upload_max_bytes, to 1 MiB in 256 KiB parts sent 10 at a time) give the file back
    byte for byte, with the lifecycle it asked for."""
    server = python_client()
    monkeypatch.setattr(fal_client.client, "MULTIPART_THRESHOLD", 1 << 20)
    monkeypatch.setattr(fal_client.client, "MULTIPART_CHUNK_SIZE", 256 << 10)
    data = os.urandom((1 << 20) + 12_345)  # 5 parts
    path = tmp_path / "weights.safetensors"
    path.write_bytes(data[::-1])
    lifecycle = StorageSettings(expires_in=600)
    urls = {
        "upload": fal_client.upload(data, "application/octet-stream", file_name="big.bin", lifecycle=lifecycle),
        "upload_file": fal_client.upload_file(path),
        "async": asyncio.run(fal_client.AsyncClient().upload(data, "application/octet-stream")),
    }
    for name, url in urls.items():
        row = upload_row(server, url)
        assert row.multipart_id is not None, f"{name} did not take the multipart path"
        served = httpx.get(url)
        assert served.status_code == 200
        assert served.content == (data[::-1] if name == "upload_file" else data), name
    assert upload_row(server, urls["upload"]).lifetime_s == 600
    assert not list((server.app.state.settings.data_dir / "uploads").glob("*.parts"))


@pytest.mark.skipif(test_node_clients.NODE is None, reason="node is not installed (the JS client tests need Node)")
def test_js_multipart_upload_and_lifecycles(node_modules, make_server: Callable[..., LiveServer], tmp_path) -> None:
    """``@fal-ai/client``: a Blob just over 90 MB goes up in 10 MB parts and comes back byte for byte; a Blob with
    ``lifecycle: {expiresIn: 1}`` and a submit's outputs with ``storageSettings: {expiresIn: 1}`` expire."""
    server = make_server(gc_interval_s=GC_S, fetch_allow=LOOPBACK)
    image, mask = tmp_path / "image.png", tmp_path / "mask.png"
    image.write_bytes(png(noise_image(64, 48)))
    mask.write_bytes(png(box_mask(64, 48)))
    started = time.monotonic()
    obs = test_node_clients.run_node(
        "storage.mjs", f"--base={server.url}", f"--image={image}", f"--mask={mask}", f"--size={JS_MULTIPART_BYTES}"
    )
    elapsed = time.monotonic() - started
    assert "error" not in obs["big"], obs["big"]
    big_url = obs["big"]["value"]
    digest = hashlib.sha256()
    with httpx.stream("GET", big_url) as served:
        assert served.status_code == 200
        for chunk in served.iter_bytes(1 << 20):
            digest.update(chunk)
    assert digest.hexdigest() == obs["sha256"]
    calls = obs["calls"]
    initiate = "https://rest.fal.ai/storage/upload/initiate-multipart?storage_type=fal-cdn-v3"
    initiates = [c for c in calls if c["target"] == initiate]
    parts = [c for c in calls if c["method"] == "PUT" and "/multipart/" in c["url"]]
    completes = [c for c in calls if c["url"].endswith("/complete")]
    assert len(initiates) == 1 and initiates[0]["status"] == 200
    assert [int(c["url"].rsplit("/", 1)[1]) for c in parts] == list(range(1, 11))  # 9 x 10 MiB + the rest
    assert all(c["status"] == 200 and c["authorization"] is None for c in parts + completes)
    assert [p["partNumber"] for p in completes[0]["body"]["parts"]] == list(range(1, 11))

    short = obs["short"]["value"]
    request_id = obs["submitted"]["value"]["request_id"]
    with httpx.Client(base_url=server.url, timeout=30) as client:
        while (answer := client.get(f"/queue/fal-ai/fast-lightning-sdxl/requests/{request_id}")).status_code == 400:
            time.sleep(0.05)  # still in progress
        assert answer.status_code == 200, answer.text
    output_url = answer.json()["images"][0]["url"]
    row = upload_row(server, short)  # already collected on a slow machine: 1 s after it was stored
    assert row is None or row.lifetime_s == 1
    wait_gone(short, timeout=5)
    wait_gone(output_url, timeout=5)
    assert httpx.get(big_url).status_code == 200
    print(f"JS multipart: {obs['size']} bytes uploaded in {obs['bigSeconds']:.1f} s; the script took {elapsed:.1f} s")


def test_env_var_recipe_sends_uploads_and_the_key_to_fal_unless_rest_and_cdn_urls_are_set(
    make_server: Callable[..., LiveServer], tmp_path: Path
) -> None:
    """With only ``FAL_RUN_HOST``/``FAL_QUEUE_RUN_HOST`` set, ``fal_client.upload`` asks ``rest.fal.ai`` for a
    token with ``Authorization: Key <this server's key>`` (and falls back to ``rest.fal.ai`` again): the key leaks
    (the test answers those calls itself; nothing leaves the machine). With ``REST_URL`` and ``CDN_URL`` set as the
    README says, every upload call goes to this server and the upload works."""
    tls = make_tls_files(tmp_path / "tls")
    bundle = tls.bundle(Path(certifi.where()), tmp_path / "bundle.pem")
    server = make_server(ssl_certfile=tls.server_cert, ssl_keyfile=tls.server_key, api_keys=[KEY])
    env = {k: v for k, v in os.environ.items() if not k.startswith(("FAL_", "SSL_CERT_"))}
    env |= {
        "FAL_KEY": KEY,
        "FAL_RUN_HOST": server.hostport,
        "FAL_QUEUE_RUN_HOST": f"{server.hostport}/queue",
        "SSL_CERT_FILE": str(bundle),
    }
    child = subprocess.run(
        [sys.executable, "-c", LEAK_SCRIPT], env=env, capture_output=True, text=True, timeout=60, cwd=tmp_path
    )
    assert child.returncode == 0, child.stderr[-3000:]
    seen = json.loads(child.stdout.strip().splitlines()[-1])

    env_only = seen["env_only"]
    assert env_only[0] == ["https://rest.fal.ai/storage/auth/token", f"Key {KEY}"]
    assert all(url.startswith("https://rest.fal.ai/") and auth == f"Key {KEY}" for url, auth in env_only), env_only
    assert seen["env_only_error"]

    assert seen["recommended"] and all(url.startswith(f"{server.url}/") for url, _ in seen["recommended"])
    assert seen["url"].startswith(f"{server.url}/uploads/")
    served = httpx.get(seen["url"], verify=ssl.create_default_context(cafile=str(tls.ca_cert)))
    assert served.status_code == 200 and served.content == b"\x89PNG leak test"


LEAK_SCRIPT = """
import json, os
import httpx
import fal_client
import fal_client.client

seen = []
send = httpx.Client.send

def recording(self, request, **kwargs):
    seen.append([str(request.url.copy_with(query=None)), request.headers.get("authorization")])
    if not request.url.host.startswith(("localhost", "127.")):
        return httpx.Response(401, request=request)  # stand in for fal: nothing leaves the machine
    return send(self, request, **kwargs)

httpx.Client.send = recording
out = {}
try:
    fal_client.upload(b"\\x89PNG leak test", "image/png", file_name="leak.png")
except Exception as exc:
    out["env_only_error"] = type(exc).__name__
out["env_only"], seen[:] = list(seen), []

# The README's fix: point the upload hosts at the server too, right after the import.
fal_client.client.REST_URL = fal_client.client.CDN_URL = "https://" + os.environ["FAL_RUN_HOST"]
out["url"] = fal_client.SyncClient().upload(b"\\x89PNG leak test", "image/png", file_name="safe.png")
out["recommended"] = list(seen)
print(json.dumps(out))
"""
