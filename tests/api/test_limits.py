"""Limits over HTTP: body caps while streaming, decoding limits, request limits, queue length, rate per key.

Cases S8-S11, S14 and R12 of the reliability list.
"""

from __future__ import annotations

import concurrent.futures
import json
import select
import socket
import struct
import zlib
from collections.abc import Iterable, Iterator
from typing import Any

import httpx
import pytest

from tests.api.fal_wire import (
    HYPER,
    LIGHTNING,
    FakeClock,
    client_for,
    data_uri,
    endpoint,
    gated_server,
    hold_one,
    inpaint_input,
    submit,
    wait_for,
)
from tests.helpers import box_mask, noise_image, png
from tests.live import LiveServer

MiB = 1024 * 1024


# ---------------------------------------------------------------------------------------------
# body size, enforced while the body streams in (S11)


def _raw_exchange(server: LiveServer, head: bytes, body: Iterable[bytes] = ()) -> tuple[int, dict, bytes]:
    """Send ``head`` and whatever ``body`` yields on a raw socket, then read until the server closes."""
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
        sock.sendall(head)
        for chunk in body:
            # Stop sending once the server has answered (or hung up): writing on would race its close and
            # could turn the answer into a reset before we read it.
            if select.select([sock], [], [], 0)[0]:
                break
            try:
                sock.sendall(chunk)
            except (BrokenPipeError, ConnectionResetError):
                break
        received = b""
        try:
            while data := sock.recv(65536):
                received += data
        except ConnectionResetError:  # the server closed with our unread bytes in its buffer
            pass
    head_part, _, content = received.partition(b"\r\n\r\n")
    lines = head_part.decode("latin-1").split("\r\n")
    headers = dict(line.split(": ", 1) for line in lines[1:])
    return int(lines[0].split()[1]), {k.lower(): v for k, v in headers.items()}, content


def _assert_413(code: int, headers: dict, content: bytes) -> None:
    assert code == 413
    assert headers["x-fal-error-type"] == "payload_too_large"
    assert headers["connection"] == "close"
    assert "larger than" in json.loads(content)["detail"]


def test_a_declared_body_over_the_cap_is_refused_before_any_of_it_is_sent(make_server) -> None:
    server = make_server()  # the default cap, 64 MiB
    head = (
        f"POST /queue/{LIGHTNING} HTTP/1.1\r\nHost: {server.hostport}\r\n"
        f"Content-Type: application/json\r\nContent-Length: {100 * 1000 * 1000}\r\n\r\n"
    ).encode()
    # No body byte is sent: the answer can only come from the header.
    _assert_413(*_raw_exchange(server, head))


