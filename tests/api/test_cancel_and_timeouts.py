"""Cancellation, the start timeout (X-Fal-Request-Timeout), priority and batching, with a held engine."""

from __future__ import annotations

import concurrent.futures
import time
from typing import Any

import httpx

from tests.api.fal_wire import (
    HYPER,
    LIGHTNING,
    FakeClock,
    client_for,
    endpoint,
    gated_server,
    gauge,
    hold_one,
    inpaint_input,
    poll_until,
    status,
    submit,
    wait_for,
)
from tests.live import GatedEngine


def _url(rid: str, suffix: str = "", app_id: str = LIGHTNING) -> str:
    return f"/queue/{endpoint(app_id)}/requests/{rid}{suffix}"


def _assert_runs_normally(client: httpx.Client, app_id: str = LIGHTNING) -> str:
    rid = submit(client, app_id)["request_id"]
    done = wait_for(client, app_id, rid)
    assert "error" not in done, done
    assert client.get(_url(rid, app_id=app_id)).status_code == 200
    return rid


def test_cancel_before_start_never_runs(make_server, engine, request) -> None:
    server, gate = gated_server(make_server, engine, request)
    with client_for(server) as client:
        held = hold_one(client, gate)
        victim = submit(client)["request_id"]
        cancel = client.put(_url(victim, "/cancel"))
        assert cancel.status_code == 202 and cancel.json() == {"status": "CANCELLATION_REQUESTED"}
        assert cancel.headers["x-fal-request-id"] == victim
        done = status(client, LIGHTNING, victim).json()  # terminal at once: it never started
        assert done["status"] == "COMPLETED" and done["error_type"] == "cancelled"
        result = client.get(_url(victim))
        assert result.status_code == 499 and result.headers["x-fal-error-type"] == "cancelled"
        assert result.json()["error_type"] == "cancelled"
        again = client.put(_url(victim, "/cancel"))
        assert again.status_code == 400 and again.json()["status"] == "ALREADY_COMPLETED"

        gate.release.set()
        wait_for(client, LIGHTNING, held)
        after = _assert_runs_normally(client)
        ran = [rid for batch in gate.batches for rid in batch]
        assert victim not in ran
        assert held in ran and after in ran


def test_cancel_while_running_twice_then_after_completion(make_server, engine, request) -> None:
    server, gate = gated_server(make_server, engine, request)
    with client_for(server) as client:
        held = hold_one(client, gate)  # 4 steps: stopped after its first
        first = client.put(_url(held, "/cancel"))
        assert first.status_code == 202 and first.json()["status"] == "CANCELLATION_REQUESTED"
        # Still running until the engine reaches its next step: a second cancel is accepted again.
        assert status(client, LIGHTNING, held).json()["status"] == "IN_PROGRESS"
        second = client.put(_url(held, "/cancel"))
        assert second.status_code == 202

        gate.release.set()
        done = wait_for(client, LIGHTNING, held, logs="1")
        assert done["error_type"] == "cancelled" and done["error"]
        steps = [line["message"] for line in done["logs"] if line["message"].startswith("Step ")]
        assert steps == ["Step 1/4"]  # it stopped at the next step instead of finishing
        assert sum("Cancellation requested" in line["message"] for line in done["logs"]) == 1
        result = client.get(_url(held))
        assert result.status_code == 499
        assert result.headers["x-fal-error-type"] == "cancelled" and result.json()["error_type"] == "cancelled"
        third = client.put(_url(held, "/cancel"))
        assert third.status_code == 400 and third.json()["status"] == "ALREADY_COMPLETED"
        assert third.headers["x-fal-error-type"] == "already_completed"

        _assert_runs_normally(client)  # the next request is unaffected


def test_cancel_of_a_completed_request_is_400(make_server) -> None:
    server = make_server()
    with client_for(server) as client:
        rid = _assert_runs_normally(client, HYPER)
        response = client.put(_url(rid, "/cancel", HYPER))
        assert response.status_code == 400 and response.json()["status"] == "ALREADY_COMPLETED"
        assert response.headers["content-type"] == "application/json"
        assert client.get(_url(rid, app_id=HYPER)).status_code == 200  # the result is still there


