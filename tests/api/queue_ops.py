"""Queue helpers for the durability and webhook tests: inputs, submit, polling, results.

Inputs and URLs come from :mod:`tests.api.fal_wire`. Submit and polling stay separate: fal_wire's check
the wire format of every answer, which these tests leave to the protocol tests (they check states and outcomes).
"""

from __future__ import annotations

import datetime as dt
import time
from collections.abc import Iterable
from typing import Any

import httpx

from tests.api import fal_wire

APP = fal_wire.LIGHTNING
ENDPOINT = fal_wire.endpoint(APP)
BIG = {"width": 640, "height": 640}  # 1.5-3 s on one CPU thread with the tiny models: time to kill it mid-run


def inpaint_input(**overrides: Any) -> dict[str, Any]:
    """fal_wire's small input with PNG output: lossless, so tests can compare result images byte for byte."""
    return fal_wire.inpaint_input(**({"format": "png"} | overrides))


def submit(
    client: httpx.Client, webhook: str | None = None, headers: dict[str, str] | None = None, **overrides: Any
) -> str:
    """Queue a request (with these request ``headers``); returns its id once the server acknowledged it.

    Unlike ``fal_wire.submit`` it takes a webhook and does not check the response headers.
    """
    params = {"fal_webhook": webhook} if webhook else None
    response = client.post(f"/queue/{APP}", json=inpaint_input(**overrides), params=params, headers=headers)
    assert response.status_code == 200, response.text
    return response.json()["request_id"]


def requests_url(request_id: str, suffix: str = "") -> str:
    return fal_wire.request_url("", APP, request_id, suffix)


def status(client: httpx.Client, request_id: str) -> dict[str, Any]:
    """The status body with logs; unlike ``fal_wire.status`` it does not check the wire format of each poll."""
    response = client.get(requests_url(request_id, "/status"), params={"logs": "1"})
    assert response.status_code in (200, 202), response.text
    return response.json()


# Not fal_wire.wait_for: that polls through fal_wire.status, adding its wire-format checks.
def wait_status(client: httpx.Client, request_id: str, wanted: str, timeout: float = 60.0) -> dict[str, Any]:
    """Poll until the request shows ``wanted`` (IN_PROGRESS or COMPLETED); fail on COMPLETED when not wanted."""
    deadline = time.monotonic() + timeout
    while True:
        body = status(client, request_id)
        if body["status"] == wanted:
            return body
        assert body["status"] != "COMPLETED", f"{request_id} completed while waiting for {wanted}: {body}"
        assert time.monotonic() < deadline, f"{request_id} not {wanted} after {timeout} s: {body}"
        time.sleep(0.02)


def wait_all_completed(client: httpx.Client, ids: Iterable[str], timeout: float = 90.0) -> dict[str, dict[str, Any]]:
    """Poll until every request is COMPLETED; returns their final status bodies (with logs)."""
    deadline = time.monotonic() + timeout
    done: dict[str, dict[str, Any]] = {}
    pending = list(ids)
    while pending:
        for request_id in list(pending):
            body = status(client, request_id)
            if body["status"] == "COMPLETED":
                done[request_id] = body
                pending.remove(request_id)
        assert time.monotonic() < deadline, f"not completed after {timeout} s: {pending}"
        if pending:
            time.sleep(0.05)
    return done


def result(client: httpx.Client, request_id: str) -> dict[str, Any]:
    """The result of a request that succeeded."""
    response = client.get(requests_url(request_id))
    assert response.status_code == 200, response.text
    return response.json()


def image_bytes(client: httpx.Client, output: dict[str, Any], index: int = 0) -> bytes:
    """The bytes behind ``images[index].url`` of a result, fetched from ``client``'s server by path.

    The URL's host is the one the request was made to; after a restart on another port only the path holds.
    """
    response = client.get(httpx.URL(output["images"][index]["url"]).path)
    assert response.status_code == 200, response.text
    return response.content


def last_start(body: dict[str, Any]) -> dt.datetime:
    """When the request last started running: its last 'Starting inference' log line."""
    starts = [entry["timestamp"] for entry in body["logs"] if entry["message"].startswith("Starting inference")]
    assert starts, body["logs"]
    return dt.datetime.fromisoformat(starts[-1])
