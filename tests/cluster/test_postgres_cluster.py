"""Many hosts on one PostgreSQL: two API nodes (``serve --workers 0``) and two GPU workers (``worker``), each
with a data directory of its own, sharing the store and a files directory (NFS in production).

One scenario, in phases that build on each other (starting four processes is the expensive part):

1. A cancel sent to API node B stops a job running on a worker; a slow job (a hang of 1 s per step with
   2 s leases) keeps its lease for its whole run: it runs once.
2. 300 submissions spread over both API nodes all complete exactly once, both workers take batches,
   status, logs, results and files read from either node agree, and each webhook is delivered once.
3. ``kill -9`` of a worker in the middle of a batch: its jobs complete on the other worker, once more each,
   with their seeds (the same image a fresh run with that seed gives).
4. PostgreSQL restarted (fast shutdown) with work queued: submits during the outage get a retryable 503;
   API nodes and the worker reconnect by themselves; nothing acknowledged is lost.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
import psycopg

from tests.api.queue_ops import APP, image_bytes, inpaint_input, requests_url, result, status, submit, wait_status
from tests.cluster.conftest import Cluster, poll_until
from tests.webhook_receiver import WebhookReceiver

# Prompts containing "slow" hang 1 s after each of their 4 steps: long enough to cancel, to outlive 2 s leases,
# and to kill a worker mid-batch.
SLOW = json.dumps({"at": "denoise_step", "fault": "hang", "seconds": 1, "prompt": "slow"})
LEASE_S = "2"


def rows(url: str, ids: list[str]) -> dict[str, dict[str, Any]]:
    """The store's rows of these jobs, read directly (what every node reads)."""
    with psycopg.connect(url) as conn:
        found = conn.execute(
            "SELECT id, state, attempts, worker, seed, logs FROM jobs WHERE id = ANY(%s)", (ids,)
        ).fetchall()
    keys = ("state", "attempts", "worker", "seed")
    return {
        r[0]: {**dict(zip(keys, r[1:5], strict=True)), "logs": [e["message"] for e in json.loads(r[5])]} for r in found
    }


def states(url: str) -> dict[str, int]:
    with psycopg.connect(url) as conn:
        return dict(conn.execute("SELECT state, COUNT(*) FROM jobs GROUP BY state").fetchall())


def test_two_api_nodes_and_two_workers_share_one_postgres_queue(postgres: Any, cluster: Callable[..., Cluster]) -> None:
    url = postgres.fresh_url()
    nodes = cluster(url, INPAINT_LEASE_S=LEASE_S, INPAINT_FETCH_ALLOW="127.0.0.1/32")  # webhooks to loopback
    api_a, api_b = nodes.api("api-a"), nodes.api("api-b")
    workers = {name: nodes.worker(name, INPAINT_TEST_FAULTS=SLOW, INPAINT_MAX_BATCH_SIZE="4") for name in ("w1", "w2")}
    a = httpx.Client(base_url=api_a.url, timeout=30)
    b = httpx.Client(base_url=api_b.url, timeout=30)
    try:
        _cancel_through_another_node_and_a_slow_job_keeps_its_lease(url, a, b)
        _many_submissions_over_both_nodes_complete_once(url, a, b)
        _a_killed_worker_s_batch_runs_again_on_the_other(url, a, b, workers)
        _postgres_restart_loses_nothing(postgres, url, a, b)
    except AssertionError:
        print(nodes.logs())
        raise
    finally:
        a.close()
        b.close()


def _cancel_through_another_node_and_a_slow_job_keeps_its_lease(url: str, a: httpx.Client, b: httpx.Client) -> None:
    slow = submit(a, prompt="slow but live", seed=5)
    doomed = submit(a, prompt="slow, then cancelled", seed=6)
    wait_status(b, doomed, "IN_PROGRESS")
    poll_until(lambda: "Step 1/4" in [e["message"] for e in status(b, doomed)["logs"]], "steps visible on node B")
    cancelled = b.put(requests_url(doomed, "/cancel"))
    assert cancelled.status_code == 202, cancelled.text
    body = wait_status(a, doomed, "COMPLETED")
    assert a.get(requests_url(doomed)).status_code == 499  # cancelled, seen from node A
    assert "Step 4/4" not in [e["message"] for e in body["logs"]]  # it stopped between steps

    wait_status(b, slow, "COMPLETED", timeout=60)
    row = rows(url, [slow])[slow]
    assert row["state"] == "succeeded" and row["attempts"] == 1, row  # 4+ s of work on 2 s leases: renewed
    assert not [m for m in row["logs"] if m.startswith("Interrupted")], row["logs"]


