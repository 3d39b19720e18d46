"""User URLs against a hostile image host, through the real server (reliability cases S1-S7, S17, R16).

The image host (:mod:`tests.hostile_http`) listens on 127.0.0.1, which the guard refuses unless a test
allows it: with ``fetch_allow=LOOPBACK``, or by allowing only the host name ``images.test`` that a stub
resolver maps to 127.0.0.1 (then a redirect to a raw ``127.0.0.1`` URL is refused). Refused and failed
inputs end the job COMPLETED with a 422 naming the field, never a 500.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from tests.api.fal_wire import HYPER, LIGHTNING, client_for, endpoint, inpaint_input, poll_until, submit, wait_for
from tests.helpers import noise_image, png
from tests.hostile_http import HostileServer, StubResolver
from tests.live import LOOPBACK
from tests.webhook_receiver import WebhookReceiver

IMAGES = "images.test"  # resolves (stub) to 127.0.0.1; the only thing allowed in the redirect tests


@pytest.fixture
def hostile() -> Iterator[HostileServer]:
    server = HostileServer(image=png(noise_image(64, 48, seed=3)))
    yield server
    server.close()


def run_job(client: httpx.Client, app_id: str = LIGHTNING, **overrides: Any) -> tuple[dict[str, Any], httpx.Response]:
    """Queue a request, wait for it; returns (final status, result response)."""
    request_id = submit(client, app_id, **overrides)["request_id"]
    done = wait_for(client, app_id, request_id, timeout=60)
    return done, client.get(f"/queue/{endpoint(app_id)}/requests/{request_id}")


def assert_input_error(
    done: dict[str, Any], result: httpx.Response, field: str, error_type: str = "input_fetch_error"
) -> str:
    """The job failed with a 422 naming ``field`` and no internal address; returns the message."""
    assert done["error_type"] == error_type, done
    assert result.status_code == 422, result.text
    assert result.headers["x-fal-error-type"] == error_type
    [detail] = result.json()["detail"]
    assert detail["loc"] == ["body", *field.split(".")], detail
    for internal in ("127.0.0.1", "169.254", "10.0.0.5", "::1", "Traceback"):
        assert internal not in result.text, result.text
    return detail["msg"]


def assert_succeeded(done: dict[str, Any], result: httpx.Response) -> None:
    assert done.get("error") is None, done
    assert result.status_code == 200, result.text
    assert len(result.json()["images"]) == 1


# ---------------------------------------------------------------------------------------------- S1, S2, S5


def test_internal_and_malformed_urls_fail_with_422_before_any_connection(make_server, hostile) -> None:
    port = hostile.port
    refused = [
        "http://169.254.169.254/latest/meta-data/",
        f"http://127.0.0.1:{port}/image.png",
        f"http://localhost:{port}/image.png",  # the system resolver answers loopback
        f"http://0.0.0.0:{port}/image.png",
        f"http://2130706433:{port}/image.png",
        f"http://0x7f.1:{port}/image.png",
        f"http://0177.0.0.1:{port}/image.png",
        f"http://127.1:{port}/image.png",
        f"http://[::1]:{port}/image.png",
        f"http://[::ffff:127.0.0.1]:{port}/image.png",
        f"http://a@127.0.0.1:{port}/image.png",
        f"http://[127.0.0.1]:{port}/image.png",
        "http://10.0.0.5/image.png",
        "http://172.16.0.1/image.png",
        "http://192.168.1.1/image.png",
        "http://100.64.0.1/image.png",
        "http://[fc00::1]/image.png",
        "http://[fe80::1]/image.png",
        "file:///etc/passwd",
        "/etc/passwd",
        "ftp://images.example/a.png",
        "gopher://images.example:70/_x",
        "data:text/html;base64,PHNjcmlwdD48L3NjcmlwdD4=",
    ]
    server = make_server()  # no allow-list
    with client_for(server) as client:
        for url in refused:
            done, result = run_job(client, image_url=url)
            assert_input_error(done, result, "image_url")
        done, result = run_job(client, HYPER, embeddings=[{"path": "http://169.254.169.254/e.safetensors"}])
        assert "not allowed" in assert_input_error(done, result, "embeddings.0.path")
        run = client.post(f"/{LIGHTNING}", json=inpaint_input(mask_url="http://169.254.169.254/latest/meta-data/"))
        assert run.status_code == 422 and run.json()["detail"][0]["loc"] == ["body", "mask_url"]
    assert hostile.connections == 0


# ---------------------------------------------------------------------------------------------- S3


def test_every_redirect_hop_is_checked_and_at_most_three_are_followed(make_server, hostile) -> None:
    resolver = StubResolver({IMAGES: [["127.0.0.1"]]})
    server = make_server(fetch_allow=[IMAGES], fetch_resolver=resolver)
    base = f"http://{IMAGES}:{hostile.port}"
    with client_for(server) as client:
        for target in (
            f"http://127.0.0.1:{hostile.port}/image.png",
            "http://169.254.169.254/latest/meta-data/",
            "http://[::1]/image.png",
            "file:///etc/passwd",
        ):
            done, result = run_job(client, image_url=f"{base}/redirect?to={target}")
            assert "redirected to a URL that" in assert_input_error(done, result, "image_url")
        assert hostile.paths() == ["/redirect"] * 4  # the redirect targets were never requested

        done, result = run_job(client, image_url=f"{base}/hops/3")
        assert_succeeded(done, result)
        done, result = run_job(client, image_url=f"{base}/hops/4")
        assert "more than 3 times" in assert_input_error(done, result, "image_url")
    assert "/hops/0" in hostile.paths() and hostile.paths().count("/hops/0") == 1  # only from hops/3
    assert {seen.host for seen in hostile.requests} == {f"{IMAGES}:{hostile.port}"}  # Host kept, not the IP


# ---------------------------------------------------------------------------------------------- S4


def test_dns_rebinding_connects_only_to_the_address_that_was_checked(make_server, hostile) -> None:
    """The name answers 127.0.0.1 (allowed here, standing in for a public address), then 10.0.0.5: the fetch
    reaches the first answer without a second lookup; the next connection resolves again and is refused."""
    resolver = StubResolver({"rebind.test": [["127.0.0.1"], ["10.0.0.5"]], "private.test": [["10.0.0.5"]]})
    server = make_server(fetch_allow=LOOPBACK, fetch_resolver=resolver)
    url = f"http://rebind.test:{hostile.port}/image.png"
    with client_for(server) as client:
        done, result = run_job(client, image_url=url)
        assert_succeeded(done, result)  # "rebind.test" exists nowhere but in the stub: the pinned address was used
        assert resolver.calls == ["rebind.test"]
        assert hostile.connections == 1 and hostile.requests[0].host == f"rebind.test:{hostile.port}"

        done, result = run_job(client, image_url=url)
        assert_input_error(done, result, "image_url")
        done, result = run_job(client, image_url=f"http://private.test:{hostile.port}/image.png")
        assert_input_error(done, result, "image_url")
    assert hostile.connections == 1


# ---------------------------------------------------------------------------------------------- S6


@pytest.mark.parametrize("path", ["/huge", "/endless"])
def test_bodies_over_the_byte_cap_stop_the_download(make_server, hostile, path: str) -> None:
    cap = 100_000
    server = make_server(fetch_allow=LOOPBACK, input_max_bytes=cap)
    with client_for(server) as client:
        started = time.monotonic()
        done, result = run_job(client, image_url=f"{hostile.url}{path}")
        assert f"larger than {cap} bytes" in assert_input_error(done, result, "image_url")
        assert time.monotonic() - started < 10
    poll_until(lambda: hostile.finished[path] == 1, timeout=20, what="the host to notice the client left")
    assert hostile.sent[path] < 32 * 1024 * 1024  # of 200 MB (or endless); the rest is socket buffers


# ---------------------------------------------------------------------------------------------- S7


def test_a_trickling_host_times_out_without_holding_the_gpu_lane(make_server, hostile) -> None:
    """1 byte a second: the fetch deadline fails the job with input_fetch_timeout, and a job queued behind it
    runs and finishes meanwhile instead of waiting for the deadline."""
    server = make_server(fetch_allow=LOOPBACK, input_timeout_s=2)
    store = server.app.state.store
    with client_for(server) as client:
        started = time.monotonic()
        slow = submit(client, LIGHTNING, image_url=f"{hostile.url}/slow")["request_id"]
        poll_until(lambda: hostile.sent["/slow"] > 0, what="the slow download to start")
        fast = submit(client, LIGHTNING, seed=5)["request_id"]  # data URIs, queued behind the slow one
        assert wait_for(client, LIGHTNING, fast, timeout=60).get("error") is None
        done = wait_for(client, LIGHTNING, slow, timeout=60)
        elapsed = time.monotonic() - started
        result = client.get(f"/queue/{endpoint(LIGHTNING)}/requests/{slow}")
    assert "longer than 2 s" in assert_input_error(done, result, "image_url", "input_fetch_timeout")
    assert 2 <= elapsed < 10
    assert store.get(fast).finished_at < store.get(slow).finished_at
    poll_until(lambda: hostile.finished["/slow"] == 1, timeout=10, what="the host to notice the client left")


# ---------------------------------------------------------------------------------------------- R16


def test_connection_resets_are_retried_twice_then_fail_the_input(make_server, hostile) -> None:
    server = make_server(fetch_allow=LOOPBACK, fetch_retry_base_s=0.05)
    with client_for(server) as client:
        done, result = run_job(client, image_url=f"{hostile.url}/reset")
        assert "failed 3 times" in assert_input_error(done, result, "image_url")
        assert hostile.paths().count("/reset") == 3

        done, result = run_job(client, image_url=f"{hostile.url}/flaky/2")  # two resets, then the image
        assert_succeeded(done, result)
        assert hostile.paths().count("/flaky/2") == 3


# ---------------------------------------------------------------------------------------------- S17


def test_webhooks_to_internal_addresses_are_refused_at_submit(make_server) -> None:
    resolver = StubResolver({"hooks.test": [["10.0.0.5"]], "mixed.test": [["93.184.216.34", "169.254.169.254"]]})
    server = make_server(fetch_resolver=resolver)
    with client_for(server) as client:
        for url in (
            "http://10.0.0.5/hook",
            "http://169.254.169.254/latest/meta-data/",
            "http://127.0.0.1:8000/hook",
            "http://2130706433/hook",
            "http://[::1]/hook",
            "https://user@hooks.example/hook",
            "http://hooks.test/hook",
            "http://mixed.test/hook",
            "http://nowhere.test/hook",
            "file:///etc/passwd",
        ):
            response = client.post(f"/queue/{LIGHTNING}", params={"fal_webhook": url}, json=inpaint_input())
            assert response.status_code == 400, (url, response.text)
            assert response.json()["error_type"] == "bad_request"
            detail = response.json()["detail"]
            assert detail.startswith("fal_webhook ") and "10.0.0.5" not in detail and "169.254" not in detail
    assert server.app.state.store.counts() == {}  # no job was created


def test_a_webhook_host_that_turns_private_after_submit_is_not_contacted(make_server) -> None:
    receiver = WebhookReceiver()
    try:
        port = httpx.URL(receiver.url).port
        resolver = StubResolver({"hooks.test": [["127.0.0.1"], ["10.0.0.5"]]})
        server = make_server(fetch_allow=LOOPBACK, fetch_resolver=resolver, webhook_max_attempts=1)
        with client_for(server) as client:
            response = client.post(
                f"/queue/{LIGHTNING}", params={"fal_webhook": f"http://hooks.test:{port}/hook"}, json=inpaint_input()
            )
            assert response.status_code == 200, response.text
            request_id = response.json()["request_id"]
            wait_for(client, LIGHTNING, request_id)
        store = server.app.state.store
        poll_until(lambda: (store.webhook_state(request_id) or ("",))[0] == "failed", what="the delivery to fail")
        state, attempts, error = store.webhook_state(request_id)
        assert state == "failed" and attempts == 1 and "not allowed" in error and "10.0.0.5" not in error
        assert receiver.deliveries == []
        assert resolver.calls == ["hooks.test", "hooks.test"]  # at submit, then at delivery
    finally:
        receiver.close()


def test_data_uris_and_this_servers_uploads_need_no_allow_list(make_server) -> None:
    server = make_server()
    data = png(noise_image(64, 48, seed=9))
    with client_for(server) as client:
        urls = client.post("/storage/upload/initiate", json={"content_type": "image/png", "file_name": "a.png"}).json()
        assert httpx.put(urls["upload_url"], content=data, headers={"content-type": "image/png"}).status_code == 200
        done, result = run_job(client, image_url=urls["file_url"])
        assert_succeeded(done, result)
