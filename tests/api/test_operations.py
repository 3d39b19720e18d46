"""Operations: liveness and honest readiness, Prometheus metrics, the OpenAPI document, the SSE status stream."""

from __future__ import annotations

import itertools
import logging
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
from huggingface_hub import constants as hf_constants

from server import cli
from server.app import create_app
from server.settings import load_settings
from tests.api.fal_wire import (
    HYPER,
    LIGHTNING,
    WIRE_STATES,
    check_status_body,
    client_for,
    endpoint,
    gated_server,
    gauge,
    hold_one,
    inpaint_input,
    metric_samples,
    poll_until,
    sse_events,
    status,
    submit,
    wait_for,
)
from tests.live import LiveServer, free_port


def _serve_without_waiting(app: Any) -> tuple[LiveServer, threading.Thread]:
    """Run ``app`` on a live port without waiting for readiness (it may never become ready)."""
    live = LiveServer(app)
    thread = threading.Thread(target=live.server.run, daemon=True)
    thread.start()
    poll_until(lambda: live.server.started, what="uvicorn to start")
    return live, thread


def test_liveness_answers(make_server) -> None:
    server = make_server()
    response = httpx.get(f"{server.url}/health/live")
    assert response.status_code == 200 and response.json() == {"status": "ok"}


def test_ready_is_503_until_the_engine_is_loaded(engine, tmp_path: Path) -> None:
    loaded = threading.Event()

    def loader() -> Any:
        assert loaded.wait(30), "the test never let the engine load"
        return engine

    app = create_app(load_settings({"data_dir": tmp_path / "data", "warmup": False}), engine_loader=loader)
    live, thread = _serve_without_waiting(app)
    try:
        with client_for(live) as client:
            assert client.get("/health/live").status_code == 200
            ready = client.get("/health/ready")
            assert ready.status_code == 503 and ready.json()["status"] == "loading"
            assert ready.headers["content-type"] == "application/json"
            assert gauge(client, "inpaint_ready") == 0
            # Requests are accepted (durably queued) while the models load, and run once they are ready.
            rid = submit(client, HYPER)["request_id"]
            assert status(client, HYPER, rid).json()["status"] == "IN_QUEUE"
            loaded.set()
            poll_until(lambda: client.get("/health/ready").status_code == 200, what="readiness")
            body = client.get("/health/ready").json()
            assert body["status"] == "ready"
            assert [(w["state"], w["device"]) for w in body["workers"]] == [("ready", "cpu")]  # the embedded worker
            # ... and so do its metrics at once, not at its next heartbeat.
            up = [line for line in client.get("/metrics").text.splitlines() if line.startswith("inpaint_worker_up{")]
            assert len(up) == 1 and 'device="cpu"' in up[0] and up[0].endswith(" 1.0"), up
            assert gauge(client, "inpaint_ready") == 1
            assert "error" not in wait_for(client, HYPER, rid)
    finally:
        loaded.set()
        live.server.should_exit = True
        thread.join(30)


def test_ready_stays_503_with_the_reason_when_loading_fails(tmp_path: Path) -> None:
    def loader() -> Any:
        raise FileNotFoundError("unet.safetensors is missing; run inpaint-server download")

    app = create_app(load_settings({"data_dir": tmp_path / "data", "warmup": False}), engine_loader=loader)
    live, thread = _serve_without_waiting(app)
    try:
        with client_for(live) as client:
            poll_until(lambda: client.get("/health/ready").json()["status"] == "failed", what="the load to fail")
            ready = client.get("/health/ready")
            assert ready.status_code == 503
            assert "unet.safetensors is missing" in ready.json()["detail"]
            assert client.get("/health/live").status_code == 200
            # No request waits forever on models that will never load: a clear 500, not a retryable 503.
            refused = client.post(f"/queue/{LIGHTNING}", json=inpaint_input())
            assert refused.status_code == 500, refused.text
            assert refused.json()["error_type"] == "engine_unavailable"
            assert "unet.safetensors is missing" in refused.json()["detail"]
            assert client.post(f"/{HYPER}", json=inpaint_input()).status_code == 500
    finally:
        live.server.should_exit = True
        thread.join(30)


