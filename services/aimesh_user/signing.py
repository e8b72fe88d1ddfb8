"""JWT signing keys: Ed25519, sealed at rest, rotated with overlap.

The signing key is stored AES-256-GCM sealed under the key-encryption key from
the environment, with the kid as associated data so a sealed key cannot be
swapped under another kid. A rotated-in key is published first and signs only
after the publish lead, so caches of the JWKS (Envoy's, other replicas') hold
it before any token names it; the previous key stays in the JWKS until every
token it signed has expired.
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


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


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
        publish_lead_s: int = 0,
    ) -> None:
        self._store = store
        self._aead = AESGCM(kek)
        self._issuer = issuer
        self._audience = audience
        self._access_ttl_s = access_ttl_s
        self._rotation_s = rotation_s
        self._publish_lead_s = publish_lead_s
        self._rows: list[SigningKeyRow] = []  # latest activate_time first
        self._private: dict[str, Ed25519PrivateKey] = {}
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

    def _new_row(self, activate_time: dt.datetime) -> SigningKeyRow:
        kid = uuid.uuid4().hex
        key = Ed25519PrivateKey.generate()
        public = key.public_key().public_bytes(
            serialization.Encoding.Raw, serialization.PublicFormat.Raw
        )
        now = dt.datetime.now(dt.UTC)
        return SigningKeyRow(kid, self._seal(kid, key), public, now, None, activate_time)

    async def load(self) -> None:
        """Read the live keys, creating the first signing key if there is none."""
        async with self._lock:
            rows = await self._store.live_signing_keys()
            if not rows:
                if await self._store.insert_first_signing_key(self._new_row(_now())):
                    log.info("created the first signing key")
                rows = await self._store.live_signing_keys()
            self._rows = rows
            self._private = {
                row.kid: self._private.get(row.kid) or self._unseal(row.kid, row.private_key_sealed)
                for row in rows
            }
            self._jwks_json = jwks_document(self.jwks())

    def _signing_row(self) -> SigningKeyRow:
        """The latest key whose activate_time has come; newer ones are only published."""
        now = _now()
        # The oldest key if none has activated yet (clocks of app and database differ).
        return next((row for row in self._rows if row.activate_time <= now), self._rows[-1])

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

    async def rotate(
        self, actor: str, due_before: dt.datetime | None = None
    ) -> tuple[str, str | None, dt.datetime | None, dt.datetime]:
        """Publish a new key now, signing from now + the publish lead; the current
        key signs until then and verifies until its last token has expired.
        Returns (new kid, previous kid, previous retire time, activate time)."""
        row = self._new_row(_now() + dt.timedelta(seconds=self._publish_lead_s))
        previous, retire_at = await self._store.rotate_signing_key(
            actor, row, self._access_ttl_s + ROTATION_LEEWAY_S, due_before
        )
        await self.load()
        return row.kid, previous, retire_at, row.activate_time

    async def rotate_if_due(self) -> None:
        """Rotate when the newest key is older than the rotation period; the store's
        lock makes sure that of several replicas only one rotates."""
        await self.load()
        due_before = _now() - dt.timedelta(seconds=self._rotation_s)
        if self._rows[0].activate_time < due_before:
            kid, previous, _, activate = await self.rotate("system", due_before)
            if previous is not None:
                log.info("rotated signing key %s -> %s from %s", previous, kid, activate)

    def mint(self, subject: str, scopes: list[str], extra: Mapping[str, Any] | None = None) -> str:
        """Sign an access token for `subject` carrying `scopes`."""
        signing = self._signing_row()
        kid, key = signing.kid, self._private[signing.kid]
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
