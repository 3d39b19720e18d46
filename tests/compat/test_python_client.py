"""Contract tests: the real, unmodified Python ``fal_client`` (1.0.3) against the real server.

Two ways of pointing the client at the server, as the spec (§8.1, §13) documents them:

* TLS with environment variables only (the user recipe): ``FAL_KEY``, ``FAL_RUN_HOST``,
  ``FAL_QUEUE_RUN_HOST=host:port/queue`` and ``SSL_CERT_FILE`` (certifi + a CA made here). The
  client reads them at import, so it runs in a subprocess (``python_scenarios.py``).
* Plain HTTP in-process, with ``fal_client.client``'s URL constants patched (also covers uploads).

The client code lives in ``python_scenarios.py``; the checks here are shared by both transports.
"""

from __future__ import annotations

import asyncio
import base64
import io
import json
import os
import re
import ssl
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import certifi
import fal_client
import fal_client.client
import httpx
import numpy as np
import pytest
from PIL import Image

from server.delivery.webhooks import verify_signature
from tests.compat import python_scenarios as sc
from tests.compat.certs import make_tls_files
from tests.helpers import box_mask, noise_image, png
from tests.live import LOOPBACK, LiveServer
from tests.webhook_receiver import WebhookReceiver

KEY = "secret"
PROMPT = "a lighthouse on a cliff"
SCRIPT = Path(sc.__file__)
OUTPUT_KEYS = {"images", "timings", "seed", "has_nsfw_concepts", "prompt"}
Verify = ssl.SSLContext | bool


def data_uri(image: Image.Image) -> str:
    return "data:image/png;base64," + base64.b64encode(png(image)).decode()


def base_input(**overrides: Any) -> dict[str, Any]:
    """A small request (64x48, 2 steps) with inline inputs, so each inference takes a fraction of a second."""
    return {
        "image_url": data_uri(noise_image(64, 48)),
        "mask_url": data_uri(box_mask(64, 48)),
        "prompt": PROMPT,
        "image_size": {"width": 64, "height": 48},
        "num_inference_steps": "2",
        **overrides,
    }


class SeedGate:
    """The real engine; requests with the scenario module's "held" seeds stop after their first step.

    Seeds in ``sc.HELD_UNTIL_RELEASED`` wait for :meth:`release`; seeds in ``sc.HELD_UNTIL_CANCELLED``
    wait until the server asks the engine to stop them. ``ran`` lists the seeds in the order they ran.
    """

    def __init__(self, engine: Any) -> None:
        self.engine = engine
        self.released = {seed: threading.Event() for seed in sc.HELD_UNTIL_RELEASED}
        self.ran: list[int] = []

    def __getattr__(self, name: str) -> Any:
        return getattr(self.engine, name)

    def release(self, seed: int) -> None:
        self.released[seed].set()

    def run(
        self, requests: Sequence[Any], should_stop: Callable | None = None, on_progress: Callable | None = None
    ) -> Any:
        seeds = {r.request_id: r.seed for r in requests}
        self.ran.extend(seeds.values())

        def progress(request_id: str, step: int, total: int) -> None:
            if on_progress is not None:
                on_progress(request_id, step, total)
            seed = seeds[request_id]
            event = self.released.get(seed)
            if event is None and seed not in sc.HELD_UNTIL_CANCELLED:
                return
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline:
                if event is not None and event.wait(0.01):
                    return
                if should_stop is not None and should_stop(request_id):
                    return
                if event is None:
                    time.sleep(0.01)

        return self.engine.run(requests, should_stop, progress)


@pytest.fixture
def receiver() -> Iterator[WebhookReceiver]:
    rec = WebhookReceiver()
    yield rec
    rec.close()


def _reset_module_clients() -> None:
    """``fal_client``'s module-level clients cache credentials, the HTTP client and the CDN token manager
    (which captures ``REST_URL`` and a server's upload token) on first use: start each test afresh."""
    for client in (fal_client.sync_client, fal_client.async_client):
        for name in ("_auth", "_client", "_token_manager"):
            client.__dict__.pop(name, None)


@dataclass
class Target:
    server: LiveServer
    gate: SeedGate

    @property
    def url(self) -> str:
        return self.server.url