def test_serve_without_weights_says_once_what_to_fetch_and_health_stops_waiting(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture, capsys: pytest.CaptureFixture
) -> None:
    """The real loader on an empty HF cache with the Hub out of reach: readiness fails within moments, one log
    line names the missing files and the download command, and ``health --ready --wait`` exits 1 at once."""
    monkeypatch.setattr(hf_constants, "HF_HUB_CACHE", str(tmp_path / "empty-hf-cache"))
    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(hf_constants, "ENDPOINT", f"http://127.0.0.1:{free_port()}")  # refuses at once
    settings = {"data_dir": tmp_path / "data", "warmup": False, "apps": ["fast-lightning-sdxl:4"]}
    live, thread = _serve_without_waiting(create_app(load_settings(settings)))
    try:
        with caplog.at_level(logging.INFO, logger="inpaint-server.engine"), client_for(live) as client:
            poll_until(lambda: client.get("/health/ready").json()["status"] == "failed", what="the load to fail")
            detail = client.get("/health/ready").json()["detail"]
            assert "stabilityai/stable-diffusion-xl-base-1.0" in detail and "the Hub cannot be reached" in detail
            assert "`inpaint-server download --app fast-lightning-sdxl`" in detail
            assert cli.main(["health", "--ready", "--wait", "600", "--url", live.url]) == 1
        logged = [r for r in caplog.records if "model files are missing" in r.getMessage()]
        assert len(logged) == 1 and logged[0].levelno == logging.ERROR and logged[0].exc_info is None
        assert "sdxl_lightning_4step_unet.safetensors" in logged[0].getMessage()
        assert "`inpaint-server download --app fast-lightning-sdxl`" in logged[0].getMessage()
        assert "cannot become ready: 503 failed: ModelFileError:" in capsys.readouterr().err
    finally:
        live.server.should_exit = True
        thread.join(30)


def test_metrics_gauges_latency_stages_and_failures(make_server, engine, request) -> None:
    server, gate = gated_server(make_server, engine, request)
    with client_for(server) as client:
        assert gauge(client, "inpaint_queue_depth") == 0 and gauge(client, "inpaint_in_progress") == 0
        held = hold_one(client, gate)
        queued = submit(client)["request_id"]
        assert gauge(client, "inpaint_queue_depth") == 1 and gauge(client, "inpaint_in_progress") == 1
        gate.release.set()
        wait_for(client, LIGHTNING, held)
        wait_for(client, LIGHTNING, queued)
        bad = submit(client, HYPER, image_url="data:image/png;base64,bm90IGFuIGltYWdl")["request_id"]
        assert wait_for(client, HYPER, bad)["error_type"] == "invalid_input"

        samples = metric_samples(client)
        assert gauge(client, "inpaint_queue_depth") == 0 and gauge(client, "inpaint_in_progress") == 0
        stages = {
            dict(labels)["stage"]
            for (name, labels), value in samples.items()
            if name == "inpaint_latency_seconds_count" and dict(labels)["app"] == LIGHTNING and value > 0
        }
        assert {"queue", "total", "inference", "text_encoding"} <= stages
        failures = {
            dict(labels)["error_type"]: value
            for (name, labels), value in samples.items()
            if name == "inpaint_failures_total" and dict(labels)["app"] == HYPER
        }
        assert failures == {"invalid_input": 1}
        assert samples[("inpaint_requests_total", (("app", LIGHTNING), ("mode", "queue")))] == 2
        assert samples[("inpaint_batch_size_count", ())] >= 2


