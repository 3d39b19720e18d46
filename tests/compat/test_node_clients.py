"""Contract tests with the real, unmodified JS fal clients from npm, run in Node.

* ``@fal-ai/client`` 1.10.1 through the proxy protocol (``proxyUrl`` with ``when: "always"``) and
  through a custom ``fetch`` that rewrites fal's hosts onto the server;
* ``@fal-ai/serverless-client`` 0.15.0 through a ``requestMiddleware`` URL rewrite.

Each scenario script (``tests/compat/node/*.mjs``) prints one JSON line of what the client saw and
what went over the wire; the assertions are here. The clients come from
``npm ci --prefix tests/compat/node`` (CI installs them); without Node the tests are skipped.
"""

from __future__ import annotations

import io
import json
import os
import re
import shutil
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from PIL import Image

from server.jobs.job import JobState
from tests.api import fal_wire as wire
from tests.api.fal_wire import wait_for
from tests.compat.idle_proxy import IdleCuttingProxy
from tests.helpers import box_mask, noise_image, png
from tests.live import LOOPBACK, GatedEngine
from tests.webhook_receiver import WebhookReceiver

NODE_DIR = Path(__file__).resolve().parent / "node"
NODE = shutil.which("node")
UUID = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$")
SCRIPT_TIMEOUT_S = 60
LIGHTNING = "fal-ai/fast-lightning-sdxl/inpainting"
HYPER = "fal-ai/hyper-sdxl/inpainting"

pytestmark = pytest.mark.skipif(NODE is None, reason="node is not installed (the JS client tests need Node >= 18)")


@pytest.fixture(scope="module")
def node_modules() -> Path:
    version = subprocess.run([NODE, "--version"], capture_output=True, text=True, timeout=30).stdout.strip()
    if int(version.lstrip("v").split(".")[0]) < 18:
        pytest.fail(f"the fal JS clients need Node >= 18 (global fetch and Blob); {NODE} is {version}", pytrace=False)
    for package in ("@fal-ai/client", "@fal-ai/serverless-client"):
        if not (NODE_DIR / "node_modules" / package / "package.json").is_file():
            pytest.fail(
                f"{package} is not installed in {NODE_DIR / 'node_modules'}: "
                "run `npm ci --prefix tests/compat/node` (CI installs it)",
                pytrace=False,
            )
    return NODE_DIR / "node_modules"


@pytest.fixture
def pngs(tmp_path: Path) -> dict[str, Path]:
    image, mask = tmp_path / "image.png", tmp_path / "mask.png"
    image.write_bytes(png(noise_image(64, 48)))
    mask.write_bytes(png(box_mask(64, 48)))
    return {"image": image, "mask": mask}


@pytest.fixture
def hooks() -> Iterator[WebhookReceiver]:
    receiver = WebhookReceiver()
    yield receiver
    receiver.close()


def run_node(script: str, *args: str) -> dict[str, Any]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("FAL_")}
    proc = subprocess.run(
        [NODE, script, *args],
        cwd=NODE_DIR,
        env=env,
        capture_output=True,
        text=True,
        timeout=SCRIPT_TIMEOUT_S,
    )
    lines = [line for line in proc.stdout.splitlines() if line.strip()]
    assert proc.returncode == 0 and lines, f"node {script} failed (rc {proc.returncode}):\n{proc.stdout}\n{proc.stderr}"
    return json.loads(lines[-1])


def release_after_cancel(server, gate: GatedEngine, timeout: float = 30.0) -> threading.Thread:
    """Let the held job go once the server has recorded a cancel for a running job (or after ``timeout``)."""
    store = server.app.state.store

    def watch() -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if any(job.cancel_requested and job.state is JobState.RUNNING for job in store.unfinished()):
                break
            time.sleep(0.01)
        gate.release.set()

    thread = threading.Thread(target=watch, daemon=True)
    thread.start()
    return thread


def ok(step: dict[str, Any], name: str) -> Any:
    assert "error" not in step, f"{name} failed: {step.get('error')}"
    return step["value"]


def failed(step: dict[str, Any], name: str) -> dict[str, Any]:
    assert "error" in step, f"{name} should have failed but returned {step.get('value')}"
    return step["error"]


