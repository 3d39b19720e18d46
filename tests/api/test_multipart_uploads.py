"""Multipart uploads over raw HTTP (the real clients' flows are in tests/compat/test_client_storage.py): parts in
any order and retried, completes that name missing or stale parts, a part past ``upload_max_bytes``, unknown
upload ids, credentials, abandoned uploads; and lifecycle headers that are not what the clients send."""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx

from tests.api.fal_wire import HYPER, LIGHTNING, FakeClock, client_for, inpaint_input

LIMIT = 64 * 1024
KEY = {"Authorization": "Key k"}
OCTETS = {"content_type": "application/octet-stream", "file_name": "big.bin"}


def initiate(client: httpx.Client, **headers: str) -> tuple[str, str]:
    """The JS client's initiate-multipart: (upload_url, file_url)."""
    answer = client.post("/storage/upload/initiate-multipart?storage_type=fal-cdn-v3", json=OCTETS, headers=headers)
    assert answer.status_code == 200, answer.text
    return answer.json()["upload_url"], answer.json()["file_url"]


ANONYMOUS = httpx.Client(timeout=30)  # the part and complete calls carry no credentials, like the JS client's


def put_part(upload_url: str, number: int | str, content: Any) -> httpx.Response:
    return ANONYMOUS.put(f"{upload_url}/{number}", content=content)


def complete(upload_url: str, parts: list[tuple[int, str]]) -> httpx.Response:
    body = {"parts": [{"partNumber": n, "etag": e} for n, e in parts]}
    return ANONYMOUS.post(f"{upload_url}/complete", json=body)


def parts_dirs(server: Any) -> list[Path]:
    return list((server.app.state.settings.data_dir / "uploads").glob("*.parts"))


def stored_uploads(server: Any) -> list[Any]:
    return server.app.state.store.expired_uploads(float("inf"))


def test_parts_in_any_order_and_retried_join_into_one_file(make_server) -> None:
    server = make_server(api_keys=["k"], upload_max_bytes=LIMIT)
    parts = [os.urandom(20_000), os.urandom(20_000), os.urandom(5_000)]
    with client_for(server, headers=KEY) as client:
        upload_url, file_url = initiate(client)
    assert upload_url.startswith(f"{file_url}/multipart/") and file_url.startswith(f"{server.url}/uploads/")
    etags = {}
    for number in (3, 2, 1):  # any order; part 2 first with other bytes, then again: the last try counts
        answer = put_part(upload_url, number, parts[number - 1] if number != 2 else b"first try")
        assert answer.status_code == 200, answer.text
        body = answer.json()
        assert body["partNumber"] == number and answer.headers["etag"] == f'"{body["etag"]}"'
        etags[number] = body["etag"]
    stale = etags[2]
    etags[2] = put_part(upload_url, 2, parts[1]).json()["etag"]
    assert etags[2] == hashlib.md5(parts[1]).hexdigest() != stale
    assert ANONYMOUS.get(file_url).status_code == 404  # nothing is served before the upload completes

    gap = complete(upload_url, [(1, etags[1]), (3, etags[3])])
    assert gap.status_code == 400 and "missing: 2" in gap.json()["detail"]
    never = complete(upload_url, [(1, etags[1]), (2, etags[2]), (3, etags[3]), (4, "0" * 32)])
    assert never.status_code == 400 and "never uploaded" in never.json()["detail"] and ": 4" in never.json()["detail"]
    wrong = complete(upload_url, [(1, etags[1]), (2, stale), (3, etags[3])])
    assert wrong.status_code == 400 and "etags" in wrong.json()["detail"]

    listed = [(3, f'"{etags[3]}"'), (1, etags[1]), (2, etags[2])]  # any order, quoted as the ETag header was
    done = complete(upload_url, listed)
    assert done.status_code == 200, done.text
    assert done.json()["access_url"] == file_url and done.json()["size"] == len(b"".join(parts))
    served = ANONYMOUS.get(file_url)
    assert served.status_code == 200 and served.content == b"".join(parts)
    assert served.headers["content-type"] == "application/octet-stream"
    assert complete(upload_url, listed).json() == done.json()  # a retried complete gets the same answer
    late = put_part(upload_url, 4, b"late")
    assert late.status_code == 400 and "already complete" in late.json()["detail"]
    assert parts_dirs(server) == []


def test_a_part_past_upload_max_bytes_is_413_and_discards_the_upload(make_server) -> None:
    server = make_server(upload_max_bytes=LIMIT)

    def chunks() -> Iterator[bytes]:
        for _ in range(10):
            yield os.urandom(8_000)

    too_big = {
        "streamed": lambda: os.urandom(40_000),  # fits alone, not with part 1
        "declared": lambda: os.urandom(LIMIT + 1),  # its Content-Length alone says it is too big
        "chunked": chunks,  # no Content-Length: found out while it streams in
    }
    for how, part_two in too_big.items():
        with client_for(server) as client:
            upload_url, file_url = initiate(client)
        first = put_part(upload_url, 1, os.urandom(40_000))
        assert first.status_code == 200 and len(parts_dirs(server)) == 1
        refused = put_part(upload_url, 2, part_two())
        assert refused.status_code == 413, (how, refused.text)
        assert refused.headers["x-fal-error-type"] == "payload_too_large"
        assert f"limited to {LIMIT} bytes" in refused.json()["detail"] and "discarded" in refused.json()["detail"]
        # Nothing is kept: no parts, no upload; its URLs are 404.
        assert parts_dirs(server) == [] and stored_uploads(server) == [], how
        assert put_part(upload_url, 1, b"again").status_code == 404
        assert complete(upload_url, [(1, first.json()["etag"])]).status_code == 404
        assert ANONYMOUS.get(file_url).status_code == 404


