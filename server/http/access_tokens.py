"""Temporary tokens: short-lived, bound to the API key that minted them and to some apps.

A token is a compact JWT (HS256, by PyJWT) signed with a secret the job store keeps, so every API node accepts
every node's tokens. Its claims: ``sub`` (the owner id of the key), ``apps`` (app-id prefixes such as
``fal-ai/hyper-sdxl`` or ``fal-ai/hyper-sdxl/inpainting``), ``iat`` and ``exp`` (Unix seconds). Nothing
is stored per token: a token lives until ``exp`` or until its key is removed from ``api_keys``.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import jwt

from .errors import Unauthorized, ValidationFailed

TOKEN_QUERY = "fal_jwt_token"  # how the JS client sends a token on a status stream (and realtime)
ALGORITHM = "HS256"  # the only one accepted: a token naming another (``none``, RS256...) is refused
INVALID = "invalid temporary token (malformed, altered or not issued by this server); send 'Authorization: Key <key>'"


def covers(prefix: str, app_id: str) -> bool:
    """Whether the app-id prefix ``prefix`` (whole path segments) includes ``app_id``."""
    return app_id == prefix or app_id.startswith(prefix + "/")


@dataclass(frozen=True)
class Grant:
    """What a valid token allows: the owner it acts for, the apps it may use, until when."""

    owner: str
    apps: tuple[str, ...]
    expires_at: int

    def allows(self, app_id: str) -> bool:
        return any(covers(prefix, app_id) for prefix in self.apps)

    def allows_endpoint(self, endpoint: str) -> bool:
        """Whether some allowed app lives under ``endpoint`` (``owner/alias``, what status URLs carry)."""
        return any(covers(endpoint, prefix) for prefix in self.apps)

    def describe(self) -> str:
        return ", ".join(self.apps)


class AccessTokens:
    """Issues and checks tokens with one secret (the store's ``access-tokens`` key)."""

    def __init__(self, secret: bytes) -> None:
        self._secret = secret

    def issue(self, grant: Grant, now: float) -> str:
        claims = {"sub": grant.owner, "apps": list(grant.apps), "iat": int(now), "exp": grant.expires_at}
        return jwt.encode(claims, self._secret, algorithm=ALGORITHM)

    def verify(self, token: str, now: float) -> Grant:
        """The grant of a token this server signed that has not expired; else :class:`Unauthorized`.

        The expiry is checked against ``now`` (the server's clock), not by PyJWT against the wall clock."""
        try:
            claims = jwt.decode(
                token.strip(),
                self._secret,
                algorithms=[ALGORITHM],
                options={"require": ["sub", "apps", "exp"], "verify_exp": False, "verify_iat": False},
            )
            grant = _grant(claims)
        except (jwt.InvalidTokenError, ValueError, KeyError, TypeError):
            raise Unauthorized(INVALID) from None
        if grant.expires_at <= now:
            when = dt.datetime.fromtimestamp(grant.expires_at, dt.UTC).isoformat()
            raise Unauthorized(f"this temporary token expired at {when}; get a new one from POST /tokens/")
        return grant


def _grant(claims: Any) -> Grant:
    apps = claims["apps"]
    if not isinstance(claims["sub"], str) or not isinstance(apps, list) or not isinstance(claims["exp"], int):
        raise ValueError("bad claims")
    return Grant(claims["sub"], tuple(str(a) for a in apps), claims["exp"])


def scope_apps(requested: Iterable[str], served: list[str]) -> tuple[str, ...]:
    """The app-id prefixes a token for ``requested`` allows, each naming at least one served app.

    An entry is an alias (``hyper-sdxl``, what the fal clients send), ``owner/alias``, a full app id, or a
    route under an app (``fal-ai/hyper-sdxl/inpainting/stream``: the app). Anything else is a 422.
    """
    scopes: set[str] = set()
    for entry in requested:
        name = entry.strip().strip("/")
        matched = [app for app in served if _names(name, app)]
        if not matched:
            raise ValidationFailed("allowed_apps", f"{entry!r} is not an app this server serves ({', '.join(served)})")
        if "/" not in name:
            scopes.update("/".join(app.split("/")[:2]) for app in matched)
        else:
            scopes.update(name if covers(name, app) else app for app in matched)
    return tuple(sorted(scopes))


def _names(entry: str, app_id: str) -> bool:
    if "/" not in entry:
        return app_id.split("/")[1] == entry
    return covers(entry, app_id) or entry.startswith(app_id + "/")


def narrow(requested: tuple[str, ...], held: tuple[str, ...]) -> tuple[str, ...]:
    """What both scopes allow: a token can only mint tokens for apps it may use itself."""
    common = {p for p in requested for q in held if covers(q, p)} | {q for p in requested for q in held if covers(p, q)}
    return tuple(sorted(common))
