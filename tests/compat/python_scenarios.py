"""What a user of the real ``fal_client`` does against this server, as plain client code.

Imported by ``test_python_client.py`` (plain HTTP, URL constants patched in-process) and run as a
script in a subprocess for the TLS recipe, where ``fal_client`` is configured by environment
variables alone (they are read at import)::

    FAL_KEY=... FAL_RUN_HOST=127.0.0.1:PORT FAL_QUEUE_RUN_HOST=127.0.0.1:PORT/queue \\
    SSL_CERT_FILE=bundle.pem python python_scenarios.py ARGS.json WEBHOOK_URL

Every scenario returns JSON-able data; the test asserts on it. Requests that the test's engine gate
holds are recognised by their seed; when a scenario needs the test to let one go it calls
``notify("release:<seed>")`` (printed as ``EVENT release:<seed>`` by the script).
This file imports nothing from the test suite, so it runs as a standalone script.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import os
import sys
import time
from collections.abc import Awaitable, Callable
from typing import Any

import fal_client

LIGHTNING = "fal-ai/fast-lightning-sdxl/inpainting"
HYPER = "fal-ai/hyper-sdxl/inpainting"
UNKNOWN_ID = "00000000-0000-4000-8000-000000000000"

# Seeds double as the engine gate's instructions (see SeedGate in the test module).
SEED_RUN, SEED_HYPER, SEED_SUBMIT, SEED_WEBHOOK = 11, 12, 21, 41
SEED_SUBSCRIBE = 101  # held after step 1 until the client has seen the step in the logs
SEED_CANCEL_RUNNING = 102  # held after step 1 until it is cancelled
SEED_CANCEL_QUEUED = 31
SEED_BLOCKER = 103  # held after step 1 until released, so the queue fills up behind it
SEED_LOW, SEED_NORMAL, SEED_TIMEOUT = 104, 105, 106
SEED_ASYNC_RUN, SEED_ASYNC_SUBSCRIBE, SEED_ASYNC_SUBMIT = 51, 52, 53
SEED_KEYS = 61
HELD_UNTIL_RELEASED = (SEED_SUBSCRIBE, SEED_BLOCKER)
HELD_UNTIL_CANCELLED = (SEED_CANCEL_RUNNING,)

Notify = Callable[[str], None]


def args(base: dict[str, Any], seed: int, **extra: Any) -> dict[str, Any]:
    """The shared input with this scenario's seed (and overrides)."""
    return {**base, "seed": seed, **extra}


def status_json(status: fal_client.Status) -> dict[str, Any]:
    """A status object as ``{"type": "InProgress", "logs": [...], ...}``."""
    return {"type": type(status).__name__, **dataclasses.asdict(status)}


def messages(status: dict[str, Any]) -> list[str]:
    return [entry["message"] for entry in status.get("logs") or []]


def http_error(call: Callable[[], Any]) -> dict[str, Any]:
    """Call something that must fail with ``FalClientHTTPError``; its status, detail and error type."""
    try:
        value = call()
    except fal_client.FalClientHTTPError as exc:
        return {
            "status_code": exc.status_code,
            "message": exc.message,
            "error_type": exc.error_type,
            "request_id": exc.response_headers.get("x-fal-request-id"),
        }
    raise AssertionError(f"expected FalClientHTTPError, got {value!r}")


async def async_http_error(call: Callable[[], Awaitable[Any]]) -> dict[str, Any]:
    try:
        value = await call()
    except fal_client.FalClientHTTPError as exc:
        return {"status_code": exc.status_code, "message": exc.message, "error_type": exc.error_type}
    raise AssertionError(f"expected FalClientHTTPError, got {value!r}")


