"""``POST /{app}/stream``: step previews over server-sent events, over raw HTTP (docs/streaming.md).

The JS client's ``fal.stream(...)`` against the same route is in tests/compat/test_node_clients.py.
"""

from __future__ import annotations

import base64
import io
import time
from collections.abc import Callable, Sequence
from typing import Any

import httpx
from PIL import Image

from tests.api.fal_wire import LIGHTNING, client_for, data_uri, inpaint_input, poll_until, request_url, sse_events
from tests.live import GatedEngine

KEEPALIVE_S = 0.3
STREAM = f"/{LIGHTNING}/stream"


class PacedEngine(GatedEngine):
    """The real engine, pausing after each step so that each step's preview is read before the next replaces it
    (the store keeps the newest only), and able to hold runs like :class:`GatedEngine`."""

    def __init__(self, engine: Any, pause_s: float = 0.2) -> None:
        super().__init__(engine)
        self.pause_s = pause_s

    def run(self, requests: Sequence[Any], should_stop: Callable | None = None, on_progress: Callable | None = None):
        def progress(request_id: str, step: int, total: int, *preview: Any) -> None:
            if on_progress is not None:
                on_progress(request_id, step, total, *preview)
            time.sleep(self.pause_s)

        return super().run(requests, should_stop, progress)


def jpeg_size(preview: dict[str, Any]) -> tuple[int, int]:
    """Decode a preview's data URI; its pixel size (and check what it says about itself)."""
    head, _, data = preview["url"].partition(",")
    assert head == "data:image/jpeg;base64" and preview["content_type"] == "image/jpeg"
    with Image.open(io.BytesIO(base64.b64decode(data))) as image:
        assert image.format == "JPEG"
        assert image.size == (preview["width"], preview["height"])
        return image.size


def test_a_queued_stream_sends_its_position_keepalives_every_step_and_the_result(make_server, engine) -> None:
    gate = PacedEngine(engine)
    server = make_server(engine_override=gate, stream_keepalive_s=KEEPALIVE_S)
    with client_for(server) as client:
        gate.hold = True
        blocker = client.post(f"/queue/{LIGHTNING}", json=inpaint_input(num_inference_steps="1")).json()["request_id"]
        assert gate.started.wait(30)
        body = inpaint_input(num_inference_steps="2", num_images=2, seed=5)
        started = time.monotonic()
        with client.stream("POST", STREAM, json=body) as response:
            opened = time.monotonic() - started
            assert response.status_code == 200 and response.headers["content-type"].startswith("text/event-stream")
            rid = response.headers["x-fal-request-id"]
            events = sse_events(response)
            assert next(events) == {"request_id": rid, "status": "IN_QUEUE", "queue_position": 0}
            assert next(events) is None  # a keep-alive comment while it waits
            gate.release.set()
            rest = [e for e in events if e is not None]
    assert opened >= KEEPALIVE_S * 0.9  # the head was held while nothing could be said yet
    progress, final = rest[:-1], rest[-1]
    assert [(e["request_id"], e["step"], e["total_steps"]) for e in progress] == [(rid, 1, 2), (rid, 2, 2)]
    for event in progress:
        assert [jpeg_size(p) for p in event["previews"]] == [(8, 6), (8, 6)]  # 1/8 of 64x48, one per image
    with client_for(server) as client:
        assert final == client.get(request_url("", LIGHTNING, rid)).json()  # exactly the run's output
        assert client.get(request_url("", LIGHTNING, blocker, "/status")).json()["status"] == "COMPLETED"
    assert [(i["width"], i["height"]) for i in final["images"]] == [(64, 48), (64, 48)]
    assert final["seed"] == 5 and len(final["has_nsfw_concepts"]) == 2 and "inference" in final["timings"]
    assert server.app.state.store.preview(rid) is None  # dropped when the request ended


