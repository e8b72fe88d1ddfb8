"""Webhook signatures: HMAC-SHA256 over "{timestamp}.{body}".

The timestamp is signed with the body so a receiver can refuse replays older
than a few minutes. During a secret rotation every live secret signs, and the
header carries one "v1=" signature per secret, so a receiver holding either
secret verifies the delivery.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import secrets
from collections.abc import Iterable

SECRET_PREFIX = "whsec_"
SIGNATURE_VERSION = "v1"


def new_secret() -> str:
    return SECRET_PREFIX + base64.urlsafe_b64encode(secrets.token_bytes(32)).decode().rstrip("=")


def signature(secret: str, timestamp: int, body: bytes) -> str:
    mac = hmac.new(secret.encode(), f"{timestamp}.".encode() + body, hashlib.sha256)
    return f"{SIGNATURE_VERSION}={mac.hexdigest()}"


def signature_header(live_secrets: Iterable[str], timestamp: int, body: bytes) -> str:
    return ",".join(signature(secret, timestamp, body) for secret in live_secrets)


def verify(secret: str, timestamp: int, body: bytes, header: str) -> bool:
    """Whether any signature in `header` was made with `secret` (constant time)."""
    expected = signature(secret, timestamp, body)
    return any(hmac.compare_digest(expected, part.strip()) for part in header.split(","))
