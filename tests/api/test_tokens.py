"""Temporary tokens (``POST /tokens/``): bound to the key that minted them and to some apps, short-lived,
accepted as ``Authorization: Bearer <token>`` or ``?fal_jwt_token=<token>`` on every route a client uses.

The real JS client's flow (``connectionMode: "client"``, a browser holding only a token) is in
tests/compat/test_node_clients.py.
"""

from __future__ import annotations

import base64
import json
from typing import Any

import httpx

from server.http.access_tokens import AccessTokens, Grant
from server.http.auth import owner_id
from tests.api.fal_wire import (
    HYPER,
    LIGHTNING,
    FakeClock,
    client_for,
    endpoint,
    inpaint_input,
    sse_events,
    submit,
    wait_for,
)
from tests.helpers import noise_image, png

KEY = "key-a:secret"
OTHER_KEY = "key-b"
AS_KEY = {"Authorization": f"Key {KEY}"}
UNSIGNED = base64.urlsafe_b64encode(b'{"alg":"none","typ":"JWT"}').decode().rstrip("=")


def mint(client: httpx.Client, apps: Any, expiration: Any = None, headers: dict[str, str] = AS_KEY) -> httpx.Response:
    body: dict[str, Any] = {"allowed_apps": apps}
    if expiration is not None:
        body["token_expiration"] = expiration
    return client.post("/tokens/", json=body, headers=headers)


def token_for(client: httpx.Client, apps: list[str], expiration: int | None = None) -> str:
    response = mint(client, apps, expiration)
    assert response.status_code == 200, response.text
    token = response.json()
    assert isinstance(token, str) and token.count(".") == 2  # a JSON string, a compact JWT: what fal answers
    return token


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def claims(token: str) -> dict[str, Any]:
    body = token.split(".")[1]
    return json.loads(base64.urlsafe_b64decode(body + "=" * (-len(body) % 4)))


def refused(response: httpx.Response, status: int, error_type: str, words: str) -> None:
    assert response.status_code == status, response.text
    assert response.headers["x-fal-error-type"] == error_type
    assert words in response.json()["detail"], response.json()


def test_a_token_works_on_every_route_and_what_it_does_belongs_to_the_key(make_server) -> None:
    server = make_server(api_keys=[KEY, OTHER_KEY])
    with client_for(server) as client:
        token = token_for(client, ["fast-lightning-sdxl"])  # the alias, as the fal clients send it
        assert claims(token)["apps"] == ["fal-ai/fast-lightning-sdxl"]
        assert claims(token)["exp"] - claims(token)["iat"] == 120  # the clients' default lifetime
        auth = bearer(token)

        initiate = client.post("/storage/upload/initiate", json={"content_type": "image/png"}, headers=auth)
        assert initiate.status_code == 200, initiate.text
        assert client.put(initiate.json()["upload_url"], content=png(noise_image(64, 48))).status_code == 200
        rid = submit(client, LIGHTNING, headers=auth, image_url=initiate.json()["file_url"])["request_id"]
        base = f"/queue/{endpoint(LIGHTNING)}/requests/{rid}"
        # The JS client's status stream with connectionMode "client": the token in the query, no header.
        with client.stream("GET", f"{base}/status/stream", params={"fal_jwt_token": token}) as stream:
            assert stream.status_code == 200
            events = [e for e in sse_events(stream) if e is not None]
        assert events[-1]["status"] == "COMPLETED" and "error" not in events[-1]
        assert wait_for(client, LIGHTNING, rid, headers=auth)["status"] == "COMPLETED"
        assert client.get(base, headers=auth).status_code == 200
        cancel = client.put(f"{base}/cancel", headers=auth)
        assert cancel.status_code == 400 and cancel.json()["status"] == "ALREADY_COMPLETED"
        assert client.post(f"/{LIGHTNING}", json=inpaint_input(), headers=auth).status_code == 200

        # The key that minted the token owns the request; another key does not see it.
        assert client.get(base, headers=AS_KEY).status_code == 200
        assert client.get(base, headers={"Authorization": f"Key {OTHER_KEY}"}).status_code == 404
        # A token of another key does not see it either.
        other = mint(client, ["fast-lightning-sdxl"], headers={"Authorization": f"Key {OTHER_KEY}"}).json()
        assert client.get(base, headers=bearer(other)).status_code == 404


def test_a_token_for_another_app_is_refused_with_403(make_server) -> None:
    server = make_server(api_keys=[KEY])
    with client_for(server) as client:
        held = submit(client, HYPER, headers=AS_KEY)["request_id"]
        token = token_for(client, ["fal-ai/fast-lightning-sdxl/inpainting"])
        auth = bearer(token)
        base = f"/queue/{endpoint(HYPER)}/requests/{held}"
        for method, url, body in [
            ("POST", f"/queue/{HYPER}", inpaint_input()),
            ("POST", f"/{HYPER}", inpaint_input()),
            ("GET", f"{base}/status", None),
            ("GET", f"{base}/status/stream", None),
            ("GET", base, None),
            ("PUT", f"{base}/cancel", None),
        ]:
            response = client.request(method, url, json=body, headers=auth)
            refused(response, 403, "forbidden", "this token is for fal-ai/fast-lightning-sdxl/inpainting only")
        wait_for(client, HYPER, held, headers=AS_KEY)  # nothing was lost: the request ran, the key sees it

        # A token mints only for apps it may use itself, ending no later than itself.
        refused(mint(client, ["hyper-sdxl"], headers=auth), 403, "forbidden", "cannot mint tokens for other apps")
        child = mint(client, ["fast-lightning-sdxl"], 3600, headers=auth)
        assert child.status_code == 200, child.text
        assert claims(child.json())["apps"] == ["fal-ai/fast-lightning-sdxl/inpainting"]  # not widened
        assert claims(child.json())["exp"] == claims(token)["exp"]  # not extended


