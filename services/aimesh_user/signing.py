"""JWT signing keys: Ed25519, sealed at rest, rotated with overlap.

The signing key is stored AES-256-GCM sealed under the key-encryption key from
the environment, with the kid as associated data so a sealed key cannot be
swapped under another kid. Each row names the KEK that sealed it (a public
key id), so the KEK rotates as notify's sealing key does: the old KEK moves to
AIMESH_USER_PREVIOUS_KEY_ENCRYPTION_KEYS, every start reseals under the current
KEK what an older one sealed, and a start refuses while a live signing key is
sealed under a KEK it does not hold. A rotated-in key is published first and signs only
after the publish lead, so caches of the JWKS (Envoy's, other replicas') hold
it before any token names it; the previous key stays in the JWKS until every
token it signed has expired.
"""

from __future__ import annotations

import asyncio
import base64
import datetime as dt
import hashlib
import logging
import os
import time
import uuid
from collections.abc import Mapping, Sequence
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
KEK_VARIABLE = "AIMESH_USER_KEY_ENCRYPTION_KEY"
PREVIOUS_KEK_VARIABLE = "AIMESH_USER_PREVIOUS_KEY_ENCRYPTION_KEYS"
ROTATION_LEEWAY_S = 60  # clock skew allowance on top of the token lifetime


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def key_id(kek: bytes) -> str:
    """A short public name for a KEK: 8 base64url characters of its SHA-256."""
    digest = hashlib.sha256(b"aimesh-user kek id\0" + kek).digest()
    return base64.urlsafe_b64encode(digest[:6]).decode()


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


class KeyRing:
    """The live signing keys, loaded from the store and refreshed on demand."""

    def __init__(
        self,
        store: UserStore,
        kek: bytes,
        previous_keks: Sequence[bytes] = (),
        *,
        issuer: str,
        audience: str,
        access_ttl_s: int,
        rotation_s: int,
        publish_lead_s: int = 0,
    ) -> None:
        self._store = store
        self.kek_id = key_id(kek)
        self._aead = AESGCM(kek)
        self._keks = {self.kek_id: self._aead}  # the current KEK first
        for old in previous_keks:
            self._keks.setdefault(key_id(old), AESGCM(old))
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

    def _unseal(self, row: SigningKeyRow) -> Ed25519PrivateKey:
        if row.kek_id is not None and row.kek_id not in self._keks:
            raise ConfigError(
                f"signing key {row.kid} is sealed under key {row.kek_id}, which is neither "
                f"{KEK_VARIABLE} nor one of {PREVIOUS_KEK_VARIABLE}; put that key back in "
                f"{PREVIOUS_KEK_VARIABLE}"
            )
        # Sealed before key ids: try each KEK held.
        candidates = [self._keks[row.kek_id]] if row.kek_id else list(self._keks.values())
        sealed = row.private_key_sealed
        for aead in candidates:
            try:
                raw = aead.decrypt(sealed[:NONCE_BYTES], sealed[NONCE_BYTES:], row.kid.encode())
            except InvalidTag:
                continue
            return Ed25519PrivateKey.from_private_bytes(raw)
        raise ConfigError(
            f"{KEK_VARIABLE} does not open the signing keys stored in the database; it must "
            f"stay the key they were sealed with (to rotate it, move the old key to "
            f"{PREVIOUS_KEK_VARIABLE})"
        )

    async def reseal_at_rest(self) -> int:
        """Reseal under the current KEK every live signing key an older KEK (or none
        named) sealed; a ConfigError if one needs a KEK not held. Returns how many
        rows were rewritten. Idempotent, and safe with replicas starting together."""
        resealed = 0
        for row in await self._store.live_signing_keys():
            if row.kek_id == self.kek_id:
                continue
            key = self._unseal(row)
            if await self._store.reseal_signing_key(
                row.kid, row.private_key_sealed, self._seal(row.kid, key), self.kek_id
            ):
                resealed += 1
        if resealed:
            log.info("resealed %d signing keys under key %s", resealed, self.kek_id)
        return resealed

    def _new_row(self, activate_time: dt.datetime) -> SigningKeyRow:
        kid = uuid.uuid4().hex
        key = Ed25519PrivateKey.generate()
        public = key.public_key().public_bytes(
            serialization.Encoding.Raw, serialization.PublicFormat.Raw
        )
        now = dt.datetime.now(dt.UTC)
        return SigningKeyRow(
            kid, self._seal(kid, key), public, now, None, activate_time, self.kek_id
        )

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
                row.kid: self._private.get(row.kid) or self._unseal(row) for row in rows
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
