"""``/docs`` (Swagger UI) and ``/redoc`` that work without internet.

FastAPI's own pages load Swagger UI and ReDoc from a CDN, so they are blank on a host that cannot reach it.
Here their JavaScript, CSS and favicon are the copies the ``fastapi-offline`` package ships (Swagger UI 5,
Apache-2.0; ReDoc 2, MIT), served by this server under ``/docs/static/``; the pages name no other host.
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI
from fastapi_offline import FastAPIOffline

DOCS_ASSETS = "/docs/static"
# Swagger UI's default validator badge sends the document's URL to validator.swagger.io.
SWAGGER_UI_PARAMETERS = {"validatorUrl": None}


def offline_docs_app(**kwargs: Any) -> FastAPI:
    """``FastAPI(**kwargs)`` whose ``/docs`` and ``/redoc`` load their assets from this server only."""
    return FastAPIOffline(static_url=DOCS_ASSETS, swagger_ui_parameters=SWAGGER_UI_PARAMETERS, **kwargs)