def test_start_timeout_expires_in_the_queue(make_server, engine, request) -> None:
    clock = FakeClock()
    server, gate = gated_server(make_server, engine, request, clock=clock)
    with client_for(server) as client:
        held = hold_one(client, gate)
        late = submit(client, headers={"X-Fal-Request-Timeout": "20.0"})["request_id"]
        patient = submit(client, headers={"X-Fal-Request-Timeout": "300"})["request_id"]
        clock.advance(5)
        assert status(client, LIGHTNING, late).json()["status"] == "IN_QUEUE"
        clock.advance(20)  # past the 20 s start deadline; the running request is not affected
        done = wait_for(client, LIGHTNING, late)
        assert done["error_type"] == "request_timeout"
        result = client.get(_url(late))
        assert result.status_code == 504
        assert result.headers["x-fal-request-timeout-type"] == "user"
        assert result.headers["x-fal-error-type"] == "request_timeout"
        assert result.headers["x-fal-request-id"] == late
        assert status(client, LIGHTNING, patient).json()["queue_position"] == 0

        gate.release.set()
        assert "error" not in wait_for(client, LIGHTNING, held)
        assert "error" not in wait_for(client, LIGHTNING, patient)
        assert late not in [rid for batch in gate.batches for rid in batch]


def test_sync_run_start_timeout_is_504_user(make_server, engine, request) -> None:
    clock = FakeClock()
    server, gate = gated_server(make_server, engine, request, clock=clock)
    with client_for(server) as client, concurrent.futures.ThreadPoolExecutor(1) as pool:
        held = hold_one(client, gate)
        pending = pool.submit(
            httpx.post, f"{server.url}/{LIGHTNING}", json=inpaint_input(), headers={"X-Fal-Request-Timeout": "30"}
        )
        poll_until(lambda: gauge(client, "inpaint_queue_depth") == 1, what="the sync run to be queued")
        clock.advance(31)
        response = pending.result(timeout=30)
        assert response.status_code == 504
        assert response.headers["x-fal-request-timeout-type"] == "user"
        assert response.headers["x-fal-error-type"] == "request_timeout"
        assert response.json()["error_type"] == "request_timeout"
        assert response.headers["x-fal-request-id"]
        gate.release.set()
        wait_for(client, LIGHTNING, held)


def test_start_timeout_does_not_apply_once_running(make_server, engine, request) -> None:
    clock = FakeClock()
    server, gate = gated_server(make_server, engine, request, clock=clock)
    with client_for(server) as client:
        gate.hold = True
        rid = submit(client, headers={"X-Fal-Request-Timeout": "2"})["request_id"]
        assert gate.started.wait(30)
        clock.advance(60)
        poll_until(lambda: gauge(client, "inpaint_in_progress") == 1, what="the running gauge")
        assert status(client, LIGHTNING, rid).json()["status"] == "IN_PROGRESS"
        gate.release.set()
        assert "error" not in wait_for(client, LIGHTNING, rid)


def test_normal_priority_runs_before_low(make_server, engine, request) -> None:
    server, gate = gated_server(make_server, engine, request, max_batch_size=1)
    with client_for(server) as client:
        held = hold_one(client, gate)
        low = submit(client, headers={"X-Fal-Queue-Priority": "low"})
        normal = submit(client, headers={"X-Fal-Queue-Priority": "normal"})
        default = submit(client)  # no header = normal
        assert low["queue_position"] == 0 and normal["queue_position"] == 0 and default["queue_position"] == 1
        ids = [low["request_id"], normal["request_id"], default["request_id"]]
        assert [status(client, LIGHTNING, rid).json()["queue_position"] for rid in ids] == [2, 0, 1]
        gate.release.set()
        for rid in ids:
            wait_for(client, LIGHTNING, rid)
        assert gate.batches == [[held], [ids[1]], [ids[2]], [ids[0]]]


def test_queued_compatible_requests_share_one_engine_run(make_server, engine, request) -> None:
    server, gate = gated_server(make_server, engine, request, max_batch_size=3)
    with client_for(server) as client:
        held = hold_one(client, gate)
        same = [submit(client, seed=n)["request_id"] for n in range(4)]
        other_app = submit(client, HYPER)["request_id"]
        # Inputs are fetched and decoded while the requests wait (look-ahead), so all are ready to batch.
        worker = server.app.state.service.worker
        poll_until(lambda: all(worker.is_prepared(rid) for rid in same[:3]), what="queued inputs prepared")
        gate.release.set()
        for rid in same:
            assert "error" not in wait_for(client, LIGHTNING, rid)
        wait_for(client, HYPER, other_app)
        assert gate.batches[0] == [held]
        assert gate.batches[1] == same[:3]  # max_batch_size = 3
        assert same[3] in gate.batches[2] and other_app not in gate.batches[1]
        assert all(len(batch) <= 3 for batch in gate.batches)
        logs = status(client, LIGHTNING, same[0], logs="1").json()["logs"]
        assert any(line["message"] == "Starting inference (3 request(s) in this batch)" for line in logs)
        seeds = {client.get(_url(rid)).json()["seed"] for rid in same}
        assert seeds == {0, 1, 2, 3}  # each request keeps its own seed inside the batch