@pytest.fixture
def http_target(
    make_server: Callable[..., LiveServer], engine: Any, monkeypatch: pytest.MonkeyPatch
) -> Iterator[Callable[..., Target]]:
    """Start a plain-HTTP server (API key ``KEY``) and point the in-process client at it (spec §8.1 recipe B)."""
    monkeypatch.setenv("FAL_KEY", KEY)
    _reset_module_clients()

    def start(**settings: Any) -> Target:
        gate = SeedGate(engine)
        server = make_server(engine_override=gate, api_keys=[KEY], fetch_allow=LOOPBACK, **settings)
        monkeypatch.setattr(fal_client.client, "RUN_URL_FORMAT", f"{server.url}/")
        monkeypatch.setattr(fal_client.client, "QUEUE_URL_FORMAT", f"{server.url}/queue/")
        monkeypatch.setattr(fal_client.client, "REST_URL", server.url)
        monkeypatch.setattr(fal_client.client, "CDN_URL", server.url)
        return Target(server, gate)

    yield start
    _reset_module_clients()


# ---------------------------------------------------------------------------- checks shared by both transports


def check_output(output: dict[str, Any], seed: int, server_url: str, verify: Verify) -> None:
    """fal's output shape, the seed echoed, and an image URL on this server that serves a 64x48 JPEG."""
    assert set(output) == OUTPUT_KEYS
    assert output["seed"] == seed
    assert output["prompt"] == PROMPT
    assert len(output["has_nsfw_concepts"]) == 1 and isinstance(output["has_nsfw_concepts"][0], bool)
    assert output["timings"]["inference"] > 0
    [image] = output["images"]
    assert image["url"].startswith(f"{server_url}/files/")
    assert (image["width"], image["height"], image["content_type"]) == (64, 48, "image/jpeg")
    response = httpx.get(image["url"], verify=verify)
    assert response.status_code == 200
    assert response.headers["content-type"] == "image/jpeg"
    assert len(response.content) == image["file_size"]
    with Image.open(io.BytesIO(response.content)) as decoded:
        assert (decoded.format, decoded.size) == ("JPEG", (64, 48))


def check_uuid(value: str) -> None:
    assert str(uuid.UUID(value)) == value


def check_run(data: dict[str, Any], server_url: str, verify: Verify) -> None:
    check_output(data["lightning"], sc.SEED_RUN, server_url, verify)
    check_output(data["hyper"], sc.SEED_HYPER, server_url, verify)


def check_subscribe(data: dict[str, Any], server_url: str, verify: Verify) -> None:
    check_uuid(data["request_id"])
    updates = data["updates"]
    order = {"Queued": 0, "InProgress": 1, "Completed": 2}
    ranks = [order[u["type"]] for u in updates]
    assert ranks == sorted(ranks), ranks  # states only move forward
    # Seen while held after step 1: the logs arrive live, not only at the end.
    live = [u for u in updates if u["type"] == "InProgress" and "Step 1/2" in sc.messages(u)]
    assert live and "Step 2/2" not in sc.messages(live[0])
    assert all(u["logs"] is not None for u in updates if u["type"] != "Queued")
    last = updates[-1]
    assert last["type"] == "Completed" and last["error"] is None and last["error_type"] is None
    assert {"Request queued", "Step 1/2", "Step 2/2"} <= set(sc.messages(last))
    assert all(set(entry) == {"message", "level", "source", "timestamp"} for entry in last["logs"])
    check_output(data["result"], sc.SEED_SUBSCRIBE, server_url, verify)


def check_submit(data: dict[str, Any], server_url: str, verify: Verify) -> None:
    request_id = data["request_id"]
    check_uuid(request_id)
    assert data["first_status"]["type"] in ("Queued", "InProgress", "Completed")
    check_output(data["result"], sc.SEED_SUBMIT, server_url, verify)
    assert data["result_by_id"] == data["result"]
    done = data["handle_status"]
    assert done["type"] == "Completed" and done["error"] is None
    assert {"Request queued", "Step 2/2"} <= set(sc.messages(done))
    assert done["metrics"]["inference_time"] > 0
    assert data["status_by_id"] == done
    assert data["status_without_logs"]["type"] == "Completed" and data["status_without_logs"]["logs"] is None
    # submit's *_url fields are exactly what the client builds from (app, request_id) itself.
    base = f"{server_url}/queue/fal-ai/fast-lightning-sdxl/requests/{request_id}"
    assert data["handle_urls"] == data["rebuilt_urls"] == [base, f"{base}/status", f"{base}/cancel"]
    assert data["cancel_completed"]["status_code"] == 400
    assert data["cancel_completed"]["error_type"] == "already_completed"
    assert data["cancel_completed"]["request_id"] == request_id
    assert data["unknown_status"]["status_code"] == 404