def test_openapi_documents_both_apps_with_fal_defaults(make_server) -> None:
    server = make_server()
    doc = httpx.get(f"{server.url}/openapi.json").json()
    schemas = doc["components"]["schemas"]
    hyper = schemas["HyperSdxlInpaintingInput"]["properties"]
    lightning = schemas["FastLightningSdxlInpaintingInput"]["properties"]
    assert hyper["num_inference_steps"]["default"] == "1"
    assert hyper["num_inference_steps"]["enum"] == ["1", "2", "4"]
    assert lightning["num_inference_steps"]["default"] == "4"
    assert lightning["num_inference_steps"]["enum"] == ["1", "2", "4", "8"]
    for props in (hyper, lightning):
        assert props["strength"]["default"] == 0.95
        assert props["image_size"]["default"] == "square_hd"
        assert props["format"]["default"] == "jpeg" and props["num_images"]["default"] == 1
        assert props["enable_safety_checker"]["default"] is True and props["sync_mode"]["default"] is False
    assert "safety_checker_version" in lightning and "safety_checker_version" not in hyper
    for app_id in (HYPER, LIGHTNING):
        assert f"/{app_id}" in doc["paths"] and f"/queue/{app_id}" in doc["paths"]
    assert "/queue/{owner}/{alias}/requests/{request_id}/status" in doc["paths"]


def test_status_stream_sends_log_deltas_and_closes_after_completed(make_server, engine, request) -> None:
    server, gate = gated_server(make_server, engine, request)
    with client_for(server) as client:
        held = hold_one(client, gate)
        rid = submit(client)["request_id"]
        url = f"/queue/{endpoint(LIGHTNING)}/requests/{rid}/status/stream"
        events: list[dict[str, Any]] = []
        with client.stream(
            "GET", url, params={"logs": "1"}, headers={"accept": "application/json, text/event-stream"}
        ) as stream:
            assert stream.status_code == 200
            assert stream.headers["content-type"].startswith("text/event-stream")
            assert stream.headers["x-fal-request-id"] == rid
            for event in sse_events(stream):
                if event is None:
                    continue
                check_status_body(event)
                events.append(event)
                if len(events) == 1:
                    assert event["status"] == "IN_QUEUE" and event["queue_position"] == 0
                    assert [line["message"] for line in event["logs"]] == ["Request queued"]
                    gate.release.set()  # let the held request finish; ours runs next
        # The server closed the stream right after COMPLETED.
        assert events[-1]["status"] == "COMPLETED" and "error" not in events[-1]
        assert all(e["status"] != "COMPLETED" for e in events[:-1])
        order = [WIRE_STATES.index(e["status"]) for e in events]
        assert order == sorted(order)
        streamed = [line for e in events for line in e["logs"]]
        polled = status(client, LIGHTNING, rid, logs="1").json()["logs"]
        assert streamed == polled  # every line once, none repeated, none missing
        assert [m for m in (line["message"] for line in streamed) if m.startswith("Step ")] == [
            f"Step {n}/4" for n in range(1, 5)
        ]
        wait_for(client, LIGHTNING, held)


