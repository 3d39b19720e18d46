"""``inpaint-server health``: ask a running server whether it is live (or ready), from the same host.

This is the container image's ``HEALTHCHECK`` and the README's wait-until-ready loop. It never imports
torch or the engine (it runs every few seconds beside the server), reads the port and scheme from the
same settings the server reads, and says *why* a server is not ready rather than only failing.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import httpx

from .settings import Settings

LIVE = "/health/live"
READY = "/health/ready"


# /health/ready's status when the models could not be loaded: waiting longer cannot help.
FAILED = "failed"


@dataclass(frozen=True)
class Answer:
    ok: bool
    message: str
    final: bool = False  # not ok, and will not become ok without a fix and a restart


def local_url(settings: Settings) -> str:
    """The server's base URL from this host: loopback when it listens on every interface."""
    host = settings.host
    if host in ("0.0.0.0", "", "*"):
        host = "127.0.0.1"
    elif host == "::":
        host = "::1"
    if ":" in host:
        host = f"[{host}]"
    return f"{settings.scheme}://{host}:{settings.port}"


def check(base_url: str, path: str, timeout: float) -> Answer:
    """One GET of ``path``: ok on 200, else the server's reason (its JSON ``status``/``detail``)."""
    # The certificate names the public host, not loopback: this asks the local process, so it does not verify.
    try:
        response = httpx.get(base_url.rstrip("/") + path, timeout=timeout, verify=False)
    except httpx.HTTPError as exc:
        return Answer(False, f"{base_url} does not answer: {type(exc).__name__}: {exc}".rstrip(": "))
    try:
        body = response.json()
    except ValueError:
        body = {}
    if not isinstance(body, dict):
        body = {}
    status = body.get("status", "")
    if response.status_code == 200:
        return Answer(True, response.text.strip())
    detail = body.get("detail") or response.text.strip()[:200]
    return Answer(False, f"{response.status_code} {status}: {detail}".strip(), final=status == FAILED)


def wait(
    base_url: str,
    path: str,
    *,
    timeout: float,
    wait_s: float,
    report: Callable[[str], None],
    interval: float = 1.0,
) -> Answer:
    """Check until ok or ``wait_s`` has passed, reporting each new reason once (not every second); stop at
    once when the server says it cannot become ready (its models failed to load)."""
    deadline = time.monotonic() + wait_s
    last = None
    while True:
        answer = check(base_url, path, timeout)
        if answer.ok or answer.final or time.monotonic() >= deadline:
            return answer
        if answer.message != last:
            report(answer.message)
            last = answer.message
        time.sleep(interval)