def _many_submissions_over_both_nodes_complete_once(url: str, a: httpx.Client, b: httpx.Client) -> None:
    receiver = WebhookReceiver()

    def one(i: int) -> str:
        return submit(a if i % 2 else b, webhook=receiver.url if i % 15 == 0 else None, seed=1000 + i)

    with ThreadPoolExecutor(8) as pool:
        ids = list(pool.map(one, range(300)))
    assert len(set(ids)) == 300
    poll_until(lambda: rows_done(url, ids), "300 requests completed", timeout=240, every=0.5)
    found = rows(url, ids)
    assert all(r["state"] == "succeeded" and r["attempts"] == 1 for r in found.values())
    assert all(sum(m.startswith("Starting inference") for m in r["logs"]) == 1 for r in found.values())  # once
    took = {r["worker"].split("#")[0] for r in found.values()}
    assert took == {"w1", "w2"}, took  # both workers took batches
    for rid in ids[::15]:  # any node answers the same for any request, files included
        from_a, from_b = status(a, rid), status(b, rid)
        assert from_a == from_b and from_a["status"] == "COMPLETED"
        output = result(a, rid)
        assert result(b, rid) == output and output["seed"] == found[rid]["seed"]
        assert image_bytes(a, output) == image_bytes(b, output)
    metrics = a.get("/metrics").text
    for name in ("w1", "w2"):  # every worker's liveness and work, exported by an API node from the store
        up = [line for line in metrics.splitlines() if line.startswith("inpaint_worker_up{") and f'"{name}"' in line]
        assert up == [f'inpaint_worker_up{{device="cpu",worker="{name}"}} 1.0'], metrics[-3000:]
        assert f'inpaint_worker_batches_total{{device="cpu",worker="{name}"}}' in metrics
    assert "inpaint_queue_depth 0.0" in metrics
    # Webhooks: one delivery per outcome, though both API nodes deliver from the same outbox.
    hooked = ids[::15]
    receiver.wait_for(len(hooked), answered=True, grace=2.0)
    assert sorted(d.json()["request_id"] for d in receiver.deliveries) == sorted(hooked)
    receiver.close()


def rows_done(url: str, ids: list[str]) -> bool:
    return all(r["state"] in ("succeeded", "failed", "cancelled") for r in rows(url, ids).values())


def _a_killed_worker_s_batch_runs_again_on_the_other(
    url: str, a: httpx.Client, b: httpx.Client, workers: dict[str, Any]
) -> None:
    ids = [submit(a if i % 2 else b, prompt="slow batch", seed=21 + i) for i in range(4)]
    wait_status(a, ids[0], "IN_PROGRESS")
    poll_until(lambda: "Step 1/4" in [e["message"] for e in status(a, ids[0])["logs"]], "the batch running")
    holder = rows(url, [ids[0]])[ids[0]]["worker"].split("#")[0]
    victims = [rid for rid, r in rows(url, ids).items() if r["worker"] and r["worker"].startswith(holder + "#")]
    assert victims, "no job of the batch on the worker to kill"
    workers[holder].kill9()

    poll_until(lambda: rows_done(url, ids), "the killed worker's jobs completed elsewhere", timeout=90)
    survivor = ({"w1", "w2"} - {holder}).pop()
    found = rows(url, ids)
    for rid in victims:
        row = found[rid]
        assert row["state"] == "succeeded" and row["attempts"] == 2, row
        assert row["worker"].startswith(survivor + "#")
        assert "Interrupted: its worker stopped; running again (attempt 2)" in row["logs"]
        assert sum(m.startswith("Starting inference") for m in row["logs"]) == 2
    outputs = {rid: result(b, rid) for rid in ids}
    assert [outputs[rid]["seed"] for rid in ids] == [21, 22, 23, 24]
    # The re-run gives exactly the image a fresh run of that input and seed gives.
    victim = victims[0]
    fresh = submit(b, prompt="slow batch", seed=outputs[victim]["seed"])
    wait_status(a, fresh, "COMPLETED", timeout=60)
    assert image_bytes(a, result(a, fresh)) == image_bytes(a, outputs[victim])


def _postgres_restart_loses_nothing(postgres: Any, url: str, a: httpx.Client, b: httpx.Client) -> None:
    acked = [submit(a if i % 2 else b, prompt="slow" if i < 2 else "a cat", seed=40 + i) for i in range(8)]
    postgres.stop("fast")
    try:
        for client in (a, b):
            refused = client.post(f"/queue/{APP}", json=inpaint_input(seed=99))
            assert refused.status_code == 503, refused.text
            assert refused.json()["error_type"] == "store_unavailable" and int(refused.headers["Retry-After"]) >= 1
            assert "Traceback" not in refused.text
    finally:
        postgres.start()
    # Both API nodes reconnect by themselves (a retryable 503 until then); the worker runs the rest.
    for client in (a, b):
        poll_until(lambda c=client: c.post(f"/queue/{APP}", json=inpaint_input(seed=7)).status_code == 200, "reconnect")
    poll_until(lambda: rows_done(url, acked), "acknowledged requests completed after the restart", timeout=120)
    found = rows(url, acked)
    assert len(found) == 8 and all(r["state"] == "succeeded" for r in found.values()), found
    assert [result(a, rid)["seed"] for rid in acked] == [40 + i for i in range(8)]
    poll_until(lambda: states(url).get("queued", 0) + states(url).get("running", 0) == 0, "queue drained")