def check_output(data: dict[str, Any], base: str) -> None:
    assert len(data["images"]) == 1
    image = data["images"][0]
    assert (image["width"], image["height"]) == (64, 48)
    assert image["content_type"] == "image/jpeg"
    assert image["url"].startswith(f"{base}/files/")
    assert isinstance(data["seed"], int)
    assert data["has_nsfw_concepts"] == [False]


def step_logs(updates: list[dict[str, Any]]) -> list[str]:
    """Log messages of the last update that carried a list of logs."""
    with_logs = [u["logs"] for u in updates if isinstance(u.get("logs"), list)]
    return with_logs[-1] if with_logs else []


def check_scenario(obs: dict[str, Any], base: str, hooks: WebhookReceiver, with_request_ids: bool) -> None:
    """Assertions shared by every client/transport (see scenario.mjs for the steps)."""
    # ---- cancel
    cancel = ok(obs["cancel"], "cancel scenario")
    held = cancel["id"]
    assert UUID.match(held)
    assert cancel["running"][-1]["status"] == "IN_PROGRESS"
    assert all(s["status"] in ("IN_QUEUE", "IN_PROGRESS") for s in cancel["running"])
    queued = cancel["queued"]
    assert queued["status"]["status"] == "IN_QUEUE" and queued["status"]["queue_position"] == 0
    ok(queued["cancel"], "cancel of the queued request")
    assert queued["final"]["status"] == "COMPLETED" and queued["final"]["error_type"] == "cancelled"
    ok(cancel["cancelResponse"], "cancel of the running request")
    final = cancel["final"]
    assert final["status"] == "COMPLETED" and final["error_type"] == "cancelled", final
    assert final["request_id"] == held
    assert any(m.startswith("Step 1/") for m in final["logs"]), final["logs"]
    assert not any(m.startswith("Step 2/") for m in final["logs"]), "the cancelled request ran to its end"
    error = failed(cancel["result"], "result of the cancelled request")
    assert error["status"] == 499 and error["isApiError"] and not error["isValidationError"]
    assert error["body"]["error_type"] == "cancelled"
    if with_request_ids:
        assert error["requestId"] == held
    again = failed(cancel["cancelAgain"], "second cancel")
    assert again["status"] == 400 and again["body"]["status"] == "ALREADY_COMPLETED"
    [cancelled_hook] = hooks.wait_for(1, timeout=10, path="/cancelled", grace=0.3)
    assert cancelled_hook.json()["request_id"] == held
    assert cancelled_hook.json()["status"] == "ERROR"
    assert cancelled_hook.json()["error"] == "Invalid status code: 499"

    # ---- sync run with Blob inputs
    run = ok(obs["run"], "run")
    check_output(run["data"], base)
    assert run["file"]["status"] == 200 and run["file"]["contentType"] == "image/jpeg"
    with Image.open(io.BytesIO(httpx.get(run["data"]["images"][0]["url"]).content)) as img:
        assert img.size == (64, 48) and img.format == "JPEG"
    if with_request_ids:
        assert UUID.match(run["requestId"])

    # ---- subscribe, streaming and polling, with logs
    for name in ("streaming", "polling"):
        sub = ok(obs[name], f"subscribe ({name})")
        check_output(sub["data"], base)
        assert UUID.match(sub["enqueued"])
        if with_request_ids:
            assert sub["requestId"] == sub["enqueued"]
        states = [u["status"] for u in sub["updates"]]
        assert states and set(states) <= {"IN_QUEUE", "IN_PROGRESS", "COMPLETED"} and states[-1] == "COMPLETED"
        logs = step_logs(sub["updates"])
        assert "Step 1/2" in logs and "Step 2/2" in logs, logs
        assert logs.count("Step 1/2") == 1, f"{name}: a log line was delivered twice: {logs}"
    assert obs["streaming"]["value"]["updates"][-1]["request_id"] == obs["streaming"]["value"]["enqueued"]
    assert obs["polling"]["value"]["data"]["seed"] == 43

    # ---- submit + status + result + webhook
    queue = ok(obs["queue"], "submit/status/result")
    submitted = queue["submitted"]
    rid = submitted["request_id"]
    assert submitted["status"] == "IN_QUEUE"
    assert submitted["status_url"].endswith(f"/fal-ai/fast-lightning-sdxl/requests/{rid}/status")
    assert submitted["response_url"].startswith(base)
    assert queue["statuses"][-1]["status"] == "COMPLETED" and "error" not in queue["statuses"][-1]
    assert any("Step 2/2" in (s["logs"] or []) for s in queue["statuses"])
    check_output(queue["data"], base)
    if with_request_ids:
        assert queue["requestId"] == rid
    [hook] = hooks.wait_for(1, timeout=10, path="/ok", grace=0.3)
    assert hook.json()["status"] == "OK" and hook.json()["request_id"] == rid
    assert hook.json()["payload"]["images"][0]["url"] == queue["data"]["images"][0]["url"]
    assert hook.headers["Content-Type"] == "application/json"

    # ---- 422s
    invalid = failed(obs["invalidRun"], "run with strength 5")
    assert invalid["status"] == 422 and invalid["isValidationError"]
    assert [e["loc"][-1] for e in invalid["fieldErrors"]] == ["strength"]
    missing = failed(obs["invalidSubmit"], "submit without a prompt")
    assert missing["status"] == 422 and missing["isValidationError"]
    assert [e["loc"] for e in missing["fieldErrors"]] == [["body", "prompt"]]
    surrogate = failed(obs["surrogatePrompt"], "submit with a lone UTF-16 surrogate in the prompt")
    assert surrogate["status"] == 422 and surrogate["isValidationError"]
    assert [e["loc"] for e in surrogate["fieldErrors"]] == [["body", "prompt"]]
    assert "surrogate" in surrogate["fieldErrors"][0]["msg"]
    if with_request_ids:
        assert UUID.match(invalid["requestId"]) and UUID.match(missing["requestId"])
    fetch_error = ok(obs["fetchError"], "request with an unreachable mask")
    assert fetch_error["final"]["status"] == "COMPLETED"
    assert fetch_error["final"]["error_type"] == "input_fetch_error"
    assert fetch_error["final"]["logs"] is None
    late = failed(fetch_error["result"], "result of the failed request")
    assert late["status"] == 422 and late["isValidationError"]
    assert [e["loc"][-1] for e in late["fieldErrors"]] == ["mask_url"]
    if with_request_ids:
        assert late["requestId"] == fetch_error["id"]

    # Every webhook went where it was asked to, once.
    assert sorted(d.path for d in hooks.deliveries) == ["/cancelled", "/ok"]