def check_cancel(data: dict[str, Any], gate: SeedGate) -> None:
    assert data["running_before"]["type"] == "InProgress"
    assert data["queued_before"] == {"type": "Queued", "position": 0}
    queued_after = data["queued_after"]
    assert queued_after["type"] == "Completed" and queued_after["error_type"] == "cancelled"
    assert not any(m.startswith("Step") for m in sc.messages(queued_after))
    for key, request_id in (("queued_result", data["queued_id"]), ("running_result", data["running_id"])):
        error = data[key]
        assert (error["status_code"], error["error_type"], error["request_id"]) == (499, "cancelled", request_id)
    running_after = data["running_after"]
    assert running_after["type"] == "Completed" and running_after["error_type"] == "cancelled"
    assert "Step 1/2" in sc.messages(running_after) and "Step 2/2" not in sc.messages(
        running_after
    )  # stopped at step 2
    assert data["cancel_again"]["status_code"] == 400
    assert sc.SEED_CANCEL_RUNNING in gate.ran and sc.SEED_CANCEL_QUEUED not in gate.ran


def check_priority(data: dict[str, Any], gate: SeedGate) -> None:
    assert data["positions"] == {
        "low": {"type": "Queued", "position": 1},
        "normal": {"type": "Queued", "position": 0},
    }
    timeout = data["timeout_error"]
    assert (timeout["status_code"], timeout["error_type"]) == (504, "request_timeout")
    assert 1.5 <= data["timeout_waited_s"] < 15
    assert data["seeds"] == {"blocker": sc.SEED_BLOCKER, "normal": sc.SEED_NORMAL, "low": sc.SEED_LOW}
    order = [s for s in gate.ran if s in (sc.SEED_BLOCKER, sc.SEED_NORMAL, sc.SEED_LOW, sc.SEED_TIMEOUT)]
    assert order == [sc.SEED_BLOCKER, sc.SEED_NORMAL, sc.SEED_LOW]  # low waited; the timed-out one never ran


def check_validation(data: dict[str, Any]) -> None:
    for key in ("run", "submit", "hyper_8"):
        error = data[key]
        assert error["status_code"] == 422, error
        assert isinstance(error["message"], list)
        assert [item["loc"] for item in error["message"]] == [["body", "num_inference_steps"]], error
        assert all(item["msg"] and item["type"] for item in error["message"])
    (long_prompt,) = data["long_prompt"]["message"]
    assert data["long_prompt"]["status_code"] == 422 and long_prompt["loc"] == ["body", "prompt"], long_prompt
    assert long_prompt["type"] == "string_too_long" and long_prompt["input"] == "x" * 40 + "… (10001 chars)"
    (no_mask,) = data["no_mask"]["message"]
    assert data["no_mask"]["status_code"] == 422 and no_mask["loc"] == ["body", "mask_url"], no_mask
    echoed = no_mask["input"]["image_url"]  # the whole input is echoed, its data URIs cut to a prefix
    assert echoed.startswith("data:image/png;base64,") and echoed.endswith(" chars)") and len(echoed) < 60, echoed


def check_webhook(data: dict[str, Any], receiver: WebhookReceiver, server_url: str, verify: Verify) -> None:
    check_output(data["result"], sc.SEED_WEBHOOK, server_url, verify)
    deliveries = receiver.wait_for(1)
    assert len(deliveries) == 1, deliveries
    [delivery] = deliveries
    body = delivery.json()
    assert body["status"] == "OK" and "error" not in body
    assert body["request_id"] == body["gateway_request_id"] == data["request_id"]
    assert body["payload"] == data["result"]
    assert body["payload"]["images"][0]["width"] == 64
    jwks = httpx.get(f"{server_url}/.well-known/jwks.json", verify=verify).json()
    assert verify_signature(jwks, delivery.headers, delivery.body)
    # The server has recorded the delivery as done, so no second POST is coming.
    wait_for_metric(server_url, verify, 'inpaint_webhook_attempts_total{outcome="delivered"}', 1.0)
    assert len(receiver.deliveries) == 1


