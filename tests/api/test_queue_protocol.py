"""fal's queue protocol over real HTTP: submit, status (202/200), positions, logs, result, URL forms."""

from __future__ import annotations

import uuid

import httpx
import pytest

from tests.api.fal_wire import (
    HYPER,
    LIGHTNING,
    WIRE_STATES,
    client_for,
    endpoint,
    gated_server,
    hold_one,
    inpaint_input,
    poll_until,
    request_url,
    status,
    submit,
    wait_for,
)


def test_submit_answer_has_absolute_urls_position_and_request_id_header(make_server) -> None:
    """The submit body Python indexes directly, with URLs that work when followed verbatim."""
    server = make_server()
    with client_for(server) as client:
        response = client.post(f"/queue/{HYPER}", json=inpaint_input())
        assert response.status_code == 200
        body = response.json()
        rid = body["request_id"]
        uuid.UUID(rid)
        assert response.headers["x-fal-request-id"] == rid
        assert body["status"] == "IN_QUEUE"
        assert body["gateway_request_id"] == rid
        assert isinstance(body["queue_position"], int) and body["queue_position"] >= 0
        base = request_url(server.url, HYPER, rid)  # the sub-path is dropped: fal-ai/hyper-sdxl
        assert base == f"{server.url}/queue/fal-ai/hyper-sdxl/requests/{rid}"
        assert body["response_url"] == base
        assert body["status_url"] == f"{base}/status"
        assert body["cancel_url"] == f"{base}/cancel"

        # Python's submit() follows these URLs verbatim.
        while (polled := httpx.get(body["status_url"])).status_code == 202:
            assert polled.json()["status"] in WIRE_STATES
        assert polled.status_code == 200 and polled.json()["status"] == "COMPLETED"
        result = httpx.get(body["response_url"])
        assert result.status_code == 200
        assert result.headers["x-fal-request-id"] == rid
        output = result.json()
        assert set(output) == {"images", "timings", "seed", "has_nsfw_concepts", "prompt"}
        assert (output["images"][0]["width"], output["images"][0]["height"]) == (64, 48)


def test_public_url_is_the_base_of_every_url(make_server) -> None:
    server = make_server(public_url="https://gpu.example:8443/inpaint/")
    with client_for(server) as client:
        body = submit(client, HYPER)
        assert (
            body["status_url"]
            == f"https://gpu.example:8443/inpaint/queue/fal-ai/hyper-sdxl/requests/{body['request_id']}/status"
        )
        wait_for(client, HYPER, body["request_id"])
        image = client.get(f"/queue/fal-ai/hyper-sdxl/requests/{body['request_id']}").json()["images"][0]
        assert image["url"].startswith(f"https://gpu.example:8443/inpaint/files/{body['request_id']}/")


def test_status_codes_positions_and_result_before_completion(make_server, engine, request) -> None:
    """202 while queued or running, 200 once completed; queue_position = requests ahead; result 400 early."""
    server, gate = gated_server(make_server, engine, request)
    with client_for(server) as client:
        held = hold_one(client, gate)
        running = status(client, LIGHTNING, held).json()
        assert running["status"] == "IN_PROGRESS" and running["logs"] is None

        queued = [submit(client)["request_id"] for _ in range(3)]
        assert [status(client, LIGHTNING, rid).json()["queue_position"] for rid in queued] == [0, 1, 2]
        for rid in (held, queued[0]):
            early = client.get(f"/queue/{endpoint(LIGHTNING)}/requests/{rid}")
            assert early.status_code == 400
            assert early.headers["x-fal-error-type"] == "still_in_progress"

        assert client.put(f"/queue/{endpoint(LIGHTNING)}/requests/{queued[0]}/cancel").status_code == 202
        assert [status(client, LIGHTNING, rid).json()["queue_position"] for rid in queued[1:]] == [0, 1]

        gate.release.set()
        for rid in (held, *queued[1:]):
            done = wait_for(client, LIGHTNING, rid)
            assert "error" not in done
            assert isinstance(done["metrics"]["inference_time"], float) and done["metrics"]["inference_time"] > 0
            assert client.get(f"/queue/{endpoint(LIGHTNING)}/requests/{rid}").status_code == 200