def uploads(calls: list[dict[str, Any]], base: str) -> list[dict[str, Any]]:
    return [c for c in calls if c["method"] == "PUT" and c["url"].startswith(f"{base}/uploads/")]


def check_blob_uploads(calls: list[dict[str, Any]], base: str, initiate: str) -> None:
    """Blob inputs went through ``storage/upload/initiate`` then a PUT, and the request carried the file URL."""
    inits = [c for c in calls if initiate in (c["target"] or c["url"])]
    puts = uploads(calls, base)
    assert inits and len(inits) == len(puts), (len(inits), len(puts))
    assert all(c["status"] == 200 for c in inits + puts)
    assert all(c["authorization"] is None for c in puts), "the upload PUT must not need credentials"
    assert all(c["body"]["content_type"] == "image/png" for c in inits)
    submits = [c for c in calls if c["method"] == "POST" and isinstance(c.get("body"), dict) and "prompt" in c["body"]]
    assert submits
    put_urls = {c["url"] for c in puts}
    for call in submits:
        assert call["body"]["image_url"] in put_urls, call["body"]
        assert call["body"]["mask_url"] in put_urls or call["body"]["mask_url"].endswith("/missing.png"), call["body"]


def wire_status_codes(calls: list[dict[str, Any]]) -> set[tuple[str, int]]:
    """(kind, HTTP status) pairs seen for status, result, cancel and stream calls."""
    kinds = set()
    for call in calls:
        path = (call["target"] or call["url"]).split("?")[0]
        if "/requests/" not in path:
            continue
        tail = path.rsplit("/requests/", 1)[1].split("/", 1)
        kind = tail[1] if len(tail) > 1 else "result"
        kinds.add((kind, call["status"]))
    return kinds


def start(make_server, engine, **settings):
    gate = GatedEngine(engine)
    gate.hold = True
    server = make_server(engine_override=gate, fetch_allow=LOOPBACK, **settings)  # webhooks go to 127.0.0.1
    return server, gate