def wait_for_metric(server_url: str, verify: Verify, series: str, value: float, timeout: float = 10.0) -> None:
    pattern = re.compile(rf"^{re.escape(series)} (\S+)$", re.MULTILINE)
    deadline = time.monotonic() + timeout
    while True:
        found = pattern.search(httpx.get(f"{server_url}/metrics", verify=verify).text)
        if found and float(found.group(1)) == value:
            return
        assert time.monotonic() < deadline, f"{series} never reached {value}"
        time.sleep(0.05)


def check_async(data: dict[str, Any], server_url: str, verify: Verify) -> None:
    check_output(data["run"], sc.SEED_ASYNC_RUN, server_url, verify)
    check_output(data["subscribe"], sc.SEED_ASYNC_SUBSCRIBE, server_url, verify)
    last = data["subscribe_updates"][-1]
    assert last["type"] == "Completed" and "Step 2/2" in sc.messages(last)
    check_uuid(data["request_id"])
    check_output(data["result"], sc.SEED_ASYNC_SUBMIT, server_url, verify)
    assert data["result_by_id"] == data["result"]
    assert data["status_by_id"]["type"] == "Completed" and "Step 2/2" in sc.messages(data["status_by_id"])
    assert data["cancel_completed"]["status_code"] == 400
    assert data["invalid"]["status_code"] == 422
    assert data["invalid"]["message"][0]["loc"] == ["body", "num_inference_steps"]


def check_keys(data: dict[str, Any], server_url: str, verify: Verify) -> None:
    check_output(data["result"], sc.SEED_KEYS, server_url, verify)
    for call in ("run", "submit", "status", "result_by_id", "cancel"):
        error = data[call]
        assert (error["status_code"], error["error_type"]) == (401, "unauthorized"), (call, error)


# ---------------------------------------------------------------------------- TLS, environment variables only


def test_tls_recipe_with_environment_variables_only(
    make_server: Callable[..., LiveServer], engine: Any, receiver: WebhookReceiver, tmp_path: Path
) -> None:
    """The documented recipe end to end: the unmodified client configured by env vars, over TLS."""
    tls = make_tls_files(tmp_path / "tls")
    bundle = tls.bundle(Path(certifi.where()), tmp_path / "bundle.pem")
    gate = SeedGate(engine)
    server = make_server(
        engine_override=gate,
        ssl_certfile=tls.server_cert,
        ssl_keyfile=tls.server_key,
        api_keys=[KEY],
        max_batch_size=1,
        fetch_allow=LOOPBACK,  # the webhook receiver listens on 127.0.0.1
    )
    assert server.url.startswith("https://")
    args_file = tmp_path / "args.json"
    args_file.write_text(json.dumps(base_input()))
    env = {k: v for k, v in os.environ.items() if not k.startswith(("FAL_", "SSL_CERT_"))}
    env |= {
        "FAL_KEY": KEY,
        "FAL_RUN_HOST": server.hostport,
        "FAL_QUEUE_RUN_HOST": f"{server.hostport}/queue",
        "SSL_CERT_FILE": str(bundle),
    }
    stderr_path = tmp_path / "client.stderr"
    results: dict[str, Any] | None = None
    with stderr_path.open("w") as stderr:
        proc = subprocess.Popen(
            [sys.executable, str(SCRIPT), str(args_file), receiver.url],
            stdout=subprocess.PIPE,
            stderr=stderr,
            text=True,
            env=env,
            cwd=tmp_path,
        )
        watchdog = threading.Timer(180, proc.kill)
        watchdog.start()
        try:
            assert proc.stdout is not None
            for line in proc.stdout:
                if line.startswith("EVENT release:"):
                    gate.release(int(line.split(":", 1)[1]))
                elif line.startswith("RESULT "):
                    results = json.loads(line[len("RESULT ") :])
            returncode = proc.wait()
        finally:
            watchdog.cancel()
    assert returncode == 0 and results is not None, stderr_path.read_text()[-5000:]

    verify = ssl.create_default_context(cafile=str(tls.ca_cert))
    check_run(results["run"], server.url, verify)
    check_subscribe(results["subscribe"], server.url, verify)
    check_submit(results["submit"], server.url, verify)
    check_cancel(results["cancel"], gate)
    check_priority(results["priority"], gate)
    check_validation(results["validation"])
    check_webhook(results["webhook"], receiver, server.url, verify)
    check_async(results["async"], server.url, verify)
    check_keys(results["keys"], server.url, verify)


