"""``Idempotency-Key`` on queue submits (reliability case R3): the same key and body give the same
``request_id`` and one run; another body with the key is a 422; keys are per API key, survive a
restart and expire with their request."""

from __future__ import annotations

import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.api.fal_wire import FakeClock
from tests.api.queue_ops import APP, inpaint_input, requests_url, result, wait_all_completed

URL = f"/queue/{APP}"


def post(client: httpx.Client, key: str | None, headers: dict[str, str] | None = None, **overrides: Any):
    headers = dict(headers or {})
    if key is not None:
        headers["Idempotency-Key"] = key
    return client.post(URL, json=inpaint_input(**overrides), headers=headers)


def job_count(server: Any) -> int:
    return sum(server.app.state.store.counts().values())


def test_same_key_and_body_returns_the_same_request_and_runs_it_once(make_server: Callable[..., Any]) -> None:
    server = make_server()
    with httpx.Client(base_url=server.url, timeout=30) as client:
        first = post(client, "order-1", seed=3)
        assert first.status_code == 200, first.text
        assert "idempotent-replayed" not in first.headers
        request_id = first.json()["request_id"]
        wait_all_completed(client, [request_id])

        again = post(client, "order-1", seed=3)
        assert again.status_code == 200, again.text
        assert again.headers["idempotent-replayed"] == "true"
        assert again.headers["x-fal-request-id"] == request_id
        assert {k: v for k, v in again.json().items() if k != "queue_position"} == {
            k: v for k, v in first.json().items() if k != "queue_position"
        }
        assert job_count(server) == 1
        assert server.app.state.store.get(request_id).attempts == 1
        assert result(client, request_id)["seed"] == 3

        # Explicit defaults are the same request as omitted ones (the validated input is compared).
        assert post(client, "order-1", seed=3, num_images=1).json()["request_id"] == request_id
        # Without a key, or with another key, a submit is a new request.
        assert post(client, None, seed=3).json()["request_id"] != request_id
        assert post(client, "order-2", seed=3).json()["request_id"] != request_id
        assert job_count(server) == 3


@pytest.mark.parametrize("change", [{"seed": 4}, {"prompt": "a blue door"}, {"format": "jpeg"}], ids=str)
def test_same_key_with_another_request_is_a_422(make_server: Callable[..., Any], change: dict[str, Any]) -> None:
    server = make_server()
    with httpx.Client(base_url=server.url, timeout=30) as client:
        first = post(client, "k-1", seed=3)
        assert first.status_code == 200, first.text
        reused = post(client, "k-1", **{"seed": 3, **change})
        assert reused.status_code == 422, reused.text
        assert reused.headers["x-fal-error-type"] == "idempotency_key_reused"
        body = reused.json()
        assert body["error_type"] == "idempotency_key_reused"
        assert body["detail"][0]["loc"] == ["header", "idempotency-key"]
        assert "different request" in body["detail"][0]["msg"]
        assert job_count(server) == 1


def test_keys_belong_to_their_api_key(make_server: Callable[..., Any]) -> None:
    server = make_server(api_keys=["key-a", "key-b"])
    with httpx.Client(base_url=server.url, timeout=30) as client:
        a = post(client, "shared", headers={"Authorization": "Key key-a"}, seed=1)
        b = post(client, "shared", headers={"Authorization": "Key key-b"}, seed=2)  # another body: no conflict
        assert a.status_code == 200 and b.status_code == 200, (a.text, b.text)
        assert a.json()["request_id"] != b.json()["request_id"]
        assert "idempotent-replayed" not in b.headers
        again = post(client, "shared", headers={"Authorization": "Key key-b"}, seed=2)
        assert again.json()["request_id"] == b.json()["request_id"]


def test_concurrent_submits_with_one_key_create_one_request(make_server: Callable[..., Any]) -> None:
    server = make_server()
    ids: list[str] = []
    barrier = threading.Barrier(12)

    def send() -> None:
        with httpx.Client(base_url=server.url, timeout=30) as client:
            barrier.wait()
            response = post(client, "burst", seed=8)
            assert response.status_code == 200, response.text
            ids.append(response.json()["request_id"])

    threads = [threading.Thread(target=send) for _ in range(12)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert len(ids) == 12 and len(set(ids)) == 1, ids
    assert job_count(server) == 1


def test_a_key_survives_a_restart(make_server: Callable[..., Any], tmp_path: Path) -> None:
    data = tmp_path / "shared"
    first = make_server(data_dir=data)
    with httpx.Client(base_url=first.url, timeout=30) as client:
        request_id = post(client, "before-restart", seed=5).json()["request_id"]
        wait_all_completed(client, [request_id])
    first.stop()

    second = make_server(data_dir=data)
    with httpx.Client(base_url=second.url, timeout=30) as client:
        again = post(client, "before-restart", seed=5)
        assert again.status_code == 200, again.text
        assert again.json()["request_id"] == request_id
        assert again.headers["idempotent-replayed"] == "true"
        assert post(client, "before-restart", seed=6).status_code == 422
    assert job_count(second) == 1


def test_a_key_expires_with_its_request(make_server: Callable[..., Any]) -> None:
    clock = FakeClock(1_700_000_000.0)
    server = make_server(clock=clock, result_retention_s=60)
    store = server.app.state.store
    with httpx.Client(base_url=server.url, timeout=30) as client:
        old_id = post(client, "k", seed=1).json()["request_id"]
        wait_all_completed(client, [old_id])
        clock.advance(59)
        assert post(client, "k", seed=1).json()["request_id"] == old_id

        clock.advance(1)  # the request has expired (not yet collected): the key is free again
        assert client.get(requests_url(old_id, "/status")).status_code == 404
        fresh = post(client, "k", seed=2)  # even with another body
        assert fresh.status_code == 200, fresh.text
        new_id = fresh.json()["request_id"]
        assert new_id != old_id and "idempotent-replayed" not in fresh.headers

        assert server.app.state.service.collect_garbage() == 1
        assert store.idempotent("", "k")[1] == new_id  # the old request's collection left the new key alone
        assert post(client, "k", seed=2).json()["request_id"] == new_id
        wait_all_completed(client, [new_id])
        clock.advance(61)
        assert server.app.state.service.collect_garbage() == 1
        assert store.idempotent("", "k") is None  # deleted with its request


@pytest.mark.parametrize("key", ["", "has space", "x" * 256, "tab\tkey"])
def test_malformed_keys_are_refused(make_server: Callable[..., Any], key: str) -> None:
    server = make_server()
    with httpx.Client(base_url=server.url, timeout=30) as client:
        response = post(client, key, seed=1)
        assert response.status_code == 422, response.text
        assert response.json()["detail"][0]["loc"] == ["header", "Idempotency-Key"]
        assert job_count(server) == 0
