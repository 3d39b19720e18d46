"""The pages' routes without a browser: ``GET /queue/requests`` (a caller's own recent requests), the pages and
their files (served from the package, naming no other host), ``/ui/config.json``, and the ``playground``
setting. The pages themselves, in Chromium, are tested in tests/browser."""

from __future__ import annotations

import re
import tomllib
from fnmatch import fnmatch
from pathlib import Path

from server.http.playground import ASSETS_DIR
from tests.api.fal_wire import HYPER, LIGHTNING, client_for, submit, wait_for

KEY, OTHER = "key-a", "key-b"
AS_KEY, AS_OTHER = {"Authorization": f"Key {KEY}"}, {"Authorization": f"Key {OTHER}"}
REPO = Path(__file__).resolve().parents[2]
STATIC = REPO / "server" / "http" / "static" / "playground"


def test_recent_requests_are_the_callers_own_newest_first(make_server) -> None:
    server = make_server(api_keys=[KEY, OTHER])
    with client_for(server) as client:
        ids = [submit(client, app, headers=AS_KEY)["request_id"] for app in (LIGHTNING, HYPER, LIGHTNING)]
        other = submit(client, LIGHTNING, headers=AS_OTHER)["request_id"]
        for request_id, app in zip([*ids, other], [LIGHTNING, HYPER, LIGHTNING, LIGHTNING], strict=True):
            wait_for(client, app, request_id, headers=AS_KEY if request_id != other else AS_OTHER)

        mine = client.get("/queue/requests", headers=AS_KEY)
        assert mine.status_code == 200, mine.text
        rows = mine.json()["requests"]
        assert [r["request_id"] for r in rows] == ids[::-1]
        first = rows[-1]
        assert first["app_id"] == LIGHTNING and first["status"] == "COMPLETED" and first["state"] == "succeeded"
        assert first["error_type"] is None and first["inference_time"] > 0
        assert first["created_at"] <= first["started_at"] <= first["finished_at"]
        assert first["status_url"] == f"/queue/fal-ai/fast-lightning-sdxl/requests/{ids[0]}/status"
        assert client.get(first["status_url"], headers=AS_KEY).json()["status"] == "COMPLETED"

        theirs = client.get("/queue/requests", headers=AS_OTHER).json()["requests"]
        assert [r["request_id"] for r in theirs] == [other]
        limited = client.get("/queue/requests", params={"limit": 2}, headers=AS_KEY).json()["requests"]
        assert [r["request_id"] for r in limited] == ids[:0:-1]

        # A temporary token sees the requests of its own apps only.
        token = client.post("/tokens/", json={"allowed_apps": ["hyper-sdxl"]}, headers=AS_KEY).json()
        scoped = client.get("/queue/requests", headers={"Authorization": f"Bearer {token}"}).json()["requests"]
        assert [r["request_id"] for r in scoped] == [ids[1]]

        # Bad calls: a clear error, and the list is unchanged.
        for limit in (0, 101, "many"):
            refused = client.get("/queue/requests", params={"limit": limit}, headers=AS_KEY)
            assert refused.status_code == 422 and refused.json()["detail"][0]["loc"] == ["query", "limit"]
        assert client.get("/queue/requests").status_code == 401
        assert client.get("/queue/requests", headers={"Authorization": "Key wrong"}).status_code == 401
        assert client.get("/queue/requests", headers=AS_KEY).json()["requests"] == rows


def test_the_pages_and_their_files_come_from_this_server_only(make_server) -> None:
    server = make_server(api_keys=[KEY], max_num_images=4)
    with client_for(server) as client:
        for path in ("/", "/ui/status"):
            page = client.get(path)
            assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
            csp = page.headers["content-security-policy"]
            assert "default-src 'self'" in csp and "connect-src 'self' data: blob:;" in csp
            # Every file a page names, and every module those import, is served here.
            names = re.findall(r'(?:src|href)="(/ui/static/[^"]+)"', page.text)
            assert names, page.text
            for name in _with_imports(names):
                asset = client.get(name)
                assert asset.status_code == 200, name
                if name.endswith(".js"):
                    assert "javascript" in asset.headers["content-type"]
        # On a queue. host the page is the page, not a queue route.
        assert client.get("/", headers={"Host": "queue.localhost"}).text == client.get("/").text
        config = client.get("/ui/config.json").json()
        assert config["auth_required"] is True and config["limits"]["max_num_images"] == 4
        assert "/" not in client.get("/openapi.json").json()["paths"]


def test_the_playground_setting_turns_the_pages_off(make_server) -> None:
    server = make_server(playground=False)
    with client_for(server) as client:
        for path in ("/", "/ui/status", "/ui/config.json", "/ui/static/playground.js"):
            assert client.get(path).status_code == 404, path


def test_the_page_files_name_no_other_host_and_ship_in_the_package() -> None:
    files = sorted(p for p in STATIC.iterdir() if p.is_file())
    assert Path(str(ASSETS_DIR)) == STATIC and len(files) >= 8
    for path in files:
        text = path.read_text()
        assert not re.search(r"(https?:)?//[a-z0-9.-]+\.[a-z]{2,}[/:]", text.replace("https://.../", "")), path.name
    setuptools = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]
    assert "server.http.static.playground" in setuptools["packages"]
    globs = setuptools["package-data"]["server.http.static.playground"]
    for path in files:
        assert any(fnmatch(path.name, glob) for glob in globs), f"{path.name} would not be in the wheel"


def _with_imports(names: list[str]) -> set[str]:
    """``names`` and every module they import (``from "./x.js"``), transitively."""
    seen: set[str] = set()
    todo = list(names)
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        if name.endswith(".js"):
            source = (STATIC / name.rsplit("/", 1)[1]).read_text()
            todo += [f"/ui/static/{module}" for module in re.findall(r'from "\./([\w.-]+\.js)"', source)]
    return seen
