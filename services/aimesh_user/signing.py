"""JWT signing keys: Ed25519, sealed at rest, rotated with overlap.

The signing key is stored AES-256-GCM sealed under the key-encryption key from
the environment, with the kid as associated data so a sealed key cannot be
swapped under another kid. After a rotation the previous key stays in the JWKS
until every token it signed has expired.
"""

from __future__ import annotations

import asyncio
import base64
import datetime as dt
import logging
import os
import time
import uuid
from collections.abc import Mapping
from typing import Any

import jwt
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from aimesh_runtime.auth import SIGNING_ALGORITHM, TOKEN_TYPE, jwks_document
from aimesh_runtime.config import ConfigError
from aimesh_user.store import SigningKeyRow, UserStore

log = logging.getLogger(__name__)

NONCE_BYTES = 12
ROTATION_LEEWAY_S = 60  # clock skew allowance on top of the token lifetime


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


class KeyRing:
    """The live signing keys, loaded from the store and refreshed on demand."""

    def __init__(
        self,
        store: UserStore,
        kek: bytes,
        *,
        issuer: str,
        audience: str,
        access_ttl_s: int,
        rotation_s: int,
    ) -> None:
        self._store = store
        self._aead = AESGCM(kek)
        self._issuer = issuer
        self._audience = audience
        self._access_ttl_s = access_ttl_s
        self._rotation_s = rotation_s
        self._rows: list[SigningKeyRow] = []
        self._signing: tuple[str, Ed25519PrivateKey, dt.datetime] | None = None
        self._jwks_json = b'{"keys":[]}'
        self._lock = asyncio.Lock()

    @property
    def access_ttl_s(self) -> int:
        return self._access_ttl_s

    def _seal(self, kid: str, key: Ed25519PrivateKey) -> bytes:
        raw = key.private_bytes(
            serialization.Encoding.Raw,
            serialization.PrivateFormat.Raw,
            serialization.NoEncryption(),
        )
        nonce = os.urandom(NONCE_BYTES)
        return nonce + self._aead.encrypt(nonce, raw, kid.encode())

    def _unseal(self, kid: str, sealed: bytes) -> Ed25519PrivateKey:
        try:
            raw = self._aead.decrypt(sealed[:NONCE_BYTES], sealed[NONCE_BYTES:], kid.encode())
        except InvalidTag:
            raise ConfigError(
                "AIMESH_USER_KEY_ENCRYPTION_KEY does not open the signing keys stored in the "
                "database; it must stay the key they were sealed with"
            ) from None
        return Ed25519PrivateKey.from_private_bytes(raw)

    def _new_row(self) -> SigningKeyRow:
        kid = uuid.uuid4().hex
        key = Ed25519PrivateKey.generate()
        public = key.public_key().public_bytes(
            serialization.Encoding.Raw, serialization.PublicFormat.Raw
        )
        now = dt.datetime.now(dt.UTC)
        return SigningKeyRow(kid, self._seal(kid, key), public, now, None)

    async def load(self) -> None:
        """Read the live keys, creating the first signing key if there is none."""
        async with self._lock:
            rows = await self._store.live_signing_keys()
            if not any(row.retire_time is None for row in rows):
                if await self._store.insert_first_signing_key(self._new_row()):
                    log.info("created the first signing key")
                rows = await self._store.live_signing_keys()
            self._rows = rows
            active = next(row for row in rows if row.retire_time is None)
            if self._signing is None or self._signing[0] != active.kid:
                self._signing = (
                    active.kid,
                    self._unseal(active.kid, active.private_key_sealed),
                    active.create_time,
                )
            self._jwks_json = jwks_document(self.jwks())

    def jwks(self) -> list[dict[str, str]]:
        return [
            {
                "kty": "OKP",
                "crv": "Ed25519",
                "x": _b64url(row.public_key),
                "kid": row.kid,
                "alg": SIGNING_ALGORITHM,
                "use": "sig",
            }
            for row in self._rows
        ]

    def jwks_json(self) -> bytes:
        return self._jwks_json

    async def fetch_jwks(self) -> Mapping[str, Any]:
        """The verifier's key source in this process: reread from the database."""
        await self.load()
        return {"keys": self.jwks()}

    async def rotate(self, actor: str) -> tuple[str, str | None, dt.datetime]:
        retire_at = dt.datetime.now(dt.UTC) + dt.timedelta(
            seconds=self._access_ttl_s + ROTATION_LEEWAY_S
        )
        row = self._new_row()
        previous = await self._store.rotate_signing_key(actor, row, retire_at)
        await self.load()
        return row.kid, previous, retire_at

    async def rotate_if_due(self) -> None:
        await self.load()
        assert self._signing is not None
        age = dt.datetime.now(dt.UTC) - self._signing[2]
        if age.total_seconds() >= self._rotation_s:
            kid, previous, _ = await self.rotate("system")
            log.info("rotated signing key %s -> %s", previous, kid)

    def mint(self, subject: str, scopes: list[str], extra: Mapping[str, Any] | None = None) -> str:
        """Sign an access token for `subject` carrying `scopes`."""
        assert self._signing is not None, "KeyRing.load() must run first"
        kid, key, _ = self._signing
        now = int(time.time())
        claims: dict[str, Any] = {
            "iss": self._issuer,
            "aud": self._audience,
            "sub": subject,
            "iat": now,
            "nbf": now,
            "exp": now + self._access_ttl_s,
            "jti": uuid.uuid4().hex,
            "scope": " ".join(sorted(set(scopes))),
            **(extra or {}),
        }
        return jwt.encode(
            claims, key, algorithm=SIGNING_ALGORITHM, headers={"kid": kid, "typ": TOKEN_TYPE}
        )
