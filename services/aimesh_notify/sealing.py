"""Webhook secrets sealed at rest, and rotation of the key that seals them.

Signing needs each secret itself, so a hash will not do: secrets are stored
AES-256-GCM sealed under AIMESH_NOTIFY_SECRET_ENCRYPTION_KEY, each with a fresh
96-bit nonce and the subscription id as associated data, so a sealed secret
copied onto another row does not open. The stored text is "aesgcm2:", the
key's id, ":", then base64url(nonce + ciphertext), in the columns that held
the plaintext. The prefix tells sealed values from plaintext of databases made
before sealing (new_secret() always starts "whsec_"), and a rotation of a
subscription's secret can still move the current secret to previous_secret in
SQL, since both belong to the same row. "aesgcm1:" values, sealed before key
ids, open by trying each key and are rewritten as "aesgcm2:".

The key id (a truncated SHA-256 of the key, domain-separated) names which key
sealed a value without revealing it. That lets the key be rotated:
AIMESH_NOTIFY_PREVIOUS_SECRET_ENCRYPTION_KEYS lists keys that still open, and
every start, and the service's hourly sweep, reseals under the current key
whatever they sealed. A start refuses to run while a live secret is sealed
under a key it does not hold, so dropping an old key too early stops a
rollout instead of leaving webhooks that cannot be signed.

At start every process that reads or writes secrets also checks its keys
against a value sealed by the first one (a wrong key stops the start before
anything is sealed or signed with it, even with no subscription yet).
"""

from __future__ import annotations

import base64
import binascii
import datetime as dt
import hashlib
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass, field

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from aimesh_notify.store import SubscriptionRow, SubscriptionStore
from aimesh_runtime.config import ConfigError

log = logging.getLogger(__name__)

SEALED_V1 = "aesgcm1:"  # before key ids: opened by trying each key
SEALED_V2 = "aesgcm2:"  # + key id + ":" + base64url(nonce + ciphertext)
NONCE_BYTES = 12
SEAL_BATCH = 500
OPENED_KEPT = 4096
# "/" is in no subscription id, so the check value cannot pass for a secret.
KEY_CHECK_ID = "aimesh_notify/key-check"
KEY_CHECK_VALUE = "aimesh notify secret key check"
KEY_VARIABLE = "AIMESH_NOTIFY_SECRET_ENCRYPTION_KEY"
PREVIOUS_VARIABLE = "AIMESH_NOTIFY_PREVIOUS_SECRET_ENCRYPTION_KEYS"


class SealError(ValueError):
    """A stored secret does not open: another key, another row, or damaged."""


class UnknownKey(SealError):
    """A stored secret names a key that is neither current nor previous."""

    def __init__(self, message: str, key_id: str) -> None:
        super().__init__(message)
        self.key_id = key_id


def is_sealed(stored: str) -> bool:
    return stored.startswith((SEALED_V1, SEALED_V2))


def key_id(key: bytes) -> str:
    """A short public name for a key: 8 base64url characters of its SHA-256."""
    digest = hashlib.sha256(b"aimesh-notify sealing key id\0" + key).digest()
    return base64.urlsafe_b64encode(digest[:6]).decode()


class SecretBox:
    def __init__(self, key: bytes, previous: Sequence[bytes] = ()) -> None:
        self.key_id = key_id(key)
        self.prefix = f"{SEALED_V2}{self.key_id}:"  # of every value sealed now
        self._aead = AESGCM(key)
        self._keys = {self.key_id: self._aead}  # the current key first
        for old in previous:
            self._keys.setdefault(key_id(old), AESGCM(old))
        # Opened secrets by (subscription, sealed text): a subscription's deliveries
        # come in runs, and a rotation seals anew, so a stale entry is never hit.
        self._opened: dict[tuple[str, str], str] = {}

    def seal(self, subscription_id: str, secret: str) -> str:
        nonce = os.urandom(NONCE_BYTES)
        sealed = nonce + self._aead.encrypt(nonce, secret.encode(), subscription_id.encode())
        return self.prefix + base64.urlsafe_b64encode(sealed).decode()

    def is_current(self, stored: str) -> bool:
        return stored.startswith(self.prefix)

    def reseal(self, subscription_id: str, stored: str | None) -> str | None:
        """`stored` sealed under the current key: as it is if it already is (or
        absent); plaintext sealed; sealed under a previous key opened and sealed
        anew. SealError if it does not open."""
        if stored is None or self.is_current(stored):
            return stored
        return self.seal(subscription_id, self.open(subscription_id, stored))

    def open(self, subscription_id: str, stored: str) -> str:
        """The secret; plaintext from before sealing passes as it is (start seals it)."""
        if not is_sealed(stored):
            return stored
        opened = self._opened.get((subscription_id, stored))
        if opened is not None:
            return opened
        if stored.startswith(SEALED_V2):
            kid, _, body = stored[len(SEALED_V2) :].partition(":")
            aead = self._keys.get(kid)
            if aead is None:
                raise UnknownKey(
                    f"the webhook secret of subscriptions/{subscription_id} is sealed under key "
                    f"{kid}, which is neither {KEY_VARIABLE} nor one of {PREVIOUS_VARIABLE}",
                    kid,
                )
            candidates = [aead]
        else:
            body = stored[len(SEALED_V1) :]
            candidates = list(self._keys.values())
        secret = self._decrypt(candidates, subscription_id, body)
        if secret is None:
            raise SealError(
                f"the webhook secret of subscriptions/{subscription_id} does not open under "
                f"{KEY_VARIABLE} or {PREVIOUS_VARIABLE}"
            )
        if len(self._opened) >= OPENED_KEPT:
            self._opened.clear()
        self._opened[(subscription_id, stored)] = secret
        return secret

    @staticmethod
    def _decrypt(candidates: list[AESGCM], subscription_id: str, body: str) -> str | None:
        try:
            sealed = base64.urlsafe_b64decode(body)
        except (binascii.Error, ValueError):
            return None
        for aead in candidates:
            try:
                raw = aead.decrypt(
                    sealed[:NONCE_BYTES], sealed[NONCE_BYTES:], subscription_id.encode()
                )
                return raw.decode()
            except (InvalidTag, ValueError):
                continue
        return None


