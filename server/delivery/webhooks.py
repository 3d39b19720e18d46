"""Webhook delivery: a durable outbox in the job store, retried with backoff, optionally signed.

Delivery runs on its own task and never blocks the GPU lane. It connects only to addresses the SSRF
guard (:mod:`server.inputs.url_guard`) allows, checked again at each attempt, and follows no redirects. A webhook
is queued in the same transaction that makes its job terminal, so a restart resumes delivery where it
stopped. Receivers should dedupe on ``request_id`` (a delivery that timed out on our side may still
have arrived).

Signing follows fal's scheme with the server's own Ed25519 key: headers ``X-Fal-Webhook-Request-Id``,
``-User-Id``, ``-Timestamp`` and ``-Signature`` (hex), over
``request_id \\n user_id \\n timestamp \\n sha256_hex(body)``; the public key is served as a JWKS at
``/.well-known/jwks.json``.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import json
import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from ..inputs.url_guard import FetchGuard, GuardedTransport
from ..jobs.store.base import JobStore, StoreUnavailable, WebhookRow
from ..metrics import Metrics

log = logging.getLogger("inpaint-server.webhooks")


def webhook_body(request_id: str, ok: bool, payload: Any, http_status: int) -> bytes:
    """fal's webhook JSON: ``{request_id, gateway_request_id, status, payload, error?, payload_error?}``."""
    body: dict[str, Any] = {
        "request_id": request_id,
        "gateway_request_id": request_id,
        "status": "OK" if ok else "ERROR",
    }
    if not ok:
        body["error"] = f"Invalid status code: {http_status}"
    try:
        body["payload"] = json.loads(json.dumps(payload))
    except (TypeError, ValueError) as exc:
        body["payload"] = None
        body["payload_error"] = f"the payload could not be serialized as JSON: {exc}"
    return json.dumps(body).encode()