def wait_for_step(handle: fal_client.SyncRequestHandle, timeout: float = 30.0) -> dict[str, Any]:
    """Poll until the request is running and has logged its first denoising step (held there by the gate)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        status = status_json(handle.status(with_logs=True))
        if status["type"] == "InProgress" and any(m.startswith("Step 1/") for m in messages(status)):
            return status
        if status["type"] == "Completed":
            raise AssertionError(f"request {handle.request_id} completed before it could be seen running: {status}")
        time.sleep(0.05)
    raise AssertionError(f"request {handle.request_id} did not start within {timeout} s")


def run_apps(base: dict[str, Any]) -> dict[str, Any]:
    """``run`` on both apps, with a runner hint and a start timeout on one of them."""
    lightning = fal_client.run(LIGHTNING, args(base, SEED_RUN), hint="runner-a", start_timeout=20)
    hyper = fal_client.run(HYPER, args(base, SEED_HYPER, num_inference_steps="1"))
    return {"lightning": lightning, "hyper": hyper}


def subscribe_with_logs(base: dict[str, Any], notify: Notify) -> dict[str, Any]:
    """``subscribe(with_logs=True)``: the callback sees the running request's logs before it finishes."""
    updates: list[dict[str, Any]] = []
    enqueued: list[str] = []

    def on_update(status: fal_client.Status) -> None:
        update = status_json(status)
        updates.append(update)
        seen_step = [u for u in updates if u["type"] == "InProgress" and "Step 1/2" in messages(u)]
        if len(seen_step) == 1 and seen_step[0] is update:
            notify(f"release:{SEED_SUBSCRIBE}")

    result = fal_client.subscribe(
        LIGHTNING,
        args(base, SEED_SUBSCRIBE),
        with_logs=True,
        on_enqueue=enqueued.append,
        on_queue_update=on_update,
    )
    return {"request_id": enqueued[0], "updates": updates, "result": result}


def submit_status_result(base: dict[str, Any]) -> dict[str, Any]:
    """``submit`` + handle ``status``/``get`` + the module-level calls by request id."""
    handle = fal_client.submit(LIGHTNING, args(base, SEED_SUBMIT))
    first = status_json(handle.status(with_logs=True))
    result = handle.get()
    rebuilt = fal_client.sync_client.get_handle(LIGHTNING, handle.request_id)
    return {
        "request_id": handle.request_id,
        "first_status": first,
        "result": result,
        "handle_status": status_json(handle.status(with_logs=True)),
        "status_without_logs": status_json(fal_client.status(LIGHTNING, handle.request_id)),
        "status_by_id": status_json(fal_client.status(LIGHTNING, handle.request_id, with_logs=True)),
        "result_by_id": fal_client.result(LIGHTNING, handle.request_id),
        "handle_urls": [handle.response_url, handle.status_url, handle.cancel_url],
        "rebuilt_urls": [rebuilt.response_url, rebuilt.status_url, rebuilt.cancel_url],
        "cancel_completed": http_error(lambda: fal_client.cancel(LIGHTNING, handle.request_id)),
        "unknown_status": http_error(lambda: fal_client.status(LIGHTNING, UNKNOWN_ID)),
    }


def cancel_running_and_queued(base: dict[str, Any]) -> dict[str, Any]:
    """Cancel a request that is running (stops at its next step) and one still queued (never runs)."""
    running = fal_client.submit(LIGHTNING, args(base, SEED_CANCEL_RUNNING))
    running_status = wait_for_step(running)
    queued = fal_client.submit(LIGHTNING, args(base, SEED_CANCEL_QUEUED))
    queued_before = status_json(queued.status())
    queued.cancel()
    queued_after = status_json(fal_client.status(LIGHTNING, queued.request_id, with_logs=True))
    queued_result = http_error(queued.get)
    fal_client.cancel(LIGHTNING, running.request_id)
    running_result = http_error(lambda: fal_client.result(LIGHTNING, running.request_id))
    return {
        "running_id": running.request_id,
        "queued_id": queued.request_id,
        "running_before": running_status,
        "queued_before": queued_before,
        "queued_after": queued_after,
        "queued_result": queued_result,
        "running_result": running_result,
        "running_after": status_json(running.status(with_logs=True)),
        "cancel_again": http_error(running.cancel),
    }


def priority_and_start_timeout(base: dict[str, Any], notify: Notify) -> dict[str, Any]:
    """Behind a held request: ``priority="low"`` waits behind normal, and a start timeout expires (504)."""
    blocker = fal_client.submit(LIGHTNING, args(base, SEED_BLOCKER))
    wait_for_step(blocker)
    low = fal_client.submit(LIGHTNING, args(base, SEED_LOW), priority="low")
    normal = fal_client.submit(LIGHTNING, args(base, SEED_NORMAL))
    positions = {"low": status_json(low.status()), "normal": status_json(normal.status())}
    started = time.monotonic()
    timeout_error = http_error(lambda: fal_client.run(LIGHTNING, args(base, SEED_TIMEOUT), start_timeout=1.5))
    waited = time.monotonic() - started
    notify(f"release:{SEED_BLOCKER}")
    return {
        "positions": positions,
        "timeout_error": timeout_error,
        "timeout_waited_s": waited,
        "seeds": {name: h.get()["seed"] for name, h in (("blocker", blocker), ("normal", normal), ("low", low))},
    }


