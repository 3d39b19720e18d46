"""``POST /tokens/``: temporary tokens for browser apps (what ``@fal-ai/client`` asks for with
``connectionMode: "client"`` and for realtime). The body is fal's: ``{"allowed_apps": [...],
"token_expiration": seconds}``; the answer is the token as a JSON string, as fal answers.

An API key mints tokens for any served app. A token may mint tokens too (the JS client does so when a
browser holding only a token streams with ``connectionMode: "client"``), but only for apps it may use
itself and ending no later than itself, so it can never widen or outlive what the key granted.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Annotated

from fastapi import APIRouter, Depends
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field, StringConstraints

from .access_tokens import AccessTokens, Grant, narrow, scope_apps
from .auth import Caller
from .errors import Forbidden
from .openapi_responses import TOKENS

DEFAULT_LIFETIME_S = 120  # what the fal clients ask for
AppName = Annotated[str, StringConstraints(min_length=1, max_length=200)]


def token_model(max_lifetime_s: int) -> type[BaseModel]:
    """The request body, with this server's longest lifetime in its schema."""

    class TokenRequest(BaseModel):
        allowed_apps: list[AppName] = Field(
            min_length=1,
            max_length=32,
            description="Apps the token may use: an alias (hyper-sdxl), owner/alias (fal-ai/hyper-sdxl) or a full "
            "app id (fal-ai/hyper-sdxl/inpainting).",
        )
        token_expiration: int = Field(
            min(DEFAULT_LIFETIME_S, max_lifetime_s),
            ge=1,
            le=max_lifetime_s,
            description=f"Lifetime in seconds, at most {max_lifetime_s} on this server (token_max_lifetime_s).",
        )

    return TokenRequest


def token_router(
    tokens: AccessTokens,
    caller_of: Callable[..., Caller],
    served: list[str],
    max_lifetime_s: int,
    clock: Callable[[], float],
) -> APIRouter:
    router = APIRouter(tags=["tokens"])
    model = token_model(max_lifetime_s)

    async def mint(payload: model, caller: Caller = Depends(caller_of)) -> JSONResponse:  # type: ignore[valid-type]
        now = clock()
        apps = scope_apps(payload.allowed_apps, served)
        expires_at = int(now) + payload.token_expiration
        if caller.grant is not None:
            held = caller.grant
            apps = narrow(apps, held.apps)
            if not apps:
                raise Forbidden(f"this token is for {held.describe()} only; it cannot mint tokens for other apps")
            expires_at = min(expires_at, held.expires_at)
        return JSONResponse(tokens.issue(Grant(caller.owner, apps, expires_at), now))

    mint.__annotations__["payload"] = model  # a string under `from __future__ import annotations`
    for path in ("/tokens/", "/tokens"):
        router.add_api_route(
            path,
            mint,
            methods=["POST"],
            summary="Mint a temporary token for a browser app",
            responses=TOKENS,
            include_in_schema=path == "/tokens/",
        )
    return router
