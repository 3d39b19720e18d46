"""Helpers for the HTTP protocol tests: inputs, submit/poll helpers, a fake clock, a held engine.

Every status body that passes through :func:`status` is checked against the rules every fal client
relies on (only three wire states, ``logs`` key always present, ``queue_position`` while queued), so
each test that polls also checks the wire format.
"""

from __future__ import annotations

import base64
import functools
import json
import time
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.helpers import box_mask, noise_image, png
from tests.live import GatedEngine, LiveServer

LIGHTNING = "fal-ai/fast-lightning-sdxl/inpainting"
HYPER = "fal-ai/hyper-sdxl/inpainting"
WIRE_STATES = ("IN_QUEUE", "IN_PROGRESS", "COMPLETED")
SIZE = {"width": 64, "height": 48}


def data_uri(data: bytes, mime: str = "image/png") -> str:
    return f"data:{mime};base64,{base64.b64encode(data).decode()}"


@functools.cache
def _image_uris() -> tuple[str, str]:
    return data_uri(png(noise_image(64, 48, seed=3))), data_uri(png(box_mask(64, 48)))


def inpaint_input(**overrides: Any) -> dict[str, Any]:
    """A small valid input (64x48 data URIs); keyword arguments replace or add fields."""
    image, mask = _image_uris()
    body: dict[str, Any] = {"image_url": image, "mask_url": mask, "prompt": "a red door", "image_size": dict(SIZE)}
    body.update(overrides)
    return body


def endpoint(app_id: str) -> str:
    """``owner/alias``: what status, result and cancel URLs carry (fal drops the sub-path)."""
    return "/".join(app_id.split("/")[:2])


def request_url(base: str, app_id: str, request_id: str, suffix: str = "") -> str:
    return f"{base}/queue/{endpoint(app_id)}/requests/{request_id}{suffix}"


def submit(
    client: httpx.Client, app_id: str = LIGHTNING, headers: dict[str, str] | None = None, **overrides: Any
) -> dict[str, Any]:
    """Queue a request; asserts the submit answer is 200 and returns its JSON."""
    response = client.post(f"/queue/{app_id}", json=inpaint_input(**overrides), headers=headers)
    assert response.status_code == 200, response.text
    body = response.json()
    assert response.headers["x-fal-request-id"] == body["request_id"]
    return body


def check_status_body(body: dict[str, Any]) -> None:
    """The rules fal's clients rely on, for every status body (polling and SSE)."""
    assert body["status"] in WIRE_STATES, body
    assert "logs" in body, body  # Python reads data["logs"] unconditionally
    if body["status"] == "IN_QUEUE":
        assert isinstance(body["queue_position"], int) and body["queue_position"] >= 0, body
    if body["status"] == "COMPLETED":
        assert "inference_time" in body["metrics"], body


def status(
    client: httpx.Client, app_id: str, request_id: str, logs: str | None = None, headers: dict[str, str] | None = None
) -> httpx.Response:
    """GET the status; checks the code against the state (202 pending, 200 completed) and the body."""
    params = {"logs": logs} if logs is not None else None
    response = client.get(request_url("", app_id, request_id, "/status"), params=params, headers=headers)
    assert response.status_code in (200, 202), response.text
    body = response.json()
    check_status_body(body)
    assert response.status_code == (200 if body["status"] == "COMPLETED" else 202), body
    assert response.headers["x-fal-request-id"] == request_id
    return response


def wait_for(
    client: httpx.Client, app_id: str, request_id: str, wire: str = "COMPLETED", timeout: float = 30.0, **kw: Any
) -> dict[str, Any]:
    """Poll the status (like the Python client, every 20 ms) until it is ``wire``; returns the body."""
    deadline = time.monotonic() + timeout
    while True:
        body = status(client, app_id, request_id, **kw).json()
        if body["status"] == wire:
            return body
        assert body["status"] != "COMPLETED", f"expected {wire}, got {body}"
        assert time.monotonic() < deadline, f"{request_id} still {body['status']} after {timeout} s"
        time.sleep(0.02)


def poll_until(condition: Callable[[], bool], timeout: float = 15.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


def metric_samples(client: httpx.Client) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """``/metrics`` as {(sample name, sorted labels): value}."""
    response = client.get("/metrics")
    assert response.status_code == 200
    out = {}
    for family in text_string_to_metric_families(response.text):
        for sample in family.samples:
            out[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return out


def gauge(client: httpx.Client, name: str) -> float:
    return metric_samples(client)[(name, ())]


class FakeClock:
    """An injectable clock: ``clock()`` is the current time, ``advance(s)`` moves it on."""

    def __init__(self, start: float | None = None) -> None:
        self.now = time.time() if start is None else start

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def gated_server(
    make_server: Callable[..., LiveServer], engine: Any, request: pytest.FixtureRequest, **settings: Any
) -> tuple[LiveServer, GatedEngine]:
    """A live server over a :class:`GatedEngine` (set ``.hold = True`` to hold runs).

    The gate is released when the test ends, before the server stops, so no engine thread is left
    waiting.
    """
    gate = GatedEngine(engine)
    server = make_server(engine_override=gate, **settings)
    request.addfinalizer(gate.release.set)
    return server, gate


def hold_one(client: httpx.Client, gate: GatedEngine, app_id: str = LIGHTNING) -> str:
    """Submit a request and return its id once the engine is holding it after its first step."""
    gate.hold = True
    held = submit(client, app_id)["request_id"]
    assert gate.started.wait(30), "the engine never started the held request"
    return held


def client_for(server: LiveServer, **kw: Any) -> httpx.Client:
    return httpx.Client(base_url=server.url, timeout=30.0, **kw)


def sse_events(response: httpx.Response) -> Iterator[dict[str, Any] | None]:
    """Parse a ``text/event-stream`` body: yields each ``data:`` JSON, ``None`` for comments."""
    for line in response.iter_lines():
        if line.startswith("data:"):
            yield json.loads(line[len("data:") :].strip())
        elif line.startswith(":"):
            yield None
