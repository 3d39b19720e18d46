"""Webhooks (fal-protocol §7): fal's body, retries with backoff up to ``webhook_max_attempts``, Ed25519
signatures that verify against the server's JWKS, delivery off the GPU lane, and an outbox that
survives a restart (reliability cases R14, R15).

Every test runs the real app in-process and a real HTTP receiver in the test.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import pytest

from server.delivery.webhooks import verify_signature
from server.http.auth import owner_id
from tests.api.fal_wire import FakeClock, data_uri
from tests.api.queue_ops import (
    requests_url,
    result,
    submit,
    wait_all_completed,
    wait_status,
)
from tests.live import LOOPBACK, GatedEngine
from tests.webhook_receiver import HANG, Delivery, WebhookReceiver

FAST_RETRIES = {"webhook_retry_base_s": 0.1, "webhook_retry_max_s": 1.0}


@pytest.fixture
def receivers() -> Iterator[Callable[..., WebhookReceiver]]:
    """Make webhook receivers; all are closed at the end."""
    made: list[WebhookReceiver] = []

    def make(script: tuple[int | str, ...] = (), default: int = 200) -> WebhookReceiver:
        made.append(WebhookReceiver(script=script, default=default))
        return made[-1]

    yield make
    for receiver in made:
        receiver.close()


def wait_webhook_state(
    server: Any, request_id: str, state: str, attempts: int | None = None, timeout: float = 30.0
) -> tuple[str, int, str | None]:
    """Poll the outbox until the request's webhook is ``state`` (after ``attempts`` attempts, if given).

    Returns the row as (state, attempts, last error).
    """
    deadline = time.monotonic() + timeout
    while True:
        row = server.app.state.store.webhook_state(request_id)
        if row is not None and row[0] == state and attempts in (None, row[1]):
            return row
        assert time.monotonic() < deadline, f"webhook of {request_id} not {state} after {timeout} s: {row}"
        time.sleep(0.02)


def jwks_of(client: httpx.Client) -> dict[str, Any]:
    response = client.get("/.well-known/jwks.json")
    assert response.status_code == 200, response.text
    return response.json()


def assert_signed(delivery: Delivery, jwks: dict[str, Any], request_id: str, user_id: str) -> None:
    """The delivery verifies against ``jwks`` and names the request and its owner; a tampered copy does not."""
    headers = delivery.headers
    assert headers["X-Fal-Webhook-Request-Id"] == request_id
    assert headers["X-Fal-Webhook-User-Id"] == user_id
    assert abs(int(headers["X-Fal-Webhook-Timestamp"]) - time.time()) < 120
    assert headers["Content-Type"] == "application/json"
    assert verify_signature(jwks, headers, delivery.body)
    tampered = json.loads(delivery.body)
    tampered["status"] = "ERROR" if tampered["status"] == "OK" else "OK"
    assert not verify_signature(jwks, headers, json.dumps(tampered).encode())
    assert not verify_signature(jwks, headers | {"X-Fal-Webhook-Request-Id": "someone-else"}, delivery.body)


def test_failing_receiver_gets_exactly_one_successful_delivery_after_four_attempts(
    make_server: Callable[..., Any], receivers: Callable[..., WebhookReceiver]
) -> None:
    """Three 500s, then 200: four attempts with doubling delays, one success, then nothing more."""
    receiver = receivers(script=(500, 500, 500))
    server = make_server(api_keys=["hook-key"], fetch_allow=LOOPBACK, **FAST_RETRIES)
    headers = {"Authorization": "Key hook-key"}
    with httpx.Client(base_url=server.url, timeout=30, headers=headers) as client:
        request_id = submit(client, webhook=receiver.url, seed=21)
        assert wait_webhook_state(server, request_id, "delivered") == ("delivered", 4, None)
        output = result(client, request_id)
        jwks = jwks_of(client)
    time.sleep(0.5)  # more than the next retry delay would be: nothing else may arrive
    deliveries = receiver.wait_for(4, answered=True)
    assert [d.status for d in deliveries] == [500, 500, 500, 200]
    assert len({d.body for d in deliveries}) == 1  # every attempt carries the same body
    for before, after, delay in zip(deliveries, deliveries[1:], (0.1, 0.2, 0.4), strict=False):
        assert after.arrived - before.arrived >= delay * 0.9

    body = deliveries[-1].json()
    assert body == {"request_id": request_id, "gateway_request_id": request_id, "status": "OK", "payload": output}
    assert body["payload"]["seed"] == 21 and len(body["payload"]["images"]) == 1
    assert deliveries[-1].path == "/hook"
    for delivery in deliveries:
        assert_signed(delivery, jwks, request_id, owner_id(b"hook-key"))


def test_failed_job_webhook_carries_the_error_status_and_body(
    make_server: Callable[..., Any], receivers: Callable[..., WebhookReceiver]
) -> None:
    """An input that passes the schema but is no image: ``ERROR``, ``Invalid status code: 422``, ``{detail}``."""
    receiver = receivers()
    server = make_server(fetch_allow=LOOPBACK, **FAST_RETRIES)
    with httpx.Client(base_url=server.url, timeout=30) as client:
        request_id = submit(client, webhook=receiver.url, image_url=data_uri(b"not an image"))
        wait_all_completed(client, [request_id])
        answer = client.get(requests_url(request_id))
        jwks = jwks_of(client)
    assert answer.status_code == 422
    [delivery] = receiver.wait_for(1, answered=True)
    body = delivery.json()
    assert body["status"] == "ERROR"
    assert body["error"] == "Invalid status code: 422"
    assert body["request_id"] == body["gateway_request_id"] == request_id
    assert body["payload"] == answer.json()
    [item] = body["payload"]["detail"]
    assert item["loc"] == ["body", "image_url"] and item["msg"]
    assert "payload_error" not in body
    assert_signed(delivery, jwks, request_id, "anonymous")


def test_cancelled_jobs_send_an_error_webhook(
    make_server: Callable[..., Any], receivers: Callable[..., WebhookReceiver], engine: Any
) -> None:
    """Cancelled while running and cancelled while queued: each gets one ``ERROR`` webhook with 499."""
    receiver = receivers()
    gate = GatedEngine(engine)
    gate.hold = True
    try:
        server = make_server(engine_override=gate, fetch_allow=LOOPBACK, **FAST_RETRIES)
        with httpx.Client(base_url=server.url, timeout=30) as client:
            running = submit(client, webhook=receiver.url, seed=1)
            assert gate.started.wait(30)
            queued = submit(client, webhook=receiver.url, seed=2)
            for request_id in (queued, running):
                assert client.put(requests_url(request_id, "/cancel")).status_code == 202
            gate.release.set()
            bodies = wait_all_completed(client, [running, queued])
            answers = {rid: client.get(requests_url(rid)) for rid in (running, queued)}
    finally:
        gate.release.set()
    deliveries = receiver.wait_for(2, answered=True)
    assert sorted(d.json()["request_id"] for d in deliveries) == sorted([running, queued])
    for delivery in deliveries:
        body = delivery.json()
        request_id = body["request_id"]
        assert bodies[request_id]["error_type"] == "cancelled"
        assert body["status"] == "ERROR" and body["error"] == "Invalid status code: 499"
        assert body["payload"] == answers[request_id].json()
        assert body["payload"]["error_type"] == "cancelled"
    assert gate.batches == [[running]]  # the queued one never ran


def test_hanging_receiver_never_delays_the_gpu_lane(
    make_server: Callable[..., Any], receivers: Callable[..., WebhookReceiver]
) -> None:
    """R15: while a delivery hangs, later jobs run and complete; the delivery then finishes on its own."""
    receiver = receivers(script=(HANG,))  # held open until the test releases it
    server = make_server(webhook_timeout_s=60, fetch_allow=LOOPBACK, **FAST_RETRIES)
    with httpx.Client(base_url=server.url, timeout=30) as client:
        first = submit(client, webhook=receiver.url, seed=1)
        receiver.wait_for(1)
        later = [submit(client, seed=seed) for seed in (2, 3, 4)]
        wait_all_completed(client, later, timeout=30)  # well inside the 60 s the attempt may take
        # Every later job finished while the first delivery attempt was still open.
        assert server.app.state.store.webhook_state(first) == ("pending", 0, None)
        assert receiver.deliveries[0].status is None
        receiver.release.set()
        assert wait_webhook_state(server, first, "delivered") == ("delivered", 1, None)
    assert len(receiver.deliveries) == 1


def test_attempt_that_hangs_past_the_timeout_is_cut_off_and_retried(
    make_server: Callable[..., Any], receivers: Callable[..., WebhookReceiver]
) -> None:
    """R15: ``webhook_timeout_s`` bounds one attempt; the next attempt then delivers."""
    receiver = receivers(script=(HANG,))
    server = make_server(webhook_timeout_s=0.5, fetch_allow=LOOPBACK, **FAST_RETRIES)
    with httpx.Client(base_url=server.url, timeout=30) as client:
        request_id = submit(client, webhook=receiver.url, seed=1)
        assert wait_webhook_state(server, request_id, "delivered") == ("delivered", 2, None)
    receiver.wait_for(1, answered=True)
    first, second = receiver.deliveries
    assert first.status is None and second.status == 200  # the first was never answered: it timed out
    assert second.arrived - first.arrived >= 0.5 + 0.1 * 0.9  # the timeout, then the first retry delay


def test_attempts_stop_at_webhook_max_attempts(
    make_server: Callable[..., Any], receivers: Callable[..., WebhookReceiver]
) -> None:
    """R14: a receiver that always fails gets ``webhook_max_attempts`` attempts and no more."""
    receiver = receivers(default=503)
    server = make_server(
        webhook_max_attempts=3, webhook_retry_base_s=0.05, webhook_retry_max_s=0.1, fetch_allow=LOOPBACK
    )
    with httpx.Client(base_url=server.url, timeout=30) as client:
        request_id = submit(client, webhook=receiver.url, seed=1)
        assert wait_webhook_state(server, request_id, "failed") == ("failed", 3, "HTTP 503")
        assert "error" not in wait_status(client, request_id, "COMPLETED")  # the job itself is unaffected
    time.sleep(0.4)  # several retry delays: no fourth attempt may come
    assert [d.status for d in receiver.wait_for(3, answered=True)] == [503, 503, 503]


def test_pending_webhook_survives_a_restart_and_is_delivered_after_it(
    make_server: Callable[..., Any], receivers: Callable[..., WebhookReceiver], tmp_path: Any
) -> None:
    """A webhook whose first attempt failed is retried by the next process on the same data dir."""
    receiver = receivers(script=(500,))
    data_dir = tmp_path / "restart"
    clock = FakeClock(time.time() - 3600)  # never moves: this process's retry never falls due
    first = make_server(data_dir=data_dir, clock=clock, webhook_retry_base_s=60, fetch_allow=LOOPBACK)
    with httpx.Client(base_url=first.url, timeout=30) as client:
        request_id = submit(client, webhook=receiver.url, seed=5)
        assert wait_webhook_state(first, request_id, "pending", attempts=1) == ("pending", 1, "HTTP 500")
        output = result(client, request_id)
        jwks = jwks_of(client)
    first.stop()
    assert [d.status for d in receiver.wait_for(1, answered=True)] == [500]

    receiver.epoch = 2
    second = make_server(data_dir=data_dir, fetch_allow=LOOPBACK, **FAST_RETRIES)
    assert wait_webhook_state(second, request_id, "delivered") == ("delivered", 2, None)
    deliveries = receiver.wait_for(2, answered=True)
    assert [(d.epoch, d.status) for d in deliveries] == [(1, 500), (2, 200)]
    assert deliveries[1].json()["payload"] == output
    with httpx.Client(base_url=second.url, timeout=30) as client:
        assert jwks_of(client) == jwks  # the signing key is kept in the data dir
    assert_signed(deliveries[1], jwks, request_id, "anonymous")


def test_webhook_url_must_be_http(make_server: Callable[..., Any]) -> None:
    """A ``fal_webhook`` that is not an http(s) URL is refused at submit, before a job exists."""
    server = make_server()
    with httpx.Client(base_url=server.url, timeout=30) as client:
        answer = client.post(
            "/queue/fal-ai/fast-lightning-sdxl/inpainting",
            params={"fal_webhook": "file:///etc/passwd"},
            json={"image_url": data_uri(b"x"), "mask_url": data_uri(b"x"), "prompt": "x"},
        )
    assert answer.status_code == 400
    assert answer.json()["error_type"] == "bad_request"


def test_receiver_refusing_connections_does_not_touch_jobs_or_cancel(make_server: Callable[..., Any]) -> None:
    """R14: a receiver that is down (connection refused) is retried to the limit; jobs and cancel are unaffected."""
    from tests.live import free_port

    down = f"http://127.0.0.1:{free_port()}/hook"  # nothing listens here
    server = make_server(
        webhook_max_attempts=3, webhook_retry_base_s=0.05, webhook_retry_max_s=0.1, fetch_allow=LOOPBACK
    )
    with httpx.Client(base_url=server.url, timeout=30) as client:
        request_id = submit(client, webhook=down, seed=1)
        cancelled = submit(client, webhook=down, seed=2)
        cancel = client.put(requests_url(cancelled, "/cancel"))
        assert cancel.status_code in (202, 400)  # queued or already done: either way the API answers at once
        state, attempts, error = wait_webhook_state(server, request_id, "failed")
        assert (state, attempts) == ("failed", 3) and "ConnectError" in error
        assert "error" not in wait_status(client, request_id, "COMPLETED")
        assert wait_status(client, cancelled, "COMPLETED")["status"] == "COMPLETED"