def test_a_chunked_body_is_refused_once_it_passes_the_cap_before_it_ends(make_server) -> None:
    server = make_server(max_body_bytes=MiB)
    head = (
        f"POST /queue/{LIGHTNING} HTTP/1.1\r\nHost: {server.hostport}\r\n"
        "Content-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n"
    ).encode()
    chunk = b"a" * 65536
    body = (b"%x\r\n%s\r\n" % (len(chunk), chunk) for _ in range(MiB * 3 // 2 // len(chunk)))
    # 1.5 MiB sent and no final chunk: the request never ends, yet the server answers and hangs up.
    _assert_413(*_raw_exchange(server, head, body))


def test_a_100_mb_data_uri_streamed_is_refused_early_at_the_default_cap(make_server) -> None:
    server = make_server()
    total = 100 * 1000 * 1000
    sent = 0

    def body() -> Iterator[bytes]:  # chunked: no Content-Length to refuse it by
        nonlocal sent
        prefix = b'{"prompt": "x", "mask_url": "data:,", "image_url": "data:image/png;base64,'
        sent += len(prefix)
        yield prefix
        chunk = b"A" * MiB
        while sent < total:
            sent += len(chunk)
            yield chunk
        yield b'"}'

    with client_for(server) as client:
        response = client.post(f"/queue/{LIGHTNING}", content=body(), headers={"content-type": "application/json"})
    assert response.status_code == 413, response.text
    assert response.json()["error_type"] == "payload_too_large"
    assert 64 * MiB < sent <= 80 * MiB  # the server stopped reading soon after its 64 MiB, of 95 MiB


def test_sync_runs_and_proxied_requests_have_the_same_cap(make_server) -> None:
    server = make_server(max_body_bytes=64 * 1024)
    big = inpaint_input(prompt="x" * 100_000)
    with client_for(server) as client:
        assert client.post(f"/{HYPER}", json=big).status_code == 413
        proxied = client.post(
            "/api/fal/proxy", json=big, headers={"x-fal-target-url": f"https://queue.fal.run/{HYPER}"}
        )
        assert proxied.status_code == 413
        assert proxied.json()["error_type"] == "payload_too_large"
        assert submit(client, HYPER)["status"] == "IN_QUEUE"  # a normal request passes


def test_uploads_have_their_own_cap(make_server) -> None:
    server = make_server(max_body_bytes=1024, upload_max_bytes=256 * 1024)
    with client_for(server) as client:
        up = client.post("/storage/upload/initiate", json={"content_type": "image/png", "file_name": "a.png"})
        path = httpx.URL(up.json()["upload_url"]).path
        assert client.put(path, content=b"\x00" * (200 * 1024)).status_code == 200  # over max_body_bytes
        token = client.post("/storage/auth/token").json()["token"]
        headers = {"authorization": f"Bearer {token}", "content-type": "image/png"}
        too_big = client.post("/files/upload", content=b"\x00" * (300 * 1024), headers=headers)
        assert too_big.status_code == 413 and too_big.json()["error_type"] == "payload_too_large"
        assert client.post("/files/upload", content=b"\x00" * 1000, headers=headers).status_code == 200


def test_a_data_uri_over_the_input_cap_is_refused_at_submit(make_server) -> None:
    server = make_server(input_max_bytes=2000)
    big = data_uri(png(noise_image(64, 48, seed=3)))  # about 9 kB of noise
    assert len(big) < 64 * 1024
    with client_for(server) as client:
        for url in (f"/queue/{LIGHTNING}", f"/{LIGHTNING}"):
            response = client.post(url, json=inpaint_input(image_url=big))
            assert response.status_code == 413, response.text
            assert "image_url" in response.json()["detail"] and "2000" in response.json()["detail"]


# ---------------------------------------------------------------------------------------------
# decoding (S8-S10): the request completes with a 422 naming the field, never a 500


def _png_claiming(width: int, height: int) -> bytes:
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(bytes(64))) + chunk(b"IEND", b"")


def _jpeg(width: int, height: int) -> bytes:
    import io

    buf = io.BytesIO()
    noise_image(width, height).save(buf, format="JPEG")
    return buf.getvalue()


def _tiff() -> bytes:
    import io

    buf = io.BytesIO()
    noise_image(64, 48).save(buf, format="TIFF")
    return buf.getvalue()


def _refused(client: httpx.Client, field: str, data: bytes) -> dict[str, Any]:
    rid = submit(client, LIGHTNING, **{field: data_uri(data)})["request_id"]
    done = wait_for(client, LIGHTNING, rid)
    assert done["error_type"] == "invalid_input", done
    result = client.get(f"/queue/{endpoint(LIGHTNING)}/requests/{rid}")
    assert result.status_code == 422
    (item,) = result.json()["detail"]
    assert item["loc"] == ["body", field]
    return item


@pytest.mark.parametrize(
    ("field", "data", "words"),
    [
        ("image_url", _png_claiming(50_000, 50_000), "pixels"),
        ("mask_url", _png_claiming(10_000, 12_000), "pixels"),  # between 1x and 2x Pillow's own limit
        ("image_url", _tiff(), "TIFF"),
        ("mask_url", b"8BPS" + bytes(100), "PSD"),
        ("image_url", _jpeg(64, 48)[:-400], "cannot decode"),
        ("mask_url", png(box_mask(64, 48))[:-30], "cannot decode"),
    ],
    ids=["png-50000x50000", "png-120-megapixels", "tiff-as-png", "psd-as-png", "truncated-jpeg", "truncated-png"],
)
def test_undecodable_inputs_complete_with_a_422_naming_the_field(make_server, field, data, words) -> None:
    server = make_server()
    with client_for(server) as client:
        item = _refused(client, field, data)
        assert words in item["msg"], item
        assert "Traceback" not in item["msg"] and "/tmp" not in item["msg"]


def test_the_pixel_limit_is_a_setting_and_counts_both_sides(make_server) -> None:
    server = make_server(max_image_pixels=100 * 100)
    with client_for(server) as client:
        item = _refused(client, "image_url", png(noise_image(100, 150)))  # 1.5x the limit
        assert "100x150" in item["msg"] and "10000" in item["msg"]
        rid = submit(client, LIGHTNING, image_url=data_uri(png(noise_image(100, 100))))["request_id"]
        assert "error" not in wait_for(client, LIGHTNING, rid)


# ---------------------------------------------------------------------------------------------
# num_images and image_size (422 at submit, naming the field)


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"num_images": 3}, "num_images"),
        ({"image_size": {"width": 128, "height": 64}}, "image_size"),
        ({"image_size": "square"}, "image_size"),  # a preset: 512x512
    ],
)
def test_num_images_and_output_pixels_over_the_settings_are_422(make_server, change, field) -> None:
    server = make_server(max_num_images=2, max_output_pixels=64 * 64)
    with client_for(server) as client:
        for url in (f"/queue/{LIGHTNING}", f"/{LIGHTNING}"):
            response = client.post(url, json=inpaint_input(**change))
            assert response.status_code == 422, (url, response.text)
            assert response.headers["x-fal-error-type"] == "invalid_input"
            assert response.headers["x-fal-request-id"]
            (item,) = response.json()["detail"]
            assert item["loc"] == ["body", field]
        ok = client.post(f"/{LIGHTNING}", json=inpaint_input(num_images=2, image_size={"width": 64, "height": 64}))
        assert ok.status_code == 200 and len(ok.json()["images"]) == 2


