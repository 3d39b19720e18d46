"""Who is calling: an API key (``Authorization: Key <key>``, compared in constant time) or a temporary token
the key minted (``Authorization: Bearer <token>``, or ``?fal_jwt_token=<token>`` as the JS client sends it on
status streams). A request belongs to the key, whichever of the two it came with."""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Callable
from dataclasses import dataclass

from starlette.requests import Request

from .access_tokens import TOKEN_QUERY, AccessTokens, Grant
from .errors import Forbidden, Unauthorized


class KeyAuth:
    def __init__(self, keys: list[str]) -> None:
        self._keys = [k.encode() for k in keys]
        self.owners = frozenset(owner_id(k) for k in self._keys)

    @property
    def enabled(self) -> bool:
        return bool(self._keys)

    def owner(self, authorization: str | None) -> str:
        """The owner id of the key in ``authorization`` ('' when auth is off); raises :class:`Unauthorized`."""
        if not self._keys:
            return ""
        scheme, _, key = (authorization or "").strip().partition(" ")
        if scheme.lower() != "key" or not key.strip():
            raise Unauthorized()
        try:
            given = key.strip().encode("latin-1")
        except UnicodeEncodeError:
            raise Unauthorized("invalid API key") from None
        matched = False
        for candidate in self._keys:  # no early exit: the time taken does not depend on which key matched
            matched |= hmac.compare_digest(candidate, given)
        if not matched:
            raise Unauthorized("invalid API key")
        return owner_id(given)


def owner_id(key: bytes) -> str:
    """A stable id for a key that does not reveal it (stored with each job)."""
    return hashlib.sha256(b"inpaint-server owner:" + key).hexdigest()[:24]


@dataclass(frozen=True)
class Caller:
    """The owner a request acts for; ``grant`` is set when it came with a temporary token (limited apps)."""

    owner: str
    grant: Grant | None = None

    def check_app(self, app_id: str) -> None:
        """403 unless this caller may use ``app_id``."""
        if self.grant is not None and not self.grant.allows(app_id):
            raise Forbidden(f"this token is for {self.grant.describe()} only, not {app_id}")

    def check_endpoint(self, endpoint: str) -> None:
        """403 unless this caller may use some app under ``endpoint`` (``owner/alias``)."""
        if self.grant is not None and not self.grant.allows_endpoint(endpoint):
            raise Forbidden(f"this token is for {self.grant.describe()} only, not {endpoint}")


class Auth:
    """Keys and temporary tokens. With no keys configured every request is accepted (tokens are not needed)."""

    def __init__(self, keys: KeyAuth, tokens: AccessTokens, clock: Callable[[], float]) -> None:
        self.keys = keys
        self.tokens = tokens
        self.clock = clock

    @property
    def enabled(self) -> bool:
        return self.keys.enabled

    def caller(self, request: Request) -> Caller:
        """Who sent ``request``; raises :class:`Unauthorized` (401) for a missing, wrong or expired credential."""
        if not self.keys.enabled:
            return Caller("")
        authorization = request.headers.get("authorization")
        if authorization is None and TOKEN_QUERY in request.query_params:
            return self._token_caller(request.query_params[TOKEN_QUERY])
        scheme, _, value = (authorization or "").strip().partition(" ")
        if scheme.lower() == "bearer":
            return self._token_caller(value)
        return Caller(self.keys.owner(authorization))

    def _token_caller(self, token: str) -> Caller:
        grant = self.tokens.verify(token, self.clock())
        if grant.owner not in self.keys.owners:
            raise Unauthorized("the API key that minted this token is no longer accepted by this server")
        return Caller(grant.owner, grant)