class WebhookSigner:
    """An Ed25519 key: from a PEM file (``webhook_key_file``; created on first use, mode 0600) or, by default,
    from the job store, where every API node reads the same one (so any node's JWKS verifies any node's
    deliveries)."""

    def __init__(self, key: Ed25519PrivateKey) -> None:
        self._key = key
        raw = key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
        self.public_raw = raw
        self.kid = hashlib.sha256(raw).hexdigest()[:16]

    @classmethod
    def from_pem(cls, pem: bytes, where: str = "the key") -> WebhookSigner:
        key = serialization.load_pem_private_key(pem, password=None)
        if not isinstance(key, Ed25519PrivateKey):
            raise ValueError(f"{where} is not an Ed25519 private key")
        return cls(key)

    @classmethod
    def from_file(cls, key_file: Path) -> WebhookSigner:
        if key_file.is_file():
            return cls.from_pem(key_file.read_bytes(), str(key_file))
        pem = new_key_pem()
        key_file.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(key_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as fh:
            fh.write(pem)
        return cls.from_pem(pem)

    def headers(self, request_id: str, user_id: str, timestamp: int, body: bytes) -> dict[str, str]:
        message = "\n".join([request_id, user_id, str(timestamp), hashlib.sha256(body).hexdigest()]).encode()
        return {
            "X-Fal-Webhook-Request-Id": request_id,
            "X-Fal-Webhook-User-Id": user_id,
            "X-Fal-Webhook-Timestamp": str(timestamp),
            "X-Fal-Webhook-Signature": self._key.sign(message).hex(),
        }

    def jwks(self) -> dict[str, Any]:
        x = base64.urlsafe_b64encode(self.public_raw).rstrip(b"=").decode()
        return {"keys": [{"kty": "OKP", "crv": "Ed25519", "x": x, "kid": self.kid, "use": "sig", "alg": "EdDSA"}]}


def new_key_pem() -> bytes:
    """A new Ed25519 private key, as PEM (PKCS#8, unencrypted)."""
    key = Ed25519PrivateKey.generate()
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def verify_signature(jwks: dict[str, Any], headers: dict[str, str], body: bytes) -> bool:
    """Check a delivery the way a receiver would (used by tests and documented for receivers)."""
    lower = {k.lower(): v for k, v in headers.items()}
    message = "\n".join(
        [
            lower["x-fal-webhook-request-id"],
            lower["x-fal-webhook-user-id"],
            lower["x-fal-webhook-timestamp"],
            hashlib.sha256(body).hexdigest(),
        ]
    ).encode()
    signature = bytes.fromhex(lower["x-fal-webhook-signature"])
    for jwk in jwks["keys"]:
        raw = base64.urlsafe_b64decode(jwk["x"] + "=" * (-len(jwk["x"]) % 4))
        try:
            Ed25519PublicKey.from_public_bytes(raw).verify(signature, message)
            return True
        except Exception:
            continue
    return False


class WebhookSender:
    """Delivers due outbox rows; at most ``concurrency`` deliveries at once."""

    def __init__(
        self,
        store: JobStore,
        metrics: Metrics,
        signer: WebhookSigner | None,
        max_attempts: int,
        retry_base_s: float,
        retry_max_s: float,
        timeout_s: float,
        clock: Callable[[], float],
        concurrency: int = 8,
        transport: httpx.AsyncBaseTransport | None = None,
        guard: FetchGuard | None = None,
        claimant: str | None = None,
    ) -> None:
        self.store = store
        # This node's id: an outbox row is claimed by one API node at a time, so each outcome is delivered once
        # however many nodes run; a claim outlives one attempt (the timeout) and lapses if the node dies.
        self.claimant = claimant
        self.claim_s = max(60.0, 4 * timeout_s)
        self.metrics = metrics
        self.signer = signer
        self.max_attempts = max_attempts
        self.retry_base_s = retry_base_s
        self.retry_max_s = retry_max_s
        self.clock = clock
        # Every connection goes through the SSRF guard (``transport`` replaces it in tests only).
        self._client = httpx.AsyncClient(
            timeout=httpx.Timeout(timeout_s),
            follow_redirects=False,
            trust_env=False,
            transport=transport or GuardedTransport(guard or FetchGuard()),
        )
        self._wake = asyncio.Event()
        self._slots = asyncio.Semaphore(concurrency)
        self._inflight: dict[str, asyncio.Task] = {}
        self._task: asyncio.Task | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    def delay_after(self, attempts: int) -> float:
        """Seconds to wait after ``attempts`` failed attempts: base, 2x base, ... capped at the max."""
        return min(self.retry_base_s * 2 ** (attempts - 1), self.retry_max_s)

    def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._task = asyncio.create_task(self._run(), name="webhook-sender")

    async def stop(self) -> None:
        tasks = [t for t in (self._task, *self._inflight.values()) if t is not None]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await self._client.aclose()

    def wake(self) -> None:
        self._wake.set()

    def wake_threadsafe(self) -> None:
        """:meth:`wake` from any thread (the store's change listener: another node may have queued a webhook)."""
        loop = self._loop
        if loop is not None and not loop.is_closed():
            loop.call_soon_threadsafe(self._wake.set)

    async def _run(self) -> None:
        while True:
            try:
                for row in self.store.webhooks_due(self.clock(), claimant=self.claimant, lease_s=self.claim_s):
                    if row.request_id not in self._inflight:
                        self._inflight[row.request_id] = asyncio.create_task(self._deliver(row))
                nxt = self.store.next_webhook_at()
            except StoreUnavailable as exc:  # down, or its disk full: due webhooks wait for it
                log.warning("webhook outbox scan waits for the job store: %s", exc)
                nxt = None
            except Exception:  # keep delivering after a transient store error
                log.exception("webhook outbox scan failed")
                nxt = None
            wait = 1.0 if nxt is None else min(max(nxt - self.clock(), 0.01), 1.0)
            self._wake.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), timeout=wait)

    async def _deliver(self, row: WebhookRow) -> None:
        attempt = row.attempts + 1
        try:
            async with self._slots:
                headers = {"Content-Type": "application/json", "User-Agent": "inpaint-server-webhook"}
                if self.signer is not None:
                    headers |= self.signer.headers(
                        row.request_id, row.owner or "anonymous", int(self.clock()), row.body
                    )
                error: str | None = None
                try:
                    response = await self._client.post(row.url, content=row.body, headers=headers)
                    if not 200 <= response.status_code < 300:
                        error = f"HTTP {response.status_code}"
                except Exception as exc:  # any failure is a failed attempt (bad URL too), never a tight retry loop
                    error = f"{type(exc).__name__}: {exc}"
            if error is None:
                self.store.webhook_attempted(row.request_id, attempt, "delivered", self.clock(), None)
                self.metrics.webhooks.labels("delivered").inc()
                log.info("request %s webhook delivered (attempt %d)", row.request_id, attempt)
            elif attempt >= self.max_attempts:
                self.store.webhook_attempted(row.request_id, attempt, "failed", self.clock(), error)
                self.metrics.webhooks.labels("given_up").inc()
                log.warning("request %s webhook given up after %d attempts: %s", row.request_id, attempt, error)
            else:
                delay = self.delay_after(attempt)
                self.store.webhook_attempted(row.request_id, attempt, "pending", self.clock() + delay, error)
                self.metrics.webhooks.labels("retry").inc()
                log.info(
                    "request %s webhook attempt %d failed (%s); retry in %.0f s", row.request_id, attempt, error, delay
                )
        finally:
            self._inflight.pop(row.request_id, None)
            self._wake.set()