def validation_errors(base: dict[str, Any]) -> dict[str, Any]:
    """Inputs fal's schemas refuse: a step count neither app has, and one only the other app has."""
    return {
        "run": http_error(lambda: fal_client.run(LIGHTNING, args(base, 1, num_inference_steps="3"))),
        "submit": http_error(lambda: fal_client.submit(LIGHTNING, args(base, 1, num_inference_steps="3"))),
        "hyper_8": http_error(lambda: fal_client.run(HYPER, args(base, 1, num_inference_steps="8"))),
        # Hostile input (issue 13): a prompt over max_prompt_chars; no mask, whose 422 echoes the input cut short.
        "long_prompt": http_error(lambda: fal_client.submit(LIGHTNING, args(base, 1, prompt="x" * 10_001))),
        "no_mask": http_error(
            lambda: fal_client.run(LIGHTNING, {k: v for k, v in args(base, 1).items() if k != "mask_url"})
        ),
    }


def webhook(base: dict[str, Any], url: str) -> dict[str, Any]:
    """``submit(webhook_url=...)``; the test checks what its receiver got."""
    handle = fal_client.submit(LIGHTNING, args(base, SEED_WEBHOOK), webhook_url=url)
    return {"request_id": handle.request_id, "result": handle.get()}


def async_client(base: dict[str, Any]) -> dict[str, Any]:
    """The same calls through ``fal_client.AsyncClient``."""

    async def scenario() -> dict[str, Any]:
        client = fal_client.AsyncClient()
        run = await client.run(LIGHTNING, args(base, SEED_ASYNC_RUN), hint="runner-b", start_timeout=20)
        updates: list[dict[str, Any]] = []
        subscribed = await client.subscribe(
            LIGHTNING,
            args(base, SEED_ASYNC_SUBSCRIBE),
            with_logs=True,
            priority="low",
            on_queue_update=lambda status: updates.append(status_json(status)),
        )
        handle = await client.submit(LIGHTNING, args(base, SEED_ASYNC_SUBMIT), priority="low")
        result = await handle.get()
        return {
            "run": run,
            "subscribe": subscribed,
            "subscribe_updates": updates,
            "request_id": handle.request_id,
            "result": result,
            "status_by_id": status_json(await client.status(LIGHTNING, handle.request_id, with_logs=True)),
            "result_by_id": await client.result(LIGHTNING, handle.request_id),
            "cancel_completed": await async_http_error(lambda: client.cancel(LIGHTNING, handle.request_id)),
            "invalid": await async_http_error(lambda: client.run(LIGHTNING, args(base, 1, num_inference_steps="3"))),
        }

    return asyncio.run(scenario())


def api_keys(base: dict[str, Any], key: str) -> dict[str, Any]:
    """The right key (explicitly, besides FAL_KEY) works; a wrong one is refused on every route."""
    good = fal_client.SyncClient(key=key)
    handle = good.submit(LIGHTNING, args(base, SEED_KEYS))
    result = handle.get()
    bad = fal_client.SyncClient(key=key + "-wrong")
    return {
        "request_id": handle.request_id,
        "result": result,
        "run": http_error(lambda: bad.run(LIGHTNING, args(base, SEED_KEYS))),
        "submit": http_error(lambda: bad.submit(LIGHTNING, args(base, SEED_KEYS))),
        "status": http_error(lambda: bad.status(LIGHTNING, handle.request_id)),
        "result_by_id": http_error(lambda: bad.result(LIGHTNING, handle.request_id)),
        "cancel": http_error(lambda: bad.cancel(LIGHTNING, handle.request_id)),
    }


def run_all(base: dict[str, Any], webhook_url: str, key: str, notify: Notify) -> dict[str, Any]:
    return {
        "run": run_apps(base),
        "subscribe": subscribe_with_logs(base, notify),
        "submit": submit_status_result(base),
        "cancel": cancel_running_and_queued(base),
        "priority": priority_and_start_timeout(base, notify),
        "validation": validation_errors(base),
        "webhook": webhook(base, webhook_url),
        "async": async_client(base),
        "keys": api_keys(base, key),
    }


def main() -> None:
    with open(sys.argv[1], encoding="utf-8") as fh:
        base = json.load(fh)

    def notify(event: str) -> None:
        print(f"EVENT {event}", flush=True)

    results = run_all(base, sys.argv[2], os.environ["FAL_KEY"], notify)
    print("RESULT " + json.dumps(results), flush=True)


if __name__ == "__main__":
    main()