def test_logs_flag_encodings_and_progress_lines(make_server, engine, request) -> None:
    """``logs`` is a list for 1/true/yes, null for 0/false/absent; the list carries step progress."""
    server, gate = gated_server(make_server, engine, request)
    with client_for(server) as client:
        held = hold_one(client, gate)
        poll_until(
            lambda: any(
                line["message"] == "Step 1/4" for line in status(client, LIGHTNING, held, logs="1").json()["logs"]
            ),
            what="the first step's log line",
        )
        gate.release.set()
        wait_for(client, LIGHTNING, held)
        for flag, listed in [("1", True), ("true", True), ("yes", True), ("0", False), ("false", False), (None, False)]:
            body = status(client, LIGHTNING, held, logs=flag).json()
            assert (body["logs"] is not None) == listed, (flag, body["logs"])
        logs = status(client, LIGHTNING, held, logs="true").json()["logs"]
        messages = [line["message"] for line in logs]
        assert messages[0] == "Request queued"
        assert [m for m in messages if m.startswith("Step ")] == ["Step 1/4", "Step 2/4", "Step 3/4", "Step 4/4"]
        for line in logs:
            assert set(line) == {"message", "level", "source", "timestamp"}
            assert line["level"] in ("STDERR", "STDOUT", "ERROR", "INFO", "WARN", "DEBUG")


def test_unknown_request_id_is_404_everywhere(make_server) -> None:
    server = make_server()
    with client_for(server) as client:
        rid = str(uuid.uuid4())
        base = f"/queue/{endpoint(HYPER)}/requests/{rid}"
        for method, url in [
            ("GET", f"{base}/status"),
            ("GET", base),
            ("PUT", f"{base}/cancel"),
            ("GET", f"{base}/status/stream"),
        ]:
            response = client.request(method, url)
            assert response.status_code == 404, (method, url)
            assert response.headers["content-type"] == "application/json"
            assert response.headers["x-fal-error-type"] == "not_found"
            assert "detail" in response.json()


def test_request_routes_accept_subpath_trailing_slash_and_no_queue_prefix(make_server) -> None:
    """Every documented and lenient form answers directly (a redirect breaks the async Python client)."""
    server = make_server()
    with client_for(server) as client:
        rid = submit(client, HYPER)["request_id"]
        wait_for(client, HYPER, rid)
        bases = [f"{prefix}/{ep}/requests/{rid}" for prefix in ("/queue", "") for ep in (endpoint(HYPER), HYPER)]
        for base in bases:
            for slash in ("", "/"):
                got = client.get(f"{base}/status{slash}", params={"logs": "0"})
                assert got.status_code == 200 and got.json()["status"] == "COMPLETED", (base, slash)
                assert client.get(f"{base}{slash}").status_code == 200, (base, slash)
                cancel = client.put(f"{base}/cancel{slash}")
                assert cancel.status_code == 400 and cancel.json()["status"] == "ALREADY_COMPLETED", (base, slash)
                with client.stream("GET", f"{base}/status/stream{slash}") as stream:
                    assert stream.status_code == 200, (base, slash)
        # The id is bound to its app: another app's URL does not find it.
        assert client.get(f"/queue/{endpoint(LIGHTNING)}/requests/{rid}/status").status_code == 404


def test_queue_host_routes_to_the_queue(make_server) -> None:
    """``Host: queue.<name>`` makes ``POST /{app}`` a submit, and its URLs carry no /queue prefix."""
    server = make_server()
    with client_for(server, headers={"Host": "queue.example"}) as client:
        response = client.post(f"/{HYPER}", json=inpaint_input())
        assert response.status_code == 200
        body = response.json()
        rid = body["request_id"]
        assert body["status"] == "IN_QUEUE"
        assert body["status_url"] == f"http://queue.example/fal-ai/hyper-sdxl/requests/{rid}/status"
        while (polled := client.get(f"/fal-ai/hyper-sdxl/requests/{rid}/status")).status_code == 202:
            pass
        assert polled.status_code == 200 and polled.json()["status"] == "COMPLETED"
        assert client.get(f"/fal-ai/hyper-sdxl/requests/{rid}").json()["images"]
    with client_for(server) as client:  # the same path on the run host is a synchronous run
        run = client.post(f"/{HYPER}", json=inpaint_input())
        assert run.status_code == 200 and "images" in run.json()


