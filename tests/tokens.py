"""A test signing key and the JWKS and tokens made with it."""

from __future__ import annotations

import base64
import time
from collections.abc import Mapping
from typing import Any

import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

ISSUER, AUDIENCE, KID = "aimesh-user", "aimesh", "test-kid"
SIGNING_KEY = Ed25519PrivateKey.generate()
PUBLIC_RAW = SIGNING_KEY.public_key().public_bytes(
    serialization.Encoding.Raw, serialization.PublicFormat.Raw
)


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


async def jwks() -> Mapping[str, Any]:
    key = {
        "kty": "OKP",
        "crv": "Ed25519",
        "x": b64(PUBLIC_RAW),
        "kid": KID,
        "alg": "EdDSA",
        "use": "sig",
    }
    return {"keys": [key]}


def claims(**changes: Any) -> dict[str, Any]:
    now = int(time.time())
    base = {
        "iss": ISSUER,
        "aud": AUDIENCE,
        "sub": "u1",
        "iat": now,
        "nbf": now,
        "exp": now + 300,
        "scope": "user.read",
    }
    base.update(changes)
    return base


def signed(payload: dict[str, Any], **header: Any) -> str:
    headers = {"kid": KID, "typ": "at+jwt", **header}
    return jwt.encode(payload, SIGNING_KEY, algorithm="EdDSA", headers=headers)