# ---------------------------------------------------------------------------------------------
# the queue's length (S14, R12)


def test_a_full_queue_takes_exactly_its_size_from_200_concurrent_submits(make_server, engine, request) -> None:
    server, gate = gated_server(make_server, engine, request, max_queue_size=50)
    limits = httpx.Limits(max_connections=64, max_keepalive_connections=64)
    with client_for(server, limits=limits) as client:
        held = hold_one(client, gate)  # running, not queued; nothing leaves the queue from now on
        body = inpaint_input()

        def post(_: int) -> httpx.Response:
            return client.post(f"/queue/{LIGHTNING}", json=body)

        with concurrent.futures.ThreadPoolExecutor(32) as pool:
            responses = list(pool.map(post, range(200)))
        codes = [r.status_code for r in responses]
        assert codes.count(200) == 50 and codes.count(429) == 150, codes
        for refused in (r for r in responses if r.status_code == 429):
            assert int(refused.headers["retry-after"]) >= 1
            assert refused.headers["x-fal-error-type"] == "queue_full"
            assert "queue is full" in refused.json()["detail"]
        positions = sorted(r.json()["queue_position"] for r in responses if r.status_code == 200)
        assert positions == list(range(50))
        sync = client.post(f"/{LIGHTNING}", json=body)  # a sync run queues too
        assert sync.status_code == 429 and sync.headers["retry-after"]

        # Room again once one leaves the queue (a cancel), and the held request was never disturbed.
        first = next(r.json()["request_id"] for r in responses if r.status_code == 200)
        assert client.put(f"/queue/{endpoint(LIGHTNING)}/requests/{first}/cancel").status_code == 202
        assert submit(client, LIGHTNING)["queue_position"] == 49
        assert client.post(f"/queue/{LIGHTNING}", json=body).status_code == 429
        assert held in gate.batches[0]


def test_the_queue_takes_what_the_workers_finish_in_queue_max_wait_s_and_refuses_the_rest_unwritten(
    make_server, engine, request
) -> None:
    """The bound counts image rows against the workers' throughput (1 row/s assumed here: nothing measured yet,
    so 3 s of work is 3 rows); past it a submit gets 429 ``queue_full`` saying why, with Retry-After, and
    nothing of it is stored."""
    server, gate = gated_server(make_server, engine, request, queue_max_wait_s=3, queue_assumed_rows_per_s=1)
    store = server.app.state.store
    with client_for(server) as client:
        hold_one(client, gate)  # running, not queued: the queue only grows from now on
        submit(client, LIGHTNING, num_images=2)
        submit(client, LIGHTNING)
        before = store.counts()
        for url in (f"/queue/{LIGHTNING}", f"/{LIGHTNING}"):  # a sync run queues too
            refused = client.post(url, json=inpaint_input())
            assert refused.status_code == 429, refused.text
            assert refused.headers["x-fal-error-type"] == "queue_full"
            assert refused.headers["retry-after"] == "1"  # room for one row once the GPU has done one
            assert "x-fal-request-id" not in refused.headers  # no request was made
            body = refused.json()
            assert body["error_type"] == "queue_full" and body["message"] == body["detail"]
            assert body["detail"].startswith(
                "the queue is full: the 3 image rows waiting take about 3 s at 1.00 image rows/s (assumed) on 1 GPU "
                "worker(s), and this server queues at most 3 s of work (queue_max_wait_s)"
            )
        assert store.counts() == before == {"queued": 2, "running": 1}