@pytest.mark.parametrize("transport", ["proxy", "fetch"])
def test_fal_client(transport, node_modules, make_server, engine, pngs, hooks) -> None:
    server, gate = start(make_server, engine)
    release_after_cancel(server, gate)
    try:
        obs = run_node(
            "client.mjs",
            f"--base={server.url}",
            f"--hook={hooks.base_url}",
            f"--image={pngs['image']}",
            f"--mask={pngs['mask']}",
            f"--transport={transport}",
        )
    finally:
        gate.release.set()
    assert obs["client"] == "@fal-ai/client"
    check_scenario(obs, server.url, hooks, with_request_ids=True)

    calls = obs["calls"]
    assert not [c for c in calls if c.get("refused")], "the client tried to reach a host other than the server"
    check_blob_uploads(calls, server.url, "/storage/upload/initiate")
    sse = [c for c in calls if "/status/stream" in (c["target"] or c["url"])]
    assert sse and all(c["status"] == 200 and c["contentType"].startswith("text/event-stream") for c in sse)
    codes = wire_status_codes(calls)
    assert ("status", 202) in codes and ("status", 200) in codes
    assert ("cancel", 202) in codes and ("cancel", 400) in codes
    assert ("result", 200) in codes and ("result", 499) in codes and ("result", 422) in codes
    if transport == "proxy":
        proxy = f"{server.url}/api/fal/proxy"
        non_put = [c for c in calls if c["method"] != "PUT" and not c["url"].startswith(f"{server.url}/files/")]
        assert non_put and all(c["url"] == proxy and c["target"].startswith("https://") for c in non_put)
        assert {c["target"].split("/")[2] for c in non_put} == {"fal.run", "queue.fal.run", "rest.fal.ai"}
        assert any("?fal_webhook=" in c["target"] for c in non_put)
    else:
        assert all(c["target"] is None for c in calls)
        assert any(c["url"].startswith(f"{server.url}/rest/storage/upload/initiate") for c in calls)
        assert any(c["url"].startswith(f"{server.url}/queue/{LIGHTNING}?fal_webhook=") for c in calls)
        assert any(c["url"] == f"{server.url}/{HYPER}" for c in calls)


def test_serverless_client(node_modules, make_server, engine, pngs, hooks) -> None:
    server, gate = start(make_server, engine)
    release_after_cancel(server, gate)
    try:
        obs = run_node(
            "serverless.mjs",
            f"--base={server.url}",
            f"--hook={hooks.base_url}",
            f"--image={pngs['image']}",
            f"--mask={pngs['mask']}",
        )
    finally:
        gate.release.set()
    assert obs["client"] == "@fal-ai/serverless-client"
    check_scenario(obs, server.url, hooks, with_request_ids=False)

    calls = obs["calls"]
    assert not [c for c in calls if c.get("refused")], "the client tried to reach a host other than the server"
    # serverless-client initiates at rest.alpha.fal.ai (no storage_type), rewritten onto /rest/.
    assert any(c["url"] == f"{server.url}/rest/storage/upload/initiate" for c in calls)
    check_blob_uploads(calls, server.url, "/rest/storage/upload/initiate")
    assert any("/status/stream?logs=1" in c["url"] for c in calls)
    codes = wire_status_codes(calls)
    assert ("cancel", 202) in codes and ("result", 499) in codes and ("status", 202) in codes


def test_api_keys_through_the_proxy(node_modules, make_server, pngs) -> None:
    server = make_server(api_keys=["k", "other"])
    obs = run_node(
        "auth.mjs",
        f"--base={server.url}",
        f"--image={pngs['image']}",
        f"--mask={pngs['mask']}",
        "--key=k",
        "--other=other",
    )
    for name in ("wrongRun", "wrongSubmit", "noKeyRun"):
        error = failed(obs[name], name)
        assert error["status"] == 401 and error["isApiError"] and not error["isValidationError"], (name, error)
        assert error["body"]["error_type"] == "unauthorized"
    run = ok(obs["rightRun"], "run with the right key")
    check_output(run["data"], server.url)
    assert UUID.match(run["requestId"])
    sub = ok(obs["rightSubscribe"], "subscribe with the right key")
    check_output(sub["data"], server.url)
    assert sub["requestId"] == sub["enqueued"]
    foreign = failed(sub["foreign"], "status with another valid key")
    assert foreign["status"] == 404, foreign
    wrong = failed(sub["wrongKeyStatus"], "status with a wrong key")
    assert wrong["status"] == 401, wrong

    calls = obs["calls"]
    # The wrong key is refused at the upload already (no PUT); the right one uploads both Blobs.
    wrong_inits = [c for c in calls if c["authorization"] == "Key k-wrong" and "/storage/" in (c["target"] or "")]
    assert wrong_inits and all(c["status"] == 401 for c in wrong_inits)
    assert len(uploads(calls, server.url)) == 4
    right = [c for c in calls if c["authorization"] == "Key k"]
    assert right and all(c["status"] in (200, 202) for c in right)


