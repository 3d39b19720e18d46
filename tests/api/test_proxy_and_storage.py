"""The JS proxy protocol (``/api/fal/proxy`` + ``x-fal-target-url``), CORS, and the storage emulation."""

from __future__ import annotations

import io

import httpx
import pytest
from PIL import Image

from tests.api.fal_wire import HYPER, LIGHTNING, client_for, inpaint_input, sse_events
from tests.helpers import noise_image, png

PROXY = "/api/fal/proxy"
TARGET = "x-fal-target-url"


def _proxy(client: httpx.Client, method: str, target: str, **kwargs) -> httpx.Response:
    headers = {TARGET: target, **kwargs.pop("headers", {})}
    return client.request(method, PROXY, headers=headers, **kwargs)


def test_proxy_sync_run(make_server) -> None:
    server = make_server()
    with client_for(server) as client:
        response = _proxy(client, "POST", f"https://fal.run/{HYPER}", json=inpaint_input())
        assert response.status_code == 200, response.text
        assert response.headers["x-fal-request-id"]
        assert response.json()["images"][0]["url"].startswith(f"{server.url}/files/")
        invalid = _proxy(client, "POST", f"https://fal.run/{HYPER}", json={"prompt": "x"})
        assert invalid.status_code == 422 and isinstance(invalid.json()["detail"], list)


def test_proxy_queue_submit_status_stream_and_result(make_server) -> None:
    server = make_server()
    queue = "https://queue.fal.run/fal-ai/fast-lightning-sdxl"
    with client_for(server) as client:
        submitted = _proxy(client, "POST", f"https://queue.fal.run/{LIGHTNING}", json=inpaint_input())
        assert submitted.status_code == 200, submitted.text
        body = submitted.json()
        rid = body["request_id"]
        assert body["status"] == "IN_QUEUE" and submitted.headers["x-fal-request-id"] == rid
        assert body["status_url"] == f"{server.url}/queue/fal-ai/fast-lightning-sdxl/requests/{rid}/status"

        with client.stream(
            "GET",
            PROXY,
            headers={
                TARGET: f"{queue}/requests/{rid}/status/stream?logs=1",
                "accept": "application/json, text/event-stream",
            },
        ) as stream:
            assert stream.status_code == 200
            assert stream.headers["content-type"].startswith("text/event-stream")
            assert stream.headers["x-fal-request-id"] == rid
            events = [e for e in sse_events(stream) if e is not None]
        assert events[-1]["status"] == "COMPLETED" and events[-1]["request_id"] == rid

        polled = _proxy(client, "GET", f"{queue}/requests/{rid}/status?logs=1")
        assert polled.status_code == 200 and polled.json()["status"] == "COMPLETED"
        assert isinstance(polled.json()["logs"], list)
        result = _proxy(client, "GET", f"{queue}/requests/{rid}")
        assert result.status_code == 200 and result.headers["x-fal-request-id"] == rid
        assert result.json()["images"]
        cancel = _proxy(client, "PUT", f"{queue}/requests/{rid}/cancel")
        assert cancel.status_code == 400 and cancel.json()["status"] == "ALREADY_COMPLETED"


def test_proxy_storage_initiate_and_upload(make_server) -> None:
    server = make_server()
    data = png(noise_image(64, 48, seed=9))
    with client_for(server) as client:
        for host in ("rest.fal.ai", "rest.alpha.fal.ai"):
            initiated = _proxy(
                client,
                "POST",
                f"https://{host}/storage/upload/initiate?storage_type=fal-cdn-v3",
                json={"content_type": "image/png", "file_name": "photo.png"},
            )
            assert initiated.status_code == 200, initiated.text
            urls = initiated.json()
            assert urls["upload_url"].startswith(f"{server.url}/uploads/")
            assert httpx.put(urls["upload_url"], content=data, headers={"content-type": "image/png"}).status_code == 200
            assert httpx.get(urls["file_url"]).content == data


@pytest.mark.parametrize(
    "target",
    [
        None,
        "https://evil.example/fal-ai/hyper-sdxl/inpainting",
        "https://fal.run.evil.example/fal-ai/hyper-sdxl/inpainting",
        "http://fal.run/fal-ai/hyper-sdxl/inpainting",  # plain http is not a fal URL
        "not a url",
        "https://rest.fal.ai/billing/usage",  # of the REST hosts, only storage and /tokens/ are served
    ],
)
def test_proxy_refuses_a_missing_or_foreign_target(make_server, target: str | None) -> None:
    server = make_server()
    headers = {} if target is None else {TARGET: target}
    for method in ("GET", "POST"):
        response = httpx.request(method, f"{server.url}{PROXY}", headers=headers, json=inpaint_input())
        assert response.status_code == 400, (target, response.text)
        assert response.headers["content-type"] == "application/json"
        assert response.headers["x-fal-error-type"] == "bad_request"
        assert response.json()["detail"]


