"""Object lifecycle preferences: how long a client wants the files it uploads, or a request's output files, kept.

The fal clients send a JSON object such as ``{"expiration_duration_seconds": 3600, "initial_acl": {...}}``:

* ``X-Fal-Object-Lifecycle-Preference`` on a run or a queue submit (``@fal-ai/client``'s ``storageSettings``;
  Python: ``headers=``) for the request's output files;
* ``X-Fal-Object-Lifecycle`` (JS and Python uploads) and ``X-Fal-Object-Lifecycle-Preference`` (Python, with the
  same value) on the upload routes, for the uploaded file.

Only ``expiration_duration_seconds`` is read: the server keeps files for at most the result retention, so a
preference can shorten that, never lengthen it. 0 or a missing field means the default (the clients send
nothing for ``expires_in="never"``; fal treats 0 as no expiry). ``initial_acl`` is accepted and ignored: every
file URL here is unguessable and needs no key. Anything else is a 400 naming the header.
"""

from __future__ import annotations

import json
import math

from starlette.datastructures import Headers

from .errors import BadRequest

REQUEST_HEADER = "x-fal-object-lifecycle-preference"
UPLOAD_HEADERS = ("x-fal-object-lifecycle", REQUEST_HEADER)
FIELD = "expiration_duration_seconds"
EXAMPLE = '{"expiration_duration_seconds": 3600}'


def requested_lifetime(headers: Headers, names: tuple[str, ...] = (REQUEST_HEADER,)) -> float | None:
    """Seconds the first of the ``names`` headers present asks files to be kept; None for the server's default."""
    for name in names:
        value = headers.get(name)
        if value is not None:
            return _parse(name, value)
    return None


def shorter_than_retention(lifetime_s: float | None, retention_s: float) -> float | None:
    """A lifetime a client asked for, if it is shorter than the retention (a longer one changes nothing)."""
    return lifetime_s if lifetime_s is not None and lifetime_s < retention_s else None


def _parse(name: str, value: str) -> float | None:
    try:
        preference = json.loads(value)
    except ValueError:
        preference = None
    if not isinstance(preference, dict):
        raise BadRequest(f"{_title(name)} must be a JSON object such as {EXAMPLE}, not {value[:80]!r}")
    seconds = preference.get(FIELD)
    if seconds is None:
        return None
    number = isinstance(seconds, int | float) and not isinstance(seconds, bool)
    if not number or (isinstance(seconds, float) and not math.isfinite(seconds)) or seconds < 0:
        raise BadRequest(f"{_title(name)}: {FIELD} must be a number of seconds >= 0, not {json.dumps(seconds)[:80]}")
    return float(min(seconds, 1e18)) or None  # a huge integer is "longer than the retention", not an overflow


def _title(name: str) -> str:
    return "-".join(part.capitalize() for part in name.split("-"))
