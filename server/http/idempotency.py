"""``Idempotency-Key`` on queue submits: a retried submit gets the same ``request_id`` and runs once.

A key belongs to the owner (API key) that sent it and lives as long as the request it created (it is
deleted with it after ``result_retention_s``). It is stored in the job store with the request, in one
transaction, so it survives restarts. The same key with a different request (input, app or webhook)
is refused with 422 ``idempotency_key_reused``: a client bug, not something to retry.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

HEADER = "Idempotency-Key"
REPLAYED_HEADER = "Idempotent-Replayed"
# Printable ASCII without spaces, 1-255 characters (a UUID is the usual choice).
KEY_PATTERN = r"^[!-~]{1,255}$"


def fingerprint(app_id: str, payload: dict[str, Any], webhook_url: str | None) -> str:
    """What makes two submits "the same request": the app, the validated input and the webhook."""
    canonical = json.dumps(
        {"app_id": app_id, "input": payload, "webhook": webhook_url}, sort_keys=True, separators=(",", ":")
    )
    return hashlib.sha256(canonical.encode()).hexdigest()
