"""Edge cases from review: bad webhook URLs, queue-host file URLs, memory held per job, hostile uploads."""

from __future__ import annotations

import asyncio
import itertools
import json
import threading
import time

import httpx
import pytest

from server.delivery.webhooks import WebhookSender
from server.jobs.store.sqlite import SqliteStore
from server.metrics import Metrics
from tests.api.fal_wire import HYPER, LIGHTNING, client_for, endpoint, inpaint_input, submit, wait_for


@pytest.mark.parametrize("url", ["http://[::1", "http://hooks.example:99999/x", "http://", "ftp://hooks.example/x"])
def test_unusable_webhook_url_is_refused_at_submit(make_server, url: str) -> None:
    server = make_server()
    with client_for(server) as client:
        response = client.post(f"/queue/{LIGHTNING}", params={"fal_webhook": url}, json=inpaint_input())
        assert response.status_code == 400, response.text
        assert "fal_webhook" in response.json()["detail"]


def test_a_delivery_error_of_any_kind_is_a_failed_attempt_not_a_tight_loop(tmp_path) -> None:
    """An exception that is not an httpx.HTTPError (a bad URL stored before validation) is retried later."""

    class Exploding(httpx.AsyncBaseTransport):
        calls = 0

        async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
            Exploding.calls += 1
            raise RuntimeError("transport blew up")

    store = SqliteStore(tmp_path / "jobs.sqlite3")
    now = [1000.0]

    async def scenario() -> None:
        sender = WebhookSender(store, Metrics(), None, 3, 60.0, 600.0, 5.0, clock=lambda: now[0], transport=Exploding())
        with store._tx() as db:  # an outbox row as _terminal writes it
            db.q(
                "INSERT INTO webhooks (request_id, url, body, owner, attempts, next_at) VALUES (?, ?, ?, ?, 0, ?)",
                ("r1", "http://hooks.example/x", b"{}", "", now[0]),
            )
        sender.start()
        for _ in range(100):
            await asyncio.sleep(0.01)
            if store.webhook_state("r1")[1] >= 1:
                break
        await asyncio.sleep(0.2)  # a tight loop would make hundreds of calls here
        await sender.stop()

    asyncio.run(scenario())
    assert Exploding.calls == 1
    state, attempts, error = store.webhook_state("r1")
    assert (state, attempts) == ("pending", 1) and "transport blew up" in error


def test_queue_host_serves_its_own_file_urls_and_operations(make_server) -> None:
    """On a Host starting with ``queue.``, result file URLs (built from that host) must still resolve."""
    server = make_server()
    with httpx.Client(base_url=server.url, headers={"host": "queue.gpu.example"}, timeout=30) as client:
        response = client.post(f"/{LIGHTNING}", json=inpaint_input())  # a submit, routed by the Host
        rid = response.json()["request_id"]
        wait_for(client, LIGHTNING, rid)
        output = client.get(f"/{endpoint(LIGHTNING)}/requests/{rid}").json()
        url = httpx.URL(output["images"][0]["url"])
        assert url.host == "queue.gpu.example"
        image = client.get(url.path)
        assert image.status_code == 200 and image.headers["content-type"] == "image/jpeg"
        assert client.get("/health/ready").status_code == 200
        assert client.get("/metrics").status_code == 200


def test_the_api_process_holds_no_input_data_the_store_keeps_it(make_server) -> None:
    server = make_server()
    service = server.app.state.service
    with client_for(server) as client:
        rid = submit(client)["request_id"]
        wait_for(client, LIGHTNING, rid)
    assert "data:" not in json.dumps(service.finished[rid].input)  # what status polls answer from: no data URIs
    stored = server.app.state.store.get(rid, with_input=True).input
    assert stored["image_url"] == inpaint_input()["image_url"]  # what a run on another worker needs