def test_status_stream_keeps_alive_while_waiting_and_sends_each_queue_position(make_server, engine, request) -> None:
    """A request that waits sends an SSE comment every ``stream_keepalive_s`` (and no more often) while nothing
    changes, queued or running, and an event whenever its queue position moves."""
    keepalive = 0.25
    server, gate = gated_server(make_server, engine, request, stream_keepalive_s=keepalive)
    with client_for(server) as client:
        held = hold_one(client, gate)
        ahead = submit(client)["request_id"]
        rid = submit(client)["request_id"]
        url = f"/queue/{endpoint(LIGHTNING)}/requests/{rid}/status/stream"
        lines: list[tuple[float, dict[str, Any] | None]] = []  # (when, event), None for a comment
        with client.stream("GET", url) as stream:
            for event in sse_events(stream):
                lines.append((time.monotonic(), event))
                comments = sum(1 for _, e in lines if e is None)
                if comments == 3 and event is None:  # silent for three intervals at position 1
                    cancel = client.put(f"/queue/{endpoint(LIGHTNING)}/requests/{ahead}/cancel")
                    assert cancel.status_code == 202
                elif event is not None and event.get("queue_position") == 0:
                    gate.release.set()  # the held request ends, ours runs: running and completed follow
        events = [e for _, e in lines if e is not None]
        assert [(e["status"], e.get("queue_position")) for e in events] == [
            ("IN_QUEUE", 1),
            ("IN_QUEUE", 0),  # the request ahead was cancelled: within the position look-up's second
            ("IN_PROGRESS", None),
            ("COMPLETED", None),
        ]
        # Timed at the client on a loaded machine: bounds with room for scheduling delays, still far from both
        # failures (no keep-alive: silent until the cancel, which never comes; one per loop: hundreds a second).
        times = [when for when, _ in lines]
        gaps = [b - a for a, b in itertools.pairwise(times)]
        assert max(gaps) < keepalive + 2.0, gaps  # never silent much longer than the interval
        comments = sum(1 for _, event in lines if event is None)
        assert 3 <= comments <= (times[-1] - times[0]) / keepalive + 2, gaps  # one per interval of silence at most
        wait_for(client, LIGHTNING, held)


def test_status_stream_without_logs_and_of_a_finished_request(make_server) -> None:
    server = make_server()
    with client_for(server) as client:
        rid = submit(client, HYPER)["request_id"]
        with client.stream("GET", f"/queue/{endpoint(HYPER)}/requests/{rid}/status/stream") as stream:
            events = [e for e in sse_events(stream) if e is not None]
        assert events[-1]["status"] == "COMPLETED"
        assert all(e["logs"] is None for e in events)
        # A finished request: exactly one COMPLETED event, then the stream ends.
        with client.stream("GET", f"/queue/{endpoint(HYPER)}/requests/{rid}/status/stream?logs=0") as stream:
            events = [e for e in sse_events(stream) if e is not None]
        assert [e["status"] for e in events] == ["COMPLETED"]
        assert events[0]["metrics"]["inference_time"] > 0


def test_one_log_line_per_state_change_carries_the_request_id(make_server, caplog) -> None:
    """Operators grep logs by request id: queued, running and the terminal state each log one line."""
    server = make_server()
    caplog.set_level("INFO", logger="inpaint-server.jobs")
    with client_for(server) as client:
        done = submit(client, LIGHTNING)["request_id"]
        wait_for(client, LIGHTNING, done)
        bad = submit(client, LIGHTNING, mask_url="data:image/png;base64,AAAA")["request_id"]
        wait_for(client, LIGHTNING, bad)
    lines = [r.getMessage() for r in caplog.records if r.name == "inpaint-server.jobs"]
    # A request whose image cannot be decoded fails before it reaches the GPU: no "running" line.
    for request_id, states, final in (
        (done, ["queued", "running", "succeeded"], "succeeded"),
        (bad, ["queued", "failed"], "failed (invalid_input: mask_url"),
    ):
        mine = [line for line in lines if request_id in line]
        assert [line.split(request_id, 1)[1].split()[0] for line in mine] == states
        assert final in mine[-1]


def test_jobs_queued_while_loading_fail_when_the_load_fails(tmp_path: Path) -> None:
    """Accepted while the models load, then the load fails: the job ends COMPLETED with the reason."""
    go = threading.Event()

    def loader() -> Any:
        assert go.wait(30)
        raise RuntimeError("CUDA error: no kernel image is available")

    app = create_app(load_settings({"data_dir": tmp_path / "data", "warmup": False}), engine_loader=loader)
    live, thread = _serve_without_waiting(app)
    try:
        with client_for(live) as client:
            rid = submit(client)["request_id"]
            go.set()
            body = wait_for(client, LIGHTNING, rid)
            assert body["error_type"] == "engine_unavailable" and "no kernel image" in body["error"]
            assert client.get(f"/queue/{endpoint(LIGHTNING)}/requests/{rid}").status_code == 500
    finally:
        live.server.should_exit = True
        thread.join(30)


