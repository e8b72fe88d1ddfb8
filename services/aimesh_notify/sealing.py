"""Webhook secrets sealed at rest.

Signing needs each secret itself, so a hash will not do: secrets are stored
AES-256-GCM sealed under AIMESH_NOTIFY_SECRET_ENCRYPTION_KEY, each with a fresh
96-bit nonce and the subscription id as associated data, so a sealed secret
copied onto another row does not open. The stored text is "aesgcm1:" +
base64url(nonce + ciphertext) in the columns that held the plaintext: the
prefix tells sealed values from those of databases made before sealing
(new_secret() always starts "whsec_"), and a rotation can still move the
current secret to previous_secret in SQL, since both belong to the same row.

At start every process that reads or writes secrets checks its key against a
value sealed by the first one (a wrong key stops the start before anything is
sealed or signed with it), then seals the plaintext it finds; the service
sweeps again hourly, for plaintext that older replicas write during a rollout.
"""

from __future__ import annotations

import base64
import binascii
import logging
import os

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from aimesh_notify.store import SEALED_PREFIX, NotifyStore
from aimesh_runtime.config import ConfigError

log = logging.getLogger(__name__)

NONCE_BYTES = 12
SEAL_BATCH = 500
OPENED_KEPT = 4096
# "/" is in no subscription id, so the check value cannot pass for a secret.
KEY_CHECK_ID = "aimesh_notify/key-check"
KEY_CHECK_VALUE = "aimesh notify secret key check"


class SealError(ValueError):
    """A stored secret does not open: another key, another row, or damaged."""


def is_sealed(stored: str) -> bool:
    return stored.startswith(SEALED_PREFIX)


class SecretBox:
    def __init__(self, key: bytes) -> None:
        self._aead = AESGCM(key)
        # Opened secrets by (subscription, sealed text): a subscription's deliveries
        # come in runs, and a rotation seals anew, so a stale entry is never hit.
        self._opened: dict[tuple[str, str], str] = {}

    def seal(self, subscription_id: str, secret: str) -> str:
        nonce = os.urandom(NONCE_BYTES)
        sealed = nonce + self._aead.encrypt(nonce, secret.encode(), subscription_id.encode())
        return SEALED_PREFIX + base64.urlsafe_b64encode(sealed).decode()

    def seal_plaintext(self, subscription_id: str, stored: str | None) -> str | None:
        """`stored` sealed if it is plaintext; as it is if sealed or absent."""
        if stored is None or is_sealed(stored):
            return stored
        return self.seal(subscription_id, stored)

    def open(self, subscription_id: str, stored: str) -> str:
        """The secret; plaintext from before sealing passes as it is (start seals it)."""
        if not is_sealed(stored):
            return stored
        opened = self._opened.get((subscription_id, stored))
        if opened is not None:
            return opened
        try:
            sealed = base64.urlsafe_b64decode(stored[len(SEALED_PREFIX) :])
            raw = self._aead.decrypt(
                sealed[:NONCE_BYTES], sealed[NONCE_BYTES:], subscription_id.encode()
            )
            secret = raw.decode()
        except (InvalidTag, binascii.Error, ValueError):
            raise SealError(
                f"the webhook secret of subscriptions/{subscription_id} does not open under "
                "AIMESH_NOTIFY_SECRET_ENCRYPTION_KEY"
            ) from None
        if len(self._opened) >= OPENED_KEPT:
            self._opened.clear()
        self._opened[(subscription_id, stored)] = secret
        return secret


async def seal_at_rest(store: NotifyStore, box: SecretBox) -> int:
    """Check the key, then seal legacy plaintext secrets; how many rows were sealed.

    Idempotent and safe with replicas starting together: each row is written
    only if it still holds the plaintext that was read."""
    stored = await store.key_check(box.seal(KEY_CHECK_ID, KEY_CHECK_VALUE))
    try:
        opened = is_sealed(stored) and box.open(KEY_CHECK_ID, stored) == KEY_CHECK_VALUE
    except SealError:
        opened = False
    if not opened:
        raise ConfigError(
            "AIMESH_NOTIFY_SECRET_ENCRYPTION_KEY does not open the webhook secrets stored in "
            "the database; it must stay the key they were sealed with"
        )
    total = 0
    while rows := await store.plaintext_secrets(SEAL_BATCH):
        updates = [
            (
                row.id,
                row.secret,
                box.seal_plaintext(row.id, row.secret),
                row.previous_secret,
                box.seal_plaintext(row.id, row.previous_secret),
            )
            for row in rows
        ]
        sealed = await store.seal_secrets(updates)
        if not sealed:  # every row changed under us; the next sweep takes the rest
            break
        total += sealed
    if total:
        log.info("sealed the plaintext webhook secrets of %d subscriptions", total)
    return total