def test_temporary_tokens_in_a_browser_app(node_modules, make_server, pngs) -> None:
    """A client with no key works with a token its backend minted (Bearer on every call, and the client's own
    connectionMode "client" flow: a token minted with that token, then ?fal_jwt_token= on the status stream)."""
    server = make_server(api_keys=["k"])
    obs = run_node(
        "tokens.mjs", f"--base={server.url}", f"--image={pngs['image']}", f"--mask={pngs['mask']}", "--key=k"
    )
    assert obs["tokenType"] == "string"
    sub = ok(obs["subscribe"], "subscribe with a token")
    check_output(sub["data"], server.url)
    assert sub["requestId"] == sub["enqueued"] and UUID.match(sub["requestId"])
    assert sub["updates"][-1]["status"] == "COMPLETED" and "Step 2/2" in step_logs(sub["updates"])
    cancel = failed(obs["cancel"], "cancel of the finished request with the token")
    assert cancel["status"] == 400 and cancel["body"]["status"] == "ALREADY_COMPLETED"
    other = failed(obs["otherApp"], "submit to another app with the token")
    assert other["status"] == 403 and other["isApiError"] and other["body"]["error_type"] == "forbidden"
    assert ok(obs["keyStatus"], "status with the key")["status"] == "COMPLETED"  # the key owns the request
    assert ok(obs["keyStream"], "stream with the key in connectionMode client")["status"] == "COMPLETED"

    calls = obs["calls"]
    bearer = [c for c in calls if (c["authorization"] or "").startswith("Bearer ")]
    assert {c["url"].split("?")[0].removeprefix(server.url) for c in bearer} == {
        "/rest/storage/upload/initiate",
        f"/queue/{LIGHTNING}",
        "/rest/tokens/",  # the client minting its stream token with the browser's token
        f"/queue/fal-ai/fast-lightning-sdxl/requests/{sub['requestId']}",
        f"/queue/fal-ai/fast-lightning-sdxl/requests/{sub['requestId']}/cancel",
        f"/queue/{HYPER}",
    }
    mints = [c for c in calls if "/tokens/" in c["url"]]
    assert [c["authorization"].split()[0] for c in mints] == ["Key", "Bearer", "Key"]
    assert all(c["status"] == 200 for c in mints)
    assert mints[1]["body"] == {"allowed_apps": ["fast-lightning-sdxl"], "token_expiration": 120}  # the client's own
    streams = [c for c in calls if "/status/stream" in c["url"]]
    assert len(streams) == 2 and all("fal_jwt_token=" in c["url"] and c["authorization"] is None for c in streams)
    assert all(c["status"] == 200 and c["contentType"].startswith("text/event-stream") for c in streams)
    assert len(uploads(calls, server.url)) == 2
    assert not [c for c in calls if c.get("status") == 401 or c.get("refused")]


def release_after_queued_for(server, gate: GatedEngine, seconds: float, timeout: float = 30.0) -> threading.Thread:
    """Let the held job go once another request has waited ``seconds`` in the queue (or after ``timeout``)."""
    store = server.app.state.store

    def watch() -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and store.queued_count() == 0:
            time.sleep(0.01)
        gate.release.wait(seconds)
        gate.release.set()

    thread = threading.Thread(target=watch, daemon=True)
    thread.start()
    return thread