def test_unknown_ids_bad_part_numbers_and_credentials(make_server) -> None:
    server = make_server(api_keys=["k"], upload_max_bytes=LIMIT)
    with client_for(server, headers=KEY) as client:
        upload_url, file_url = initiate(client)
        other_url, _ = initiate(client)
        token = client.post("/storage/auth/token", json={}).json()["token"]
        single = client.post("/storage/upload/initiate", json={"content_type": "image/png", "file_name": "a.png"})
    other_id = other_url.rsplit("/", 1)[1]
    for url in (
        f"{file_url}/multipart/{other_id}",  # another upload's id
        f"{file_url}/multipart/{'x' * 32}",  # a made-up id
        f"{server.url}/uploads/{'y' * 32}/big.bin/multipart/{other_id}",  # a made-up upload
        upload_url.replace("/big.bin/", "/other.bin/"),  # the wrong name
        f"{single.json()['upload_url']}/multipart/{other_id}",  # a single-PUT upload
    ):
        assert put_part(url, 1, b"data").status_code == 404, url
        assert complete(url, [(1, "0" * 32)]).status_code == 404, url
    for number in ("0", "10001", "1234567", "abc"):
        bad = put_part(upload_url, number, b"data")
        assert bad.status_code == 400 and "part numbers go from 1 to 10000" in bad.json()["detail"], number
    for body in ("nope", {"parts": []}, {"parts": [{"partNumber": "1", "etag": "x"}]}, {"parts": [{"etag": "x"}]}):
        content = body if isinstance(body, str) else json.dumps(body)
        assert ANONYMOUS.post(f"{upload_url}/complete", content=content).status_code == 400, body
    twice = complete(upload_url, [(1, "a"), (1, "a")])
    assert twice.status_code == 400 and "listed twice" in twice.json()["detail"]
    assert ANONYMOUS.put(file_url, content=b"data").status_code == 400  # a multipart upload takes parts only

    # The initiates need credentials: an API key (JS) or an upload token (Python).
    for headers in ({}, {"Authorization": "Key wrong"}, {"Authorization": f"Bearer {token}"}):
        answer = ANONYMOUS.post(f"{server.url}/storage/upload/initiate-multipart", json=OCTETS, headers=headers)
        assert answer.status_code == 401, headers
    for headers in ({}, KEY, {"Authorization": "Bearer nonsense"}):
        answer = ANONYMOUS.post(f"{server.url}/files/upload/multipart", headers=headers)
        assert answer.status_code == 401 and answer.json()["error_type"] == "unauthorized", headers
    python = ANONYMOUS.post(
        f"{server.url}/files/upload/multipart",
        headers={"Authorization": f"Bearer {token}", "Content-Type": "image/png", "X-Fal-File-Name": "p.png"},
    )
    assert python.status_code == 200 and set(python.json()) == {"access_url", "uploadId"}
    assert python.json()["access_url"].endswith("/p.png")


def test_an_abandoned_multipart_upload_is_collected_with_its_parts(make_server) -> None:
    clock = FakeClock()
    server = make_server(clock=clock, result_retention_s=60)
    with client_for(server) as client:
        upload_url, _ = initiate(client)
    assert put_part(upload_url, 1, b"part one").status_code == 200
    clock.advance(59)
    server.app.state.service.collect_garbage()
    assert len(parts_dirs(server)) == 1
    clock.advance(1)
    assert put_part(upload_url, 2, b"part two").status_code == 404  # expired: refused before it is collected
    server.app.state.service.collect_garbage()
    assert parts_dirs(server) == [] and stored_uploads(server) == []


BAD_LIFECYCLES = [
    "nope",
    "[3600]",
    '{"expiration_duration_seconds": -5}',
    '{"expiration_duration_seconds": "1h"}',
    '{"expiration_duration_seconds": NaN}',
]


def test_bad_lifecycle_headers_are_400_naming_the_header_and_store_nothing(make_server) -> None:
    server = make_server(api_keys=["k"])
    store = server.app.state.store
    with client_for(server, headers=KEY) as client:
        token = client.post("/storage/auth/token", json={}).json()["token"]
        for value in BAD_LIFECYCLES:
            preference = {"X-Fal-Object-Lifecycle-Preference": value}
            answers = {
                "submit": client.post(f"/queue/{LIGHTNING}", json=inpaint_input(), headers=preference),
                "run": client.post(f"/{HYPER}", json=inpaint_input(), headers=preference),
                "initiate": client.post(
                    "/storage/upload/initiate", json=OCTETS, headers={"X-Fal-Object-Lifecycle": value}
                ),
                "initiate-multipart": client.post(
                    "/storage/upload/initiate-multipart", json=OCTETS, headers={"X-Fal-Object-Lifecycle": value}
                ),
                "files/upload": ANONYMOUS.post(
                    f"{server.url}/files/upload",
                    content=b"data",
                    headers={"Authorization": f"Bearer {token}", "X-Fal-Object-Lifecycle": value, **preference},
                ),
            }
            for route, answer in answers.items():
                assert answer.status_code == 400, (route, value, answer.text)
                assert "X-Fal-Object-Lifecycle" in answer.json()["detail"], (route, answer.json())
    assert store.counts() == {} and stored_uploads(server) == []
