"""The browser playground (``GET /``) and the operations page (``GET /ui/status``).

Plain HTML, CSS and JavaScript modules shipped in the package (``static/playground``), served under
``/ui/static/``; no build step and no other host. The pages call the same public routes as every client
(``/openapi.json`` for the apps and their fields, the queue, the status stream, ``/health/ready``,
``/metrics``, ``/queue/requests``); ``/ui/config.json`` adds what the schema cannot say: this server's limits
and whether it needs a key. Their Content-Security-Policy lets the browser reach this server only.
"""

from __future__ import annotations

from importlib.resources import files
from typing import Any
from urllib.parse import urlsplit

from fastapi import FastAPI
from fastapi.responses import HTMLResponse, JSONResponse
from fastapi.staticfiles import StaticFiles

from ..settings import Settings

ASSETS = "/ui/static"
ASSETS_DIR = files("server.http") / "static" / "playground"
PAGES = {"/": "index.html", "/ui/status": "status.html"}


def content_security_policy(public_url: str | None) -> str:
    """Everything from this origin only (and the public URL's, where result files are served when it differs);
    images and fetches of ``data:`` and ``blob:`` URLs (inline results, the browser's own history)."""
    origin = ""
    if public_url:
        parts = urlsplit(public_url)
        origin = f" {parts.scheme}://{parts.netloc}"
    return (
        "default-src 'self'; script-src 'self'; style-src 'self'; "
        f"img-src 'self' data: blob:{origin}; connect-src 'self' data: blob:{origin}; "
        "object-src 'none'; base-uri 'none'; form-action 'none'; frame-ancestors 'self'"
    )


def page_config(settings: Settings) -> dict[str, Any]:
    """What the pages need to know that ``/openapi.json`` does not say."""
    return {
        "auth_required": bool(settings.api_keys),
        "limits": {
            "max_num_images": settings.max_num_images,
            "max_output_pixels": settings.max_output_pixels,
            "input_max_bytes": settings.input_max_bytes,
            "max_body_bytes": settings.max_body_bytes,
        },
    }


def add_playground(app: FastAPI, settings: Settings) -> None:
    """Serve the two pages, their files and their config on ``app`` (before any catch-all route)."""
    app.mount(ASSETS, StaticFiles(directory=str(ASSETS_DIR)), name="playground-assets")
    headers = {
        "Content-Security-Policy": content_security_policy(settings.public_url),
        "Cache-Control": "no-cache",
        "X-Content-Type-Options": "nosniff",
    }
    for path, name in PAGES.items():
        html = (ASSETS_DIR / name).read_text(encoding="utf-8")
        app.add_api_route(path, _page(html, headers), methods=["GET"], include_in_schema=False)

    @app.get("/ui/config.json", include_in_schema=False)
    async def config() -> JSONResponse:
        return JSONResponse(page_config(settings), headers={"Cache-Control": "no-cache"})


def _page(html: str, headers: dict[str, str]):
    async def page() -> HTMLResponse:
        return HTMLResponse(html, headers=headers)

    return page