# ---------------------------------------------------------------------------------------------
# rate per key (S14)


def test_each_key_has_its_own_rate_and_429_says_when_to_retry(make_server) -> None:
    clock = FakeClock()
    server = make_server(api_keys=["key-a", "key-b"], rate_limit_per_minute=3, clock=clock)
    with (
        client_for(server, headers={"Authorization": "Key key-a"}) as a,
        client_for(server, headers={"Authorization": "Key key-b"}) as b,
    ):
        for _ in range(3):
            submit(a, LIGHTNING)
        refused = a.post(f"/queue/{LIGHTNING}", json=inpaint_input())
        assert refused.status_code == 429
        assert refused.headers["x-fal-error-type"] == "rate_limited"
        assert refused.headers["retry-after"] == "20"  # one request per 20 s
        assert a.post(f"/{LIGHTNING}", json=inpaint_input()).status_code == 429  # sync runs count too
        submit(b, LIGHTNING)  # another key is not affected
        clock.advance(20)
        submit(a, LIGHTNING)
        assert a.post(f"/queue/{LIGHTNING}", json=inpaint_input()).status_code == 429


def test_burst_is_separate_from_the_rate(make_server) -> None:
    clock = FakeClock()
    server = make_server(rate_limit_per_minute=600, rate_limit_burst=2, clock=clock)
    with client_for(server) as client:
        submit(client, LIGHTNING)
        submit(client, LIGHTNING)
        refused = client.post(f"/queue/{LIGHTNING}", json=inpaint_input())
        assert refused.status_code == 429 and refused.headers["retry-after"] == "1"
        clock.advance(0.15)  # 600/min: one more every 0.1 s
        submit(client, LIGHTNING)


def test_refusals_for_bad_input_are_never_429(make_server) -> None:
    """fal's clients retry 429: a request that can never succeed must not get it."""
    server = make_server(rate_limit_per_minute=1, max_queue_size=1, max_num_images=1, max_body_bytes=64 * 1024)
    with client_for(server) as client:
        for _ in range(3):
            assert client.post(f"/queue/{LIGHTNING}", json=inpaint_input(num_images=2)).status_code == 422
            assert client.post(f"/queue/{LIGHTNING}", json=inpaint_input(prompt="x" * 70_000)).status_code == 413
        assert submit(client, LIGHTNING)["status"] == "IN_QUEUE"


def test_embedding_files_are_capped_and_must_be_safetensors(make_server) -> None:
    """S18: an embedding data URI over the byte cap is refused before decoding; a pickle is never loaded."""
    import base64
    import io
    import pickle

    from tests.api.fal_wire import LIGHTNING, client_for, inpaint_input, wait_for

    server = make_server(input_max_bytes=32768)  # room for the 64x48 noise PNG
    with client_for(server) as client:
        big = "data:application/octet-stream;base64," + base64.b64encode(b"\0" * 65536).decode()
        refused = client.post(f"/queue/{LIGHTNING}", json=inpaint_input(embeddings=[{"path": big}]))
        assert refused.status_code == 413, refused.text
        assert "embeddings.0.path" in refused.json()["detail"]

        class Boom:
            def __reduce__(self):
                return (exec, ("raise SystemExit('pickle executed')",))

        buf = io.BytesIO()
        pickle.dump({"clip_l": Boom()}, buf)
        pickled = "data:application/octet-stream;base64," + base64.b64encode(buf.getvalue()).decode()
        rid = client.post(f"/queue/{LIGHTNING}", json=inpaint_input(embeddings=[{"path": pickled}])).json()[
            "request_id"
        ]
        body = wait_for(client, LIGHTNING, rid)
        assert body["error_type"] == "invalid_input" and "embeddings" in body["error"]
        assert client.get("/health/live").status_code == 200  # the process is alive: nothing was unpickled