@pytest.mark.parametrize("app_id", [HYPER, LIGHTNING])
def test_sync_run_returns_output_and_serves_files(make_server, app_id: str) -> None:
    server = make_server()
    with client_for(server) as client:
        response = client.post(f"/{app_id}", json=inpaint_input(seed=11, format="png"))
        assert response.status_code == 200, response.text
        rid = response.headers["x-fal-request-id"]
        output = response.json()
        assert output["seed"] == 11 and output["prompt"] == "a red door"
        assert output["has_nsfw_concepts"] == [False]
        assert output["timings"]["inference"] > 0
        image = output["images"][0]
        assert image["content_type"] == "image/png" and image["url"].startswith(f"{server.url}/files/{rid}/")
        served = httpx.get(image["url"])
        assert served.status_code == 200
        assert served.headers["content-type"] == "image/png"
        assert served.headers["x-content-type-options"] == "nosniff"
        assert len(served.content) == image["file_size"] and served.content[:8] == b"\x89PNG\r\n\x1a\n"
        # The default format is JPEG.
        jpeg = client.post(f"/{app_id}", json=inpaint_input()).json()["images"][0]
        served = httpx.get(jpeg["url"])
        assert served.headers["content-type"] == "image/jpeg" and served.content[:2] == b"\xff\xd8"


def test_sync_mode_returns_data_uris_and_writes_no_file(make_server, tmp_path) -> None:
    data_dir = tmp_path / "sync-mode-data"
    server = make_server(data_dir=data_dir)
    with client_for(server) as client:
        run = client.post(f"/{HYPER}", json=inpaint_input(sync_mode=True))
        assert run.status_code == 200
        assert run.json()["images"][0]["url"].startswith("data:image/jpeg;base64,")
        queued = submit(client, HYPER, sync_mode=True, format="png")["request_id"]
        wait_for(client, HYPER, queued)
        result = client.get(f"/queue/{endpoint(HYPER)}/requests/{queued}")
        assert result.status_code == 200
        assert result.json()["images"][0]["url"].startswith("data:image/png;base64,")
        # A normal run in the same server does write its file, so the check below can see files.
        client.post(f"/{HYPER}", json=inpaint_input())
    written = sorted(p.relative_to(data_dir / "files").parts[0] for p in (data_dir / "files").rglob("*") if p.is_file())
    assert len(written) == 1
    assert run.headers["x-fal-request-id"] not in written and queued not in written


@pytest.mark.parametrize(
    ("app_id", "change", "field"),
    [
        (HYPER, {"prompt": None}, "prompt"),
        (HYPER, {"image_url": None}, "image_url"),
        (HYPER, {"num_inference_steps": "8"}, "num_inference_steps"),  # lightning has 8, hyper does not
        (LIGHTNING, {"num_inference_steps": "3"}, "num_inference_steps"),
        (LIGHTNING, {"num_inference_steps": True}, "num_inference_steps"),
        (LIGHTNING, {"image_size": "huge"}, "image_size"),
        (LIGHTNING, {"image_size": {"width": 0, "height": 48}}, "width"),
        (LIGHTNING, {"strength": 1.5}, "strength"),
        (LIGHTNING, {"format": "gif"}, "format"),
        (LIGHTNING, {"num_images": 9}, "num_images"),
        (LIGHTNING, {"safety_checker_version": "v3"}, "safety_checker_version"),
    ],
)
def test_validation_errors_are_422_detail_lists(make_server, app_id: str, change: dict, field: str) -> None:
    server = make_server()
    body = inpaint_input(**change)
    body = {k: v for k, v in body.items() if v is not None}
    with client_for(server) as client:
        for url in (f"/{app_id}", f"/queue/{app_id}"):
            response = client.post(url, json=body)
            assert response.status_code == 422, (url, response.text)
            assert response.headers["content-type"] == "application/json"
            assert response.headers["x-fal-error-type"] == "invalid_input"
            assert response.headers["x-fal-request-id"]
            detail = response.json()["detail"]
            assert isinstance(detail, list) and detail
            assert any(item["loc"][0] == "body" and field in item["loc"] for item in detail), detail
            assert all({"loc", "msg", "type"} <= set(item) for item in detail)


@pytest.mark.parametrize(
    ("app_id", "change", "size"),
    [
        (LIGHTNING, {"num_inference_steps": 2}, (64, 48)),  # an integer step count, as llms.txt prints it
        (LIGHTNING, {"num_inference_steps": "8"}, (64, 48)),
        (HYPER, {"num_inference_steps": 4, "image_size": {"width": 48, "height": 64}}, (48, 64)),
        (HYPER, {"image_size": "square", "unknown_field": 1}, (512, 512)),  # a preset; unknown fields ignored
    ],
)
def test_accepted_inputs_run(make_server, app_id: str, change: dict, size: tuple[int, int]) -> None:
    server = make_server()
    with client_for(server) as client:
        response = client.post(f"/{app_id}", json=inpaint_input(**change))
        assert response.status_code == 200, response.text
        image = response.json()["images"][0]
        assert (image["width"], image["height"]) == size