@pytest.mark.parametrize("keepalive", [True, False], ids=["keep-alive", "silent"])
def test_streaming_subscribe_through_a_proxy_with_an_idle_timeout(
    keepalive, node_modules, make_server, engine, pngs
) -> None:
    """``fal.subscribe(..., {mode: "streaming"})`` while the request waits in the queue three times longer than
    the proxy's idle timeout: the stream's keep-alive comments (``stream_keepalive_s``) keep it open. The
    same wait without them (a keep-alive longer than the wait) is cut, and the client fails as it did before."""
    idle_s = 0.6
    server, gate = start(make_server, engine, stream_keepalive_s=0.2 if keepalive else 60)
    with IdleCuttingProxy(server.port, idle_s) as proxy, httpx.Client(base_url=server.url, timeout=30) as client:
        held = client.post(f"/queue/{LIGHTNING}", json=wire.inpaint_input(seed=1)).json()["request_id"]
        assert gate.started.wait(30)
        waiter = release_after_queued_for(server, gate, 3 * idle_s)
        try:
            obs = run_node(
                "stream_idle.mjs", f"--base={proxy.url}", f"--image={pngs['image']}", f"--mask={pngs['mask']}"
            )
        finally:
            gate.release.set()
            waiter.join(30)
        assert "error" not in wait_for(client, LIGHTNING, held)  # the blocker ran on, undisturbed
    assert not [c for c in obs["calls"] if c.get("refused")]
    queued = [u["atMs"] for u in obs["updates"] if u["status"] == "IN_QUEUE"]
    assert queued, obs["updates"]
    if keepalive:
        value = ok(obs["outcome"], "streaming subscribe through the proxy")
        assert value["seed"] == 7 and value["images"] == 1 and UUID.match(value["requestId"])
        states = [u["status"] for u in obs["updates"]]
        assert states[0] == "IN_QUEUE" and states[-1] == "COMPLETED", states
        started = next(u["atMs"] for u in obs["updates"] if u["status"] != "IN_QUEUE")
        assert started - queued[0] > 2 * idle_s * 1000  # the stream stayed open through a long silence
    else:
        error = failed(obs["outcome"], "streaming subscribe through the proxy without keep-alives")
        assert error["isApiError"] and error["status"] == 500, error
        assert proxy.cuts >= 1
        assert all(u["status"] == "IN_QUEUE" for u in obs["updates"]), obs["updates"]


def test_fal_stream_gets_a_preview_per_step_then_the_result(node_modules, make_server, engine, pngs) -> None:
    """``fal.stream(...)`` of @fal-ai/client against ``POST /{app}/stream`` (docs/streaming.md)."""
    from tests.api.test_stream import PacedEngine, jpeg_size

    server = make_server(engine_override=PacedEngine(engine), api_keys=["k"])
    obs = run_node(
        "stream.mjs", f"--base={server.url}", f"--image={pngs['image']}", f"--mask={pngs['mask']}", "--key=k"
    )
    assert not [c for c in obs["calls"] if c.get("refused")], "the client tried to reach a host other than the server"

    stream = ok(obs["stream"], "fal.stream through the proxy")
    rid = stream["requestId"]
    assert UUID.match(rid)
    *progress, final = stream["events"]
    assert [(e["request_id"], e["step"], e["total_steps"]) for e in progress] == [(rid, 1, 2), (rid, 2, 2)]
    for event in progress:
        assert [jpeg_size(p) for p in event["previews"]] == [(8, 6), (8, 6)]  # one per image, 1/8 of 64x48
    assert stream["done"] == final  # done() resolves with the last event: the result
    result = httpx.get(f"{server.url}/fal-ai/fast-lightning-sdxl/requests/{rid}", headers={"Authorization": "Key k"})
    assert final == result.json()  # exactly the run's output
    assert len(final["images"]) == 2 and final["seed"] == 9 and final["has_nsfw_concepts"] == [False, False]

    error = failed(obs["notAnImage"], "fal.stream of a text file as the image")
    assert error["status"] == 422 and error["isApiError"] and error["isValidationError"]
    assert error["message"].startswith("image_url"), error  # the server's message, not the status text
    assert [e["loc"][-1] for e in error["fieldErrors"]] == ["image_url"]
    assert UUID.match(error["requestId"])

    browser = ok(obs["clientMode"], "fal.stream in connectionMode client with a token")
    assert obs["tokenAskedFor"] == [f"{LIGHTNING}/stream"]
    assert browser["events"][-1] == browser["done"] and len(browser["done"]["images"]) == 1
    assert [e["step"] for e in browser["events"][:-1]] == [1]
    [call] = [c for c in obs["calls"] if "fal_jwt_token=" in c["url"]]
    assert call["url"].startswith(f"{server.url}/{LIGHTNING}/stream?") and call["authorization"] is None
    assert call["status"] == 200 and call["contentType"].startswith("text/event-stream")
