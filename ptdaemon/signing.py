"""Standard Webhooks signatures: secrets, and the headers of a signed request."""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import secrets

from ptdaemon.errors import InvalidError

SECRET_PREFIX = "whsec_"  # noqa: S105 - a prefix, not a secret
MIN_SECRET_BYTES = 24


def generate_secret() -> str:
    return SECRET_PREFIX + base64.b64encode(secrets.token_bytes(32)).decode("ascii")


def secret_bytes(secret: str) -> bytes:
    """Decode a `whsec_` (or bare) base64 secret; raise InvalidError if unusable."""
    text = secret.removeprefix(SECRET_PREFIX)
    try:
        key = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise InvalidError("signing_secret is not base64") from exc
    if len(key) < MIN_SECRET_BYTES:
        raise InvalidError(
            f"signing_secret must decode to at least {MIN_SECRET_BYTES} bytes"
        )
    return key


def sign(secret: str, msg_id: str, timestamp: int, body: bytes) -> str:
    signed = f"{msg_id}.{timestamp}.".encode() + body
    digest = hmac.new(secret_bytes(secret), signed, hashlib.sha256).digest()
    return "v1," + base64.b64encode(digest).decode("ascii")


def signature_headers(
    secrets_in_use: list[str], msg_id: str, timestamp: int, body: bytes
) -> dict[str, str]:
    """The three headers; one signature per secret, space-separated."""
    signatures = " ".join(sign(s, msg_id, timestamp, body) for s in secrets_in_use)
    return {
        "webhook-id": msg_id,
        "webhook-timestamp": str(timestamp),
        "webhook-signature": signatures,
    }
