"""API keys: ``Authorization: Key <key>``, compared in constant time; a request belongs to its key."""

from __future__ import annotations

import hashlib
import hmac

from .errors import Unauthorized


class KeyAuth:
    def __init__(self, keys: list[str]) -> None:
        self._keys = [k.encode() for k in keys]

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