# ---------------------------------------------------------------------------- plain HTTP, constants patched


def test_http_run_both_apps_with_hint_and_start_timeout(http_target: Callable[..., Target]) -> None:
    """``run`` on both apps (hint and start_timeout headers accepted): fal's output shape, fetchable image."""
    target = http_target()
    check_run(sc.run_apps(base_input()), target.url, True)


def test_http_subscribe_sees_logs_while_running(http_target: Callable[..., Target]) -> None:
    """``subscribe(with_logs=True)`` reports ``Step 1/2`` while the request is held mid-inference."""
    target = http_target()
    check_subscribe(sc.subscribe_with_logs(base_input(), notify_gate(target.gate)), target.url, True)


def test_http_submit_status_result_and_calls_by_request_id(http_target: Callable[..., Target]) -> None:
    """``submit`` + handle and module-level ``status``/``result``/``cancel`` by request id."""
    target = http_target()
    check_submit(sc.submit_status_result(base_input()), target.url, True)


def test_http_cancel_running_and_queued(http_target: Callable[..., Target]) -> None:
    """Cancelling a running request stops it at its next step (499); a queued one never runs."""
    target = http_target()
    check_cancel(sc.cancel_running_and_queued(base_input()), target.gate)


def test_http_low_priority_and_start_timeout(http_target: Callable[..., Target]) -> None:
    """``priority="low"`` runs after later normal requests; an expired ``start_timeout`` is a 504."""
    target = http_target(max_batch_size=1)
    check_priority(sc.priority_and_start_timeout(base_input(), notify_gate(target.gate)), target.gate)


def test_http_validation_error_is_422_with_field_detail(http_target: Callable[..., Target]) -> None:
    """A step count the app does not have is ``FalClientHTTPError`` 422 naming the field."""
    http_target()
    check_validation(sc.validation_errors(base_input()))


def test_http_webhook(http_target: Callable[..., Target], receiver: WebhookReceiver) -> None:
    """``submit(webhook_url=...)``: one signed POST with status OK and the result as payload."""
    target = http_target()
    check_webhook(sc.webhook(base_input(), receiver.url), receiver, target.url, True)


def test_http_async_client(http_target: Callable[..., Target]) -> None:
    """``AsyncClient``: run, subscribe (low priority), submit, status/result/cancel by id, 422."""
    target = http_target()
    check_async(sc.async_client(base_input()), target.url, True)


def test_http_api_keys(http_target: Callable[..., Target]) -> None:
    """The configured key works; a wrong key is a 401 on run, submit, status, result and cancel."""
    target = http_target()
    check_keys(sc.api_keys(base_input(), KEY), target.url, True)


def test_http_uploads_feed_a_run(http_target: Callable[..., Target]) -> None:
    """``fal_client.upload_image``/``upload`` (token + CDN emulation) give URLs the server reads as inputs."""
    target = http_target()
    photo = noise_image(64, 48, seed=3)
    image_url = fal_client.upload_image(photo, format="png")
    mask_url = fal_client.upload(png(box_mask(64, 48)), "image/png", file_name="mask.png")
    async_url = asyncio.run(fal_client.AsyncClient().upload(png(photo), "image/png", file_name="photo.png"))
    for url in (image_url, mask_url, async_url):
        assert url.startswith(f"{target.url}/uploads/")
    assert mask_url.endswith("/mask.png")
    for url in (image_url, async_url):
        fetched = httpx.get(url)
        assert fetched.status_code == 200 and fetched.headers["content-type"] == "image/png"
        with Image.open(io.BytesIO(fetched.content)) as decoded:
            assert np.array_equal(np.asarray(decoded.convert("RGB")), np.asarray(photo))
    output = fal_client.run(sc.LIGHTNING, base_input(image_url=image_url, mask_url=mask_url, seed=77))
    check_output(output, 77, target.url, True)


def notify_gate(gate: SeedGate) -> sc.Notify:
    """In-process stand-in for the script's ``EVENT release:<seed>`` lines."""

    def notify(event: str) -> None:
        name, _, seed = event.partition(":")
        assert name == "release"
        gate.release(int(seed))

    return notify