def test_minting_refuses_bad_requests_clearly(make_server) -> None:
    server = make_server(api_keys=[KEY], token_max_lifetime_s=600)
    with client_for(server) as client:
        for apps, expiration, field, words in [
            (["fal-ai/flux/dev"], None, "allowed_apps", "'fal-ai/flux/dev' is not an app this server serves"),
            (["hyper"], None, "allowed_apps", "is not an app this server serves"),
            ([], None, "allowed_apps", "at least 1 item"),
            ("hyper-sdxl", None, "allowed_apps", "valid list"),
            (["hyper-sdxl"], 601, "token_expiration", "less than or equal to 600"),
            (["hyper-sdxl"], 0, "token_expiration", "greater than or equal to 1"),
        ]:
            response = mint(client, apps, expiration)
            assert response.status_code == 422, (apps, expiration, response.text)
            [error] = response.json()["detail"]
            assert error["loc"][:2] == ["body", field] and words in error["msg"], error
        assert client.post("/tokens/", content=b"{", headers=AS_KEY).status_code == 422
        refused(client.post("/tokens/", json={"allowed_apps": ["hyper-sdxl"]}), 401, "unauthorized", "API key")
        refused(mint(client, ["hyper-sdxl"], headers={"Authorization": "Key nope"}), 401, "unauthorized", "invalid")
        # The longest lifetime is allowed, and the full app id and owner/alias forms work too.
        token = token_for(client, [HYPER, "fal-ai/fast-lightning-sdxl/"], 600)
        assert claims(token)["apps"] == ["fal-ai/fast-lightning-sdxl", HYPER]


def test_expired_forged_and_altered_tokens_are_refused_with_401(make_server) -> None:
    clock = FakeClock()
    server = make_server(api_keys=[KEY], clock=clock)
    with client_for(server) as client:
        token = token_for(client, ["hyper-sdxl"], 60)
        status_url = f"/queue/{endpoint(HYPER)}/requests/00000000-0000-0000-0000-000000000000/status"
        assert client.get(status_url, headers=bearer(token)).status_code == 404  # accepted: no such request
        header, body, mac = token.split(".")
        widened = {**claims(token), "apps": ["fal-ai"], "exp": claims(token)["exp"] + 10**6}
        altered_body = base64.urlsafe_b64encode(json.dumps(widened).encode()).decode().rstrip("=")
        foreign_secret = AccessTokens(b"x" * 32).issue(Grant(owner_id(KEY.encode()), (HYPER,), 2**40), clock())
        for bad in [
            f"{header}.{altered_body}.{mac}",  # claims changed, signature kept
            f"{header}.{body}.{mac[:-2]}AA",  # signature changed
            f"{UNSIGNED}.{body}.",  # alg none, no signature
            foreign_secret,  # signed with another server's secret
            "not-a-token",
            "",
            "é.é.é",
        ]:
            header_value = f"Bearer {bad}".strip().encode()  # raw UTF-8 bytes on the wire for "é"
            refused(client.get(status_url, headers={"Authorization": header_value}), 401, "unauthorized", "invalid")
            refused(client.get(status_url, params={"fal_jwt_token": bad}), 401, "unauthorized", "invalid")
        clock.advance(61)
        for response in (
            client.get(status_url, headers=bearer(token)),
            client.get(status_url, params={"fal_jwt_token": token}),
            client.post(f"/queue/{HYPER}", json=inpaint_input(), headers=bearer(token)),
            mint(client, ["hyper-sdxl"], headers=bearer(token)),
        ):
            refused(response, 401, "unauthorized", "this temporary token expired at")
        assert client.get(status_url, headers=AS_KEY).status_code == 404  # the key itself still works


def test_a_token_minted_on_one_node_works_on_another_until_its_key_is_removed(make_server, tmp_path) -> None:
    shared = {"data_dir": tmp_path / "shared"}  # one SQLite store, so one token secret, for every node
    first = make_server(api_keys=[KEY], **shared)
    second = make_server(api_keys=[KEY, OTHER_KEY], **shared)
    rotated = make_server(api_keys=[OTHER_KEY], **shared)
    with client_for(first) as one, client_for(second) as two, client_for(rotated) as three:
        token = token_for(one, ["fast-lightning-sdxl"])
        rid = submit(two, LIGHTNING, headers=bearer(token))["request_id"]
        assert wait_for(one, LIGHTNING, rid, headers=bearer(token))["status"] == "COMPLETED"
        refused(
            three.get(f"/queue/{endpoint(LIGHTNING)}/requests/{rid}", headers=bearer(token)),
            401,
            "unauthorized",
            "the API key that minted this token is no longer accepted",
        )
