"""Webhook signing (fal-protocol §7): the Ed25519 key file, the signed message, JWKS, verification,
fal's webhook body and the retry schedule."""

from __future__ import annotations

import base64
import hashlib
import json
import stat
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ec import SECP256R1, generate_private_key
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from server.delivery.webhooks import WebhookSender, WebhookSigner, verify_signature, webhook_body
from server.metrics import Metrics

BODY = b'{"request_id": "r1", "status": "OK", "payload": {"images": []}}'


def test_key_file_is_created_private_and_reused(tmp_path: Path) -> None:
    key_file = tmp_path / "keys" / "webhook.pem"
    first = WebhookSigner.from_file(key_file)
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
    second = WebhookSigner.from_file(key_file)
    assert second.jwks() == first.jwks() and second.kid == first.kid
    assert WebhookSigner.from_file(tmp_path / "other.pem").jwks() != first.jwks()


def test_jwks_is_the_raw_public_key(tmp_path: Path) -> None:
    signer = WebhookSigner.from_file(tmp_path / "k.pem")
    [jwk] = signer.jwks()["keys"]
    assert jwk | {"x": None} == {
        "kty": "OKP",
        "crv": "Ed25519",
        "x": None,
        "kid": signer.kid,
        "use": "sig",
        "alg": "EdDSA",
    }
    raw = base64.urlsafe_b64decode(jwk["x"] + "=" * (-len(jwk["x"]) % 4))
    assert raw == signer.public_raw and len(raw) == 32 and "=" not in jwk["x"]


def test_signature_covers_request_user_timestamp_and_body_hash(tmp_path: Path) -> None:
    signer = WebhookSigner.from_file(tmp_path / "k.pem")
    headers = signer.headers("r1", "user-9", 1_700_000_000, BODY)
    assert headers["X-Fal-Webhook-Request-Id"] == "r1"
    assert headers["X-Fal-Webhook-User-Id"] == "user-9"
    assert headers["X-Fal-Webhook-Timestamp"] == "1700000000"
    message = f"r1\nuser-9\n1700000000\n{hashlib.sha256(BODY).hexdigest()}".encode()
    # Checked with the bare public key, independently of verify_signature.
    Ed25519PublicKey.from_public_bytes(signer.public_raw).verify(
        bytes.fromhex(headers["X-Fal-Webhook-Signature"]), message
    )


@pytest.mark.parametrize(
    ("header", "value"),
    [
        ("X-Fal-Webhook-Request-Id", "r2"),
        ("X-Fal-Webhook-User-Id", "user-8"),
        ("X-Fal-Webhook-Timestamp", "1700000001"),
    ],
)
def test_verification_fails_when_a_signed_header_changes(tmp_path: Path, header: str, value: str) -> None:
    signer = WebhookSigner.from_file(tmp_path / "k.pem")
    headers = signer.headers("r1", "user-9", 1_700_000_000, BODY)
    assert verify_signature(signer.jwks(), headers, BODY)
    assert not verify_signature(signer.jwks(), headers | {header: value}, BODY)


def test_verification_fails_for_another_body_or_key_and_reads_any_header_case(tmp_path: Path) -> None:
    signer = WebhookSigner.from_file(tmp_path / "k.pem")
    other = WebhookSigner.from_file(tmp_path / "other.pem")
    headers = signer.headers("r1", "user-9", 1_700_000_000, BODY)
    assert not verify_signature(signer.jwks(), headers, BODY + b" ")
    assert not verify_signature(other.jwks(), headers, BODY)
    assert verify_signature({"keys": other.jwks()["keys"] + signer.jwks()["keys"]}, headers, BODY)  # key rotation
    lower = {k.lower(): v for k, v in headers.items()}
    assert verify_signature(signer.jwks(), lower, BODY)


def test_a_key_file_that_is_not_ed25519_is_refused(tmp_path: Path) -> None:
    pem = generate_private_key(SECP256R1()).private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    key_file = tmp_path / "ec.pem"
    key_file.write_bytes(pem)
    with pytest.raises(ValueError, match="not an Ed25519 private key"):
        WebhookSigner.from_file(key_file)


def test_webhook_body_matches_fal() -> None:
    ok = json.loads(webhook_body("r1", True, {"images": [{"url": "u"}], "seed": 1}, 200))
    assert ok == {
        "request_id": "r1",
        "gateway_request_id": "r1",
        "status": "OK",
        "payload": {"images": [{"url": "u"}], "seed": 1},
    }
    detail = {"detail": [{"loc": ["body", "image_url"], "msg": "bad", "type": "value_error"}]}
    error = json.loads(webhook_body("r2", False, detail, 422))
    assert error == {
        "request_id": "r2",
        "gateway_request_id": "r2",
        "status": "ERROR",
        "error": "Invalid status code: 422",
        "payload": detail,
    }
    broken = json.loads(webhook_body("r3", True, {"value": object()}, 200))
    assert broken["payload"] is None and "could not be serialized" in broken["payload_error"]


def test_retry_delays_double_from_the_base_up_to_the_cap(tmp_path: Path) -> None:
    sender = WebhookSender(
        store=None,  # type: ignore[arg-type]  # delay_after needs neither the store nor a loop
        metrics=Metrics(),
        signer=None,
        max_attempts=10,
        retry_base_s=15.0,
        retry_max_s=100.0,
        timeout_s=1.0,
        clock=lambda: 0.0,
    )
    assert [sender.delay_after(n) for n in range(1, 6)] == [15.0, 30.0, 60.0, 100.0, 100.0]