def test_ready_waits_for_the_warm_up_too(engine, tmp_path: Path) -> None:
    """R17: loaded is not ready: /health/ready is 503 ("warming") until the warm-up requests have run."""
    from tests.live import GatedEngine

    gate = GatedEngine(engine)
    gate.hold = True  # the first warm-up request stops after its first step
    app = create_app(load_settings({"data_dir": tmp_path / "data", "warmup": True}), engine=gate)
    live, thread = _serve_without_waiting(app)
    try:
        with client_for(live) as client:
            assert gate.started.wait(30)
            warming = client.get("/health/ready")
            assert warming.status_code == 503 and warming.json()["status"] == "warming"
            gate.hold = False
            gate.release.set()
            poll_until(lambda: client.get("/health/ready").status_code == 200, what="warm-up to finish")
            assert len(gate.batches) == len(engine.variants)  # one warm-up request per loaded variant
    finally:
        gate.release.set()
        live.server.should_exit = True
        thread.join(30)


def _recorder(engine: Any, device: str, compiled: bool = False) -> Any:
    """An engine stand-in that records what the warm-up asks for (``device`` and ``speed`` are all it changes)."""
    from types import SimpleNamespace

    from pipelines.optimize import SpeedOptions
    from pipelines.types import InpaintResult

    class Recorder:
        variants = engine.variants
        speed = SpeedOptions(compile=compiled)

        def __init__(self) -> None:
            self.device = SimpleNamespace(type=device)
            self.runs: list[tuple[tuple[str, int], tuple[int, int], int]] = []

        def run(self, requests):
            first = requests[0]
            assert all(
                (r.app_id, r.steps, r.image_size) == (first.app_id, first.steps, first.image_size) for r in requests
            )
            self.runs.append(((first.app_id, first.steps), first.image_size, len(requests)))
            return [InpaintResult(request_id=r.request_id) for r in requests]

    return Recorder()


def test_warm_up_runs_each_variant_then_each_served_size_on_cuda(engine) -> None:
    """R18 without compiling: every variant once, then on CUDA every image_size preset once (with the
    fewest-steps variant), all before ready; on CPU the variants only."""
    from pipelines.warmup import run_units
    from server.inputs.image_sizes import PRESETS
    from server.jobs.engine_host import warmup_plan

    on_cpu, on_cuda = _recorder(engine, "cpu"), _recorder(engine, "cuda")
    for recorder in (on_cpu, on_cuda):
        plan = warmup_plan(recorder)
        assert plan.later == []
        run_units(recorder, plan.ready, "test")
    variants = sorted(engine.variants)
    each_variant = [(v, (64, 64), 1) for v in variants]
    assert on_cpu.runs == each_variant
    fewest = min(variants, key=lambda v: v[1])
    assert on_cuda.runs == each_variant + [(fewest, size, 1) for size in sorted(set(PRESETS.values()))]
    run_units(engine, warmup_plan(engine, [(96, 64)]).ready, "test")  # and the units really run on the engine


def test_a_compiled_engine_warms_the_default_size_before_ready_and_the_others_after(engine) -> None:
    """Issue 10 §2: with torch.compile the default size (square_hd) runs for every variant at batches of 1,
    2, 4 and 8 before ready (compiling the shared graphs, recording each variant's CUDA graphs, the 1-step
    variants included); every other size comes after, in the background. No useless 64x64 pass."""
    from pipelines.warmup import run_units
    from server.jobs.engine_host import warmup_plan

    compiled = _recorder(engine, "cuda", compiled=True)
    plan = warmup_plan(compiled, [(768, 1024), (1024, 1024)])
    variants = sorted(engine.variants)
    run_units(compiled, plan.ready, "test")
    assert compiled.runs == [(v, (1024, 1024), rows) for v in variants for rows in (1, 2, 4, 8)]
    compiled.runs.clear()
    run_units(compiled, plan.later, "test")
    assert compiled.runs == [(v, (768, 1024), rows) for v in variants for rows in (1, 2, 4, 8)]