class SlowPrepare(GatedEngine):
    """The gated engine, but preparing a request takes ``delays[seed]`` seconds (a slow image host, as far
    as the GPU lane can tell)."""

    def __init__(self, engine: Any, delays: dict[int, float]) -> None:
        super().__init__(engine)
        self.delays = delays

    def prepare(self, request: Any) -> Any:
        time.sleep(self.delays.get(request.seed, 0.0))
        return self.engine.prepare(request)


def _fill_spy(server: Any) -> list[str]:
    worker = server.app.state.service.worker
    waits: list[str] = []
    fill = worker._fill

    async def spy(engine, head, prep, batch):
        waits.append(head.id)
        return await fill(engine, head, prep, batch)

    worker._fill = spy
    return waits


def test_a_request_waits_batch_window_ms_for_batch_mates_still_being_prepared(make_server, engine, request) -> None:
    """A request ready to run waits up to batch_window_ms while a queued request behind it is still being
    fetched and decoded, and they share the batch; with a window of 0 they run apart."""
    for window, together in ((1000.0, True), (0.0, False)):
        # The first is ready 0.5 s after its submit, the second 0.5 s later: it is queued and still being
        # prepared when the first is ready, however slowly the test machine answers the second submit.
        gate = SlowPrepare(engine, {1: 0.5, 2: 1.0})
        request.addfinalizer(gate.release.set)
        server = make_server(engine_override=gate, max_batch_size=4, batch_window_ms=window)
        waits = _fill_spy(server)
        with client_for(server) as client:
            first = submit(client, seed=1)["request_id"]
            second = submit(client, seed=2)["request_id"]
            for rid in (first, second):
                assert "error" not in wait_for(client, LIGHTNING, rid)
        if together:
            assert gate.batches == [[first, second]] and waits == [first]
        else:
            assert gate.batches == [[first], [second]] and waits == []


def test_a_lone_request_does_not_wait_for_the_window(make_server, engine, request) -> None:
    """Issue 10 §5: nothing else queued or being prepared: the batch window is not waited at all."""
    server, gate = gated_server(make_server, engine, request, max_batch_size=4, batch_window_ms=1000.0)
    waits = _fill_spy(server)
    with client_for(server) as client:
        rid = submit(client, seed=1)["request_id"]
        assert "error" not in wait_for(client, LIGHTNING, rid)
    assert gate.batches == [[rid]] and waits == []  # the worker never entered the window


def test_batches_hold_at_most_eight_image_rows(make_server, engine, request) -> None:
    """Issue 10 §5: a batch is bounded by image rows (num_images summed) as well as by requests: queued
    requests of 4, 4 and 2 images make a batch of 8 rows, then one of 2."""
    server, gate = gated_server(make_server, engine, request, max_batch_size=4)
    with client_for(server) as client:
        held = hold_one(client, gate)
        ids = [submit(client, seed=n, num_images=k)["request_id"] for n, k in enumerate((4, 4, 2))]
        worker = server.app.state.service.worker
        poll_until(lambda: all(worker.is_prepared(rid) for rid in ids), what="queued inputs prepared")
        gate.hold = False
        gate.release.set()
        for rid in ids:
            assert "error" not in wait_for(client, LIGHTNING, rid)
    assert gate.batches == [[held], ids[:2], ids[2:]]


def test_a_full_batch_does_not_wait_for_the_window(make_server, engine, request) -> None:
    """The window only applies while the batch has room: a full batch starts without waiting."""
    server, gate = gated_server(make_server, engine, request, max_batch_size=1, batch_window_ms=1000.0)
    waits = _fill_spy(server)
    with client_for(server) as client:
        rid = submit(client, seed=1)["request_id"]
        assert "error" not in wait_for(client, LIGHTNING, rid)
    assert gate.batches == [[rid]] and waits == []