@pytest.mark.parametrize(
    ("field", "value", "error_type"),
    [
        ("image_url", "data:image/png;base64,bm90IGFuIGltYWdl", "invalid_input"),  # "not an image"
        ("mask_url", "data:image/png;base64,bm90IGFuIGltYWdl", "invalid_input"),
        ("image_url", "data:image/png;base64,@@@@", "input_fetch_error"),
        ("mask_url", "ftp://example.com/mask.png", "input_fetch_error"),
    ],
)
def test_bad_image_data_completes_with_an_error_naming_the_field(
    make_server, field: str, value: str, error_type: str
) -> None:
    server = make_server()
    with client_for(server) as client:
        rid = submit(client, HYPER, **{field: value})["request_id"]
        done = wait_for(client, HYPER, rid)
        assert done["error_type"] == error_type
        assert field in done["error"]
        result = client.get(f"/queue/{endpoint(HYPER)}/requests/{rid}")
        assert result.status_code == 422
        assert result.headers["x-fal-error-type"] == error_type
        assert result.headers["x-fal-request-id"] == rid
        assert result.json()["detail"][0]["loc"] == ["body", field]
        # The same input on a synchronous run answers the same 422.
        run = client.post(f"/{HYPER}", json=inpaint_input(**{field: value}))
        assert run.status_code == 422 and run.json()["detail"][0]["loc"] == ["body", field]


def test_every_error_is_json_with_an_error_type(make_server) -> None:
    server = make_server()
    with client_for(server) as client:
        done = submit(client, HYPER)["request_id"]
        wait_for(client, HYPER, done)
        cases = [
            ("POST", "/fal-ai/no-such-app/inpainting", {"json": inpaint_input()}, 404),
            ("GET", f"/queue/fal-ai/hyper-sdxl/requests/{uuid.uuid4()}/status", {}, 404),
            ("PUT", f"/queue/fal-ai/hyper-sdxl/requests/{done}/cancel", {}, 400),
            ("POST", f"/queue/{HYPER}", {"json": {"prompt": "x"}}, 422),
            (
                "POST",
                f"/queue/{HYPER}",
                {"content": b"{not json", "headers": {"content-type": "application/json"}},
                422,
            ),
            ("POST", f"/queue/{HYPER}", {"json": inpaint_input(), "headers": {"x-fal-queue-priority": "urgent"}}, 400),
            ("POST", f"/queue/{HYPER}", {"json": inpaint_input(), "headers": {"x-fal-request-timeout": "soon"}}, 400),
            ("POST", f"/queue/{HYPER}?fal_webhook=ftp://x", {"json": inpaint_input()}, 400),
            ("DELETE", f"/queue/fal-ai/hyper-sdxl/requests/{done}", {}, 405),
            ("GET", f"/files/{done}/9.jpeg", {}, 404),
            ("GET", "/files/%2E%2E/jobs.sqlite3", {}, 404),
            ("POST", "/api/fal/proxy", {"json": {}}, 400),
            ("GET", "/no/such/route", {}, 404),
        ]
        for method, url, kwargs, code in cases:
            response = client.request(method, url, **kwargs)
            assert response.status_code == code, (method, url, response.status_code, response.text)
            assert response.headers["content-type"] == "application/json", (method, url)
            assert response.headers.get("x-fal-error-type"), (method, url)
            assert "detail" in response.json(), (method, url)
            if code != 422:  # the JS clients show body.message as the error text
                assert response.json()["message"], (method, url)


def test_json_content_type_on_bodiless_requests_is_accepted(make_server) -> None:
    """The JS client sends ``Content-Type: application/json`` even on GET and on the body-less cancel PUT."""
    server = make_server()
    js = {"content-type": "application/json", "accept": "application/json"}
    with client_for(server, headers=js) as client:
        rid = submit(client, HYPER)["request_id"]
        wait_for(client, HYPER, rid, logs="1")
        assert client.get(f"/queue/{endpoint(HYPER)}/requests/{rid}").status_code == 200
        assert client.put(f"/queue/{endpoint(HYPER)}/requests/{rid}/cancel").status_code == 400