def test_a_sync_run_keeps_no_inline_result_and_a_queued_one_keeps_it_until_retention(make_server) -> None:
    server = make_server()
    store = server.app.state.store
    with client_for(server) as client:
        response = client.post(f"/{HYPER}", json=inpaint_input(sync_mode=True))
        assert response.status_code == 200 and response.json()["images"][0]["url"].startswith("data:image/jpeg")
        ran = response.headers["x-fal-request-id"]
        assert store.result(ran) is None and store.get(ran).files == []  # returned to its caller; nothing held
        base = f"/queue/{endpoint(HYPER)}/requests"
        gone = client.get(f"{base}/{ran}")
        assert gone.status_code == 404 and "sync_mode" in gone.json()["detail"]

        queued = submit(client, HYPER, sync_mode=True)["request_id"]
        wait_for(client, HYPER, queued)
        first, again = client.get(f"{base}/{queued}"), client.get(f"{base}/{queued}")  # any node, any number of times
        assert first.status_code == again.status_code == 200 and first.json() == again.json()
        assert first.json()["images"][0]["url"].startswith("data:image/jpeg")
        assert store.get(queued).files == []  # inline: no file was written


@pytest.mark.parametrize("content_type", ["image/svg+xml", "text/html", "application/javascript"])
def test_uploads_refuse_types_that_could_carry_script(make_server, content_type: str) -> None:
    server = make_server()
    with client_for(server) as client:
        response = client.post("/storage/upload/initiate", json={"content_type": content_type, "file_name": "x"})
        assert response.status_code == 400 and content_type in response.json()["detail"]


def test_upload_edge_cases_are_clear_errors_not_500(make_server) -> None:
    server = make_server()
    with client_for(server) as client:
        odd = client.post("/storage/upload/initiate", json={"content_type": 5, "file_name": ["x"]})
        assert odd.status_code == 200  # non-string fields fall back to defaults
        bearer = client.post(
            "/files/upload", content=b"x", headers={"authorization": "Bearer \u00e9.x".encode("latin-1")}
        )
        assert bearer.status_code == 401
        up = client.post("/storage/upload/initiate", json={"content_type": "image/png", "file_name": "a.png"})
        path = httpx.URL(up.json()["upload_url"]).path
        assert client.get(path).status_code == 404  # nothing uploaded yet
        put = client.put(path, content=b"\x89PNG\r\n\x1a\n")
        assert put.status_code == 200
        served = client.get(path)
        assert served.headers["content-security-policy"] == "sandbox"
        assert served.headers["x-content-type-options"] == "nosniff"


def test_one_upload_url_accepts_exactly_one_put_even_when_two_race(tmp_path) -> None:
    from server.jobs.store.base import UploadRow

    store = SqliteStore(tmp_path / "jobs.sqlite3")
    store.add_upload(UploadRow("tok-123456", "", "a.png", "image/png", None, 0.0, 10.0))
    wins: list[bool] = []
    threads = [threading.Thread(target=lambda: wins.append(store.claim_upload("tok-123456"))) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(wins) == [False] * 7 + [True]
    store.release_upload("tok-123456")  # a failed PUT gives the URL back
    assert store.claim_upload("tok-123456")
    store.set_upload_size("tok-123456", 8)
    assert not store.claim_upload("tok-123456")


def test_the_gpu_lane_never_runs_two_batches_at_once(make_server, engine) -> None:
    """R12: with many concurrent submits, engine.run calls never overlap (one GPU worker per device)."""

    class Recording:
        def __init__(self, inner) -> None:
            self.inner = inner
            self.spans: list[tuple[float, float]] = []

        def __getattr__(self, name: str):
            return getattr(self.inner, name)

        def run(self, *args, **kwargs):
            start = time.monotonic()
            try:
                return self.inner.run(*args, **kwargs)
            finally:
                self.spans.append((start, time.monotonic()))

    recording = Recording(engine)
    server = make_server(engine_override=recording, max_batch_size=2)
    with client_for(server) as client:
        ids = [submit(client, LIGHTNING, seed=n)["request_id"] for n in range(10)]
        for rid in ids:
            wait_for(client, LIGHTNING, rid)
    spans = sorted(recording.spans)
    assert len(spans) >= 5  # 10 requests, at most 2 per batch
    for (_, end), (start, _) in itertools.pairwise(spans):
        assert start >= end, spans
