"""``/docs`` and ``/redoc`` work without internet: every file their pages load comes from this server."""

from __future__ import annotations

import re
from html.parser import HTMLParser
from pathlib import Path

import httpx
from fastapi.testclient import TestClient

from server.settings import load_settings
from server.worker_app import create_worker_app

# What each asset must be served as, by its extension (Python's mimetypes says text/ or application/javascript).
ASSET_TYPES = {
    ".js": ("text/javascript", "application/javascript"),
    ".css": ("text/css",),
    ".png": ("image/png",),
    ".json": ("application/json",),
}
# A marker of the real file, not an error page: Swagger UI's and ReDoc's globals, CSS, a PNG's magic number.
ASSET_MARKERS = {
    "swagger-ui-bundle.js": b"SwaggerUIBundle",
    "redoc.standalone.js": b"Redoc",
    "swagger-ui.css": b".swagger-ui",
    "favicon.png": b"\x89PNG",
    "openapi.json": b'"openapi"',
}


class _References(HTMLParser):
    """Every URL a page's tags name (``src``, ``href``, ReDoc's ``spec-url``)."""

    def __init__(self) -> None:
        super().__init__()
        self.urls: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.urls += [value for name, value in attrs if name in ("src", "href", "spec-url") and value]


def page_references(page: str) -> list[str]:
    """The URLs a docs page makes the browser load: its tags' and the document its inline script gives Swagger UI."""
    parser = _References()
    parser.feed(page)
    return parser.urls + re.findall(r"url: '([^']*)'", page)


def check_offline_page(client: httpx.Client, path: str, expected: set[str]) -> None:
    """``path`` is an HTML page whose every reference is a path on this server, served with the right type."""
    page = client.get(path)
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html"), page.text
    assert "://" not in page.text and "fonts.googleapis" not in page.text, page.text  # no other host, at all
    # ... and the browser may load nothing from one: ReDoc's bundle would fetch its logo from its CDN.
    policy = dict(d.strip().split(" ", 1) for d in page.headers["content-security-policy"].split(";"))
    assert policy["default-src"] == "'self'" and policy["img-src"] == "'self' data:", policy
    assert all("'self'" in sources and "http" not in sources for sources in policy.values()), policy
    urls = page_references(page.text)
    assert {url.rsplit("/", 1)[1] for url in urls} >= expected, urls
    for url in urls:
        assert url.startswith("/") and not url.startswith("//"), url
        asset = client.get(url)
        extension = Path(url).suffix
        assert asset.status_code == 200, (url, asset.status_code)
        assert asset.headers["content-type"].split(";")[0] in ASSET_TYPES[extension], (url, asset.headers)
        assert ASSET_MARKERS[url.rsplit("/", 1)[1]] in asset.content[:200_000], url


def test_docs_and_redoc_load_only_this_servers_files(make_server) -> None:
    server = make_server(api_keys=["secret"])  # docs and their files need no key, like /openapi.json
    with httpx.Client(base_url=server.url, timeout=30) as client:
        check_offline_page(client, "/docs", {"swagger-ui-bundle.js", "swagger-ui.css", "favicon.png", "openapi.json"})
        assert '"validatorUrl": null' in client.get("/docs").text  # Swagger UI's badge would call swagger.io
        check_offline_page(client, "/redoc", {"redoc.standalone.js", "favicon.png", "openapi.json"})
        # The queue host serves them as they are, not as queue paths.
        queue_host = {"host": f"queue.localhost:{server.port}"}
        assert client.get("/redoc", headers=queue_host).status_code == 200
        assert client.get("/docs/static/swagger-ui.css", headers=queue_host).status_code == 200
        assert client.get("/docs/static/no-such-file.js").status_code == 404


def test_worker_docs_are_offline_too(engine, tmp_path: Path) -> None:
    app = create_worker_app(load_settings({"data_dir": tmp_path / "data", "warmup": False}), engine=engine)
    client = TestClient(app)  # no lifespan: the routes alone, no GPU lane started
    check_offline_page(client, "/docs", {"swagger-ui-bundle.js", "swagger-ui.css", "favicon.png", "openapi.json"})