@dataclass
class Sweep:
    """What one pass of seal_at_rest did."""

    resealed: int = 0  # rows written: plaintext sealed, or an older key's value resealed
    # Live secrets (current, or previous within its grace) sealed under a key not held.
    missing_keys: dict[str, list[str]] = field(default_factory=dict)  # key id -> subscriptions
    damaged: list[str] = field(default_factory=list)  # under a held key, yet not opening


async def seal_at_rest(store: SubscriptionStore, box: SecretBox, *, strict: bool) -> Sweep:
    """Check the keys; then seal plaintext secrets, and reseal under the current
    key those an older key sealed. With `strict` (at start), a live secret
    sealed under a key not held is a ConfigError.

    Idempotent and safe with replicas running together: each column is written
    only if it still holds what was read."""
    stored = await store.key_check(box.seal(KEY_CHECK_ID, KEY_CHECK_VALUE))
    try:
        opened = is_sealed(stored) and box.open(KEY_CHECK_ID, stored) == KEY_CHECK_VALUE
    except SealError:
        opened = False
    if not opened:
        raise ConfigError(
            f"{KEY_VARIABLE} does not open the webhook secrets stored in the database; it must "
            f"stay the key they were sealed with (to rotate it, move the old key to "
            f"{PREVIOUS_VARIABLE})"
        )
    sweep = Sweep()
    now = dt.datetime.now(dt.UTC)
    after = ""
    while rows := await store.secrets_not_sealed_under(box.prefix, after, SEAL_BATCH):
        after = rows[-1].id
        updates = [_resealed(box, row, now, sweep) for row in rows]
        changed = [u for u in updates if u[2] != u[1] or u[4] != u[3]]
        if changed:
            sweep.resealed += await store.seal_secrets(changed)
    if not box.is_current(stored):
        await store.replace_key_check(stored, box.seal(KEY_CHECK_ID, KEY_CHECK_VALUE))
    if sweep.resealed:
        log.info("sealed %d webhook secrets under key %s", sweep.resealed, box.key_id)
    for subscription_id in sweep.damaged[:10]:
        log.warning("the webhook secret of subscriptions/%s does not open", subscription_id)
    if sweep.missing_keys:
        kid, ids = next(iter(sweep.missing_keys.items()))
        count = sum(len(ids) for ids in sweep.missing_keys.values())
        message = (
            f"{count} webhook secrets (subscriptions/{ids[0]} among them) are sealed under "
            f"key {kid}, which is neither {KEY_VARIABLE} nor one of {PREVIOUS_VARIABLE}; "
            f"put that key back in {PREVIOUS_VARIABLE}"
        )
        if strict:
            raise ConfigError(message)
        log.error(message)
    return sweep


def _resealed(
    box: SecretBox, row: SubscriptionRow, now: dt.datetime, sweep: Sweep
) -> tuple[str, str | None, str | None, str | None, str | None]:
    """(id, secret, resealed, previous, resealed previous) for seal_secrets; a
    value that does not open stays as it is, and is noted in `sweep`."""
    previous_live = (
        row.previous_secret_expire_time is not None and row.previous_secret_expire_time > now
    )
    values = []
    for stored, live in ((row.secret, True), (row.previous_secret, previous_live)):
        try:
            values.append(box.reseal(row.id, stored))
        except UnknownKey as error:
            values.append(stored)
            if live:
                sweep.missing_keys.setdefault(error.key_id, []).append(row.id)
        except SealError:
            values.append(stored)
            if live:
                sweep.damaged.append(row.id)
    return (row.id, row.secret, values[0], row.previous_secret, values[1])
