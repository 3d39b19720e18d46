"""API keys: ``Authorization: Key <key>``; refusals are 401 JSON; a request is visible only to its key."""

from __future__ import annotations

import httpx
import pytest

from tests.api.fal_wire import HYPER, client_for, endpoint, inpaint_input, wait_for

KEY_A = "key-a:secret"
KEY_B = "key-b"


@pytest.fixture
def server(make_server):
    return make_server(api_keys=[KEY_A, KEY_B])


@pytest.mark.parametrize(
    "authorization",
    [
        None,
        "",
        "Key",
        "Key wrong",
        "Bearer key-b",
        f"Key {KEY_B}x",
        "Key kéy".encode(),  # raw UTF-8 bytes on the wire
        "Key \u00e9".encode("latin-1"),
        b"Key \xff\xfe",
    ],
)
def test_missing_or_wrong_key_is_401_json(server, authorization: str | bytes | None) -> None:
    headers = {} if authorization is None else {"Authorization": authorization}
    with httpx.Client(base_url=server.url, timeout=30) as client:
        for method, url, kwargs in [
            ("POST", f"/{HYPER}", {"json": inpaint_input()}),
            ("POST", f"/queue/{HYPER}", {"json": inpaint_input()}),
            ("GET", "/queue/fal-ai/hyper-sdxl/requests/00000000-0000-0000-0000-000000000000/status", {}),
            ("POST", "/storage/upload/initiate", {"json": {"content_type": "image/png"}}),
            ("POST", "/storage/auth/token", {"json": {}}),
        ]:
            response = client.request(method, url, headers=headers, **kwargs)
            assert response.status_code == 401, (authorization, url, response.text)
            assert response.headers["content-type"] == "application/json"
            assert response.headers["x-fal-error-type"] == "unauthorized"
            assert "detail" in response.json()


def test_requests_are_private_to_their_key(server) -> None:
    with (
        client_for(server, headers={"Authorization": f"Key {KEY_A}"}) as owner,
        client_for(server, headers={"Authorization": f"Key {KEY_B}"}) as other,
    ):
        submitted = owner.post(f"/queue/{HYPER}", json=inpaint_input())
        assert submitted.status_code == 200
        rid = submitted.json()["request_id"]
        wait_for(owner, HYPER, rid)
        base = f"/queue/{endpoint(HYPER)}/requests/{rid}"
        for method, url in [
            ("GET", f"{base}/status"),
            ("GET", base),
            ("PUT", f"{base}/cancel"),
            ("GET", f"{base}/status/stream"),
        ]:
            response = other.request(method, url)
            assert response.status_code == 404, (method, url)
            assert response.headers["x-fal-error-type"] == "not_found"
        # The owner still sees everything, and the key is case-sensitive.
        assert owner.get(base).status_code == 200
        lowered = owner.get(base, headers={"Authorization": f"key {KEY_A}"})
        assert lowered.status_code == 200  # the scheme is case-insensitive
        assert owner.get(base, headers={"Authorization": f"Key {KEY_A.upper()}"}).status_code == 401


def test_operations_and_generated_files_need_no_key(server) -> None:
    with client_for(server, headers={"Authorization": f"Key {KEY_B}"}) as client:
        run = client.post(f"/{HYPER}", json=inpaint_input())
        assert run.status_code == 200
        file_url = run.json()["images"][0]["url"]
    for url in ("/health/live", "/health/ready", "/metrics", "/openapi.json"):
        assert httpx.get(f"{server.url}{url}").status_code == 200, url
    image = httpx.get(file_url)
    assert image.status_code == 200 and image.headers["content-type"] == "image/jpeg"


def test_keys_are_compared_in_constant_time_on_bytes_against_every_key(monkeypatch) -> None:
    """S13: hmac.compare_digest on bytes, and every configured key is compared (no early exit)."""
    import hmac

    from server.http import auth

    calls: list[tuple[type, type]] = []
    real = hmac.compare_digest

    def recording(a, b):
        calls.append((type(a), type(b)))
        return real(a, b)

    monkeypatch.setattr(auth.hmac, "compare_digest", recording)
    keys = auth.KeyAuth([KEY_A, KEY_B, "third"])
    assert keys.owner(f"Key {KEY_A}") == auth.owner_id(KEY_A.encode())
    assert calls == [(bytes, bytes)] * 3  # the first key matched, the other two were still compared
    calls.clear()
    with pytest.raises(auth.Unauthorized):
        keys.owner("Key nope")
    assert calls == [(bytes, bytes)] * 3