def test_cors_preflight_and_exposed_headers(make_server) -> None:
    server = make_server()
    origin = "https://app.example"
    preflight = httpx.options(
        f"{server.url}{PROXY}",
        headers={
            "Origin": origin,
            "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "authorization, content-type, x-fal-target-url, x-fal-queue-priority",
        },
    )
    assert preflight.status_code == 200
    allowed = preflight.headers["access-control-allow-headers"].lower()
    for header in ("x-fal-target-url", "authorization", "x-fal-queue-priority"):
        assert header in allowed
    assert "POST" in preflight.headers["access-control-allow-methods"]
    response = httpx.post(
        f"{server.url}{PROXY}",
        headers={"Origin": origin, TARGET: f"https://queue.fal.run/{HYPER}"},
        json=inpaint_input(),
    )
    assert response.status_code == 200
    assert response.headers["access-control-allow-origin"] in ("*", origin)
    exposed = response.headers["access-control-expose-headers"].lower()
    assert "x-fal-request-id" in exposed and "x-fal-request-timeout-type" in exposed


def test_js_upload_round_trip_feeds_a_request(make_server) -> None:
    """initiate -> PUT bytes (no key) -> GET file_url; the file_url works as image_url; one PUT only."""
    server = make_server(api_keys=["k"])
    data = png(noise_image(64, 48, seed=4))
    with client_for(server, headers={"Authorization": "Key k"}) as client:
        initiated = client.post(
            "/storage/upload/initiate", json={"content_type": "image/png", "file_name": "a b/../c.png"}
        )
        assert initiated.status_code == 200
        urls = initiated.json()
        upload_url, file_url = urls["upload_url"], urls["file_url"]
        assert httpx.URL(upload_url).path.count("/") == 3  # /uploads/<token>/<one safe segment>
        assert httpx.get(file_url).status_code == 404  # nothing uploaded yet
        put = httpx.put(upload_url, content=data, headers={"content-type": "image/png"})
        assert put.status_code == 200
        again = httpx.put(upload_url, content=b"other bytes", headers={"content-type": "image/png"})
        assert again.status_code == 400 and again.headers["x-fal-error-type"] == "bad_request"
        served = httpx.get(file_url)
        assert served.status_code == 200 and served.content == data
        assert served.headers["content-type"] == "image/png"
        assert served.headers["x-content-type-options"] == "nosniff"

        run = client.post(f"/{HYPER}", json=inpaint_input(image_url=file_url, format="png"))
        assert run.status_code == 200, run.text
        out = httpx.get(run.json()["images"][0]["url"])
        with Image.open(io.BytesIO(out.content)) as image:
            assert image.size == (64, 48)
        # Unknown tokens and non-image types are refused.
        assert httpx.put(f"{server.url}/uploads/{'x' * 32}/c.png", content=data).status_code == 404
        text = client.post("/storage/upload/initiate", json={"content_type": "text/html", "file_name": "x.html"})
        assert text.status_code == 400


def test_python_token_upload_flow(make_server) -> None:
    server = make_server(api_keys=["k"])
    data = png(noise_image(64, 48, seed=5))
    with client_for(server, headers={"Authorization": "Key k"}) as client:
        token = client.post("/storage/auth/token?storage_type=fal-cdn-v3", json={})
        assert token.status_code == 200
        grant = token.json()
        assert set(grant) == {"token", "token_type", "base_url", "expires_at"}
        uploaded = httpx.post(
            f"{server.url}/files/upload",
            content=data,
            headers={
                "Authorization": f"{grant['token_type']} {grant['token']}",
                "Content-Type": "image/png",
                "X-Fal-File-Name": "mask.png",
            },
        )
        assert uploaded.status_code == 200, uploaded.text
        access_url = uploaded.json()["access_url"]
        assert httpx.get(access_url).content == data
        assert client.post(f"/{HYPER}", json=inpaint_input(image_url=access_url)).status_code == 200

    forged = grant["token"][:-4] + ("0000" if not grant["token"].endswith("0000") else "1111")
    for authorization in (f"Bearer {forged}", "Bearer nonsense", "Key k", ""):
        refused = httpx.post(
            f"{server.url}/files/upload",
            content=data,
            headers={"Authorization": authorization, "Content-Type": "image/png"},
        )
        assert refused.status_code == 401, authorization
        assert refused.headers["content-type"] == "application/json"
        assert refused.headers["x-fal-error-type"] == "unauthorized"