def test_other_sizes_warm_in_the_background_after_ready(engine, tmp_path: Path) -> None:
    """Issue 10 §2: /health/ready is 200 once the default size is warm, and says how many background runs
    are left while the other sizes warm on the GPU thread; a request is served in between."""

    class Compiled:
        """The real engine, planned as a compiled one; the background runs wait at the gate."""

        speed = _recorder(engine, "cuda", compiled=True).speed

        def __init__(self) -> None:
            self.gate, self.started = threading.Event(), threading.Event()
            self.runs: list[tuple[int, int]] = []

        def __getattr__(self, name: str) -> Any:
            return getattr(engine, name)

        def run(self, requests, should_stop=None, on_progress=None):
            first = getattr(requests[0], "request", requests[0])  # the worker passes prepared requests
            self.runs.append(first.image_size)
            if first.request_id.startswith("warmup") and first.image_size == (48, 64):
                self.started.set()
                assert self.gate.wait(60)
            return engine.run(requests, should_stop, on_progress)

    compiled = Compiled()
    settings = {"data_dir": tmp_path / "data", "warmup": True, "warmup_sizes": "64x48,48x64"}
    app = create_app(load_settings(settings), engine=compiled)
    live, thread = _serve_without_waiting(app)
    try:
        with client_for(live) as client:
            poll_until(lambda: client.get("/health/ready").status_code == 200, what="the first size to warm")
            assert compiled.started.wait(30)
            assert compiled.runs.count((64, 48)) == 4 * len(engine.variants)  # every variant x bucket, before ready
            body = client.get("/health/ready").json()
            assert body["status"] == "ready" and body["warming"]["runs_left"] == 4 * len(engine.variants)
            rid = submit(client, seed=1)["request_id"]  # queued behind one background run at most
            compiled.gate.set()
            assert "error" not in wait_for(client, LIGHTNING, rid)
            poll_until(lambda: "warming" not in client.get("/health/ready").json(), what="the background warm-up")
            assert compiled.runs.count((48, 64)) == 4 * len(engine.variants)
    finally:
        compiled.gate.set()
        live.server.should_exit = True
        thread.join(30)


def test_warm_up_and_every_batch_run_on_one_gpu_thread(make_server, engine) -> None:
    """CUDA graphs (and their memory pool) belong to the thread that captured them: the warm-up and all
    batches must run on the same thread, or each thread would capture its own graphs again."""
    threads: list[str] = []

    class Recording:
        def __getattr__(self, name: str) -> Any:
            return getattr(engine, name)

        def run(self, requests, should_stop=None, on_progress=None):
            threads.append(threading.current_thread().name)
            return engine.run(requests, should_stop, on_progress)

    server = make_server(engine_override=Recording(), warmup=True, max_batch_size=1)
    with client_for(server) as client:
        ids = [submit(client, seed=n)["request_id"] for n in range(3)]
        for rid in ids:
            assert "error" not in wait_for(client, LIGHTNING, rid)
    assert len(threads) == len(engine.variants) + 3  # the warm-up's runs, then one per request
    assert len(set(threads)) == 1 and threads[0].startswith("gpu"), threads


def test_routes_are_built_before_the_first_request(make_server, caplog: pytest.LogCaptureFixture) -> None:
    """R18, the host side: FastAPI builds an included router's routes on the first request that walks
    them (~80 ms, measured with yappi on the first submit). The server walks them at start, so a
    started server has every included router built before any client request; silently (an HTTP
    client's log line about it read like an outbound request)."""
    with caplog.at_level(logging.DEBUG):
        server = make_server()
    said = [r.getMessage() for r in caplog.records]
    assert not [m for m in said if "prime" in m], said
    included = [r for r in server.app.router.routes if hasattr(r, "effective_candidates")]
    assert included, "no included routers found: FastAPI changed; re-check the first-request cost"
    assert all(getattr(r, "_effective_candidates_version", None) is not None for r in included)