def test_refusals_and_failures_before_the_stream_opens_are_http_errors(make_server, engine) -> None:
    server = make_server(engine_override=PacedEngine(engine, 0.0), api_keys=["k"], stream_keepalive_s=5.0)
    key = {"Authorization": "Key k"}
    with client_for(server) as client:
        anonymous = client.post(STREAM, json=inpaint_input())
        assert anonymous.status_code == 401 and anonymous.json()["error_type"] == "unauthorized"
        invalid = client.post(STREAM, json=inpaint_input(strength=5), headers=key)
        assert invalid.status_code == 422 and invalid.headers["content-type"] == "application/json"
        assert [e["loc"][-1] for e in invalid.json()["detail"]] == ["strength"]
        assert server.app.state.store.counts() == {}  # nothing was queued for either
        # Not an image: found by the worker while the head is held, so it is a 422 like a run's, not an event.
        broken = client.post(STREAM, json=inpaint_input(image_url=data_uri(b"not an image")), headers=key)
        assert broken.status_code == 422 and broken.headers["x-fal-error-type"] == "invalid_input"
        assert [e["loc"][-1] for e in broken.json()["detail"]] == ["image_url"]
        rid = broken.headers["x-fal-request-id"]
        stored = client.get(request_url("", LIGHTNING, rid), headers=key)
        assert broken.json()["message"].startswith("image_url")  # what the JS client shows
        assert (stored.status_code, {**stored.json(), "message": broken.json()["message"]}) == (422, broken.json())
        fine = client.post(STREAM, json=inpaint_input(num_inference_steps="1"), headers=key)
        assert fine.status_code == 200 and list(sse_events(fine))[-1]["images"]  # the next one runs


def test_a_cancel_ends_the_stream_with_an_error_event_and_a_disconnect_cancels(make_server, engine) -> None:
    gate = PacedEngine(engine, 0.0)
    server = make_server(engine_override=gate, stream_keepalive_s=KEEPALIVE_S)
    store = server.app.state.store
    gate.hold = True
    with client_for(server) as client:
        with client.stream("POST", STREAM, json=inpaint_input(num_inference_steps="2")) as response:
            rid = response.headers["x-fal-request-id"]
            events = sse_events(response)
            assert next(events)["step"] == 1  # the head opened with the first preview; the engine holds
            assert client.put(request_url("", LIGHTNING, rid, "/cancel")).status_code == 202
            gate.release.set()
            last = [e for e in events if e is not None][-1]
        assert last["request_id"] == rid and last["error_type"] == "cancelled" and "images" not in last
        assert last["status"] == "COMPLETED" and last["error"] == last["detail"]

        gate.started.clear()
        gate.release.clear()
        with client.stream("POST", STREAM, json=inpaint_input(num_inference_steps="2")) as response:
            gone = response.headers["x-fal-request-id"]
            assert next(sse_events(response))["step"] == 1
        # The client went away while the engine holds its request after step 1: it is cancelled.
        poll_until(lambda: store.get(gone).cancel_requested, what="the disconnect to cancel the request")
        gate.release.set()
        poll_until(lambda: store.get(gone).state.is_terminal(), what="the cancelled request to end")
        assert store.get(gone).error_type == "cancelled"
        assert "Step 2/2" not in [line["message"] for line in store.get(gone).logs]


def test_the_queue_host_serves_the_stream_too(make_server, engine) -> None:
    server = make_server(engine_override=PacedEngine(engine, 0.0))
    with httpx.Client(base_url=server.url, timeout=30) as client:
        response = client.post(f"/queue{STREAM}", json=inpaint_input(num_inference_steps="1", sync_mode=True))
    assert response.status_code == 200
    events = list(sse_events(response))
    final = events[-1]
    assert final["images"][0]["url"].startswith("data:image/jpeg;base64,")  # sync_mode: inline, as a run's
    assert server.app.state.store.result(response.headers["x-fal-request-id"]) is None  # handed over, not kept
