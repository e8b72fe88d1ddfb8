"""Checking aimesh notify webhooks in the app that receives them.

Written by hand (not generated), standard library only. A delivery is a POST
whose `aimesh-signature` header holds one `v1=<hex>` per live secret of the
subscription (two while a secret rotation's grace period runs): HMAC-SHA256,
keyed with the secret, over "{aimesh-timestamp}.{raw body}".

    from aimesh.webhooks import WebhookError, verify

    try:
        delivery = verify(body, request.headers, secrets=[os.environ["HOOK_SECRET"]])
    except WebhookError:
        return 401
    if seen(delivery.delivery_id):  # delivery is at least once: dedupe on the id
        return 200

Check the raw bytes as received, before any JSON parsing. The timestamp check
stops a captured request from being replayed later. The id headers are not
signed: deduping on them catches notify's own redeliveries, not a captured
request replayed within the window under another id; use https.
"""

from __future__ import annotations

import hashlib
import hmac
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

SIGNATURE_VERSION = "v1"
DEFAULT_TOLERANCE_S = 300.0


class WebhookError(ValueError):
    """The request is not a delivery signed with one of the given secrets, now."""


@dataclass(frozen=True)
class Delivery:
    delivery_id: str  # the same on every attempt of one delivery: dedupe on it
    event_id: str
    topic: str
    attempt: int
    timestamp: int  # seconds since the epoch, when this attempt was signed


def verify(
    body: bytes,
    headers: Mapping[str, str],
    secrets: str | Iterable[str],
    *,
    tolerance_s: float = DEFAULT_TOLERANCE_S,
    now: float | None = None,
) -> Delivery:
    """The delivery, if one of `secrets` signed `body` within `tolerance_s` of
    `now`; WebhookError otherwise. Header names are matched in any case."""
    lowered = {name.lower(): value for name, value in headers.items()}
    raw_timestamp = lowered.get("aimesh-timestamp", "").strip()
    if not raw_timestamp.isdigit():
        raise WebhookError("no aimesh-timestamp header, or not a whole number of seconds")
    timestamp = int(raw_timestamp)
    current = time.time() if now is None else now
    if abs(current - timestamp) > tolerance_s:
        raise WebhookError(
            f"signed {current - timestamp:+.0f} s from now, beyond the {tolerance_s:g} s allowed"
        )
    sent = [
        part.strip()[len(SIGNATURE_VERSION) + 1 :]
        for part in lowered.get("aimesh-signature", "").split(",")
        if part.strip().startswith(SIGNATURE_VERSION + "=")
    ]
    if not sent:
        raise WebhookError("no v1 signature in the aimesh-signature header")
    keys = [secrets] if isinstance(secrets, str) else list(secrets)
    if not keys:
        raise WebhookError("no secret to check the signature with")
    message = raw_timestamp.encode() + b"." + body
    expected = [hmac.new(key.encode(), message, hashlib.sha256).hexdigest() for key in keys]
    # Every pair is compared, in constant time each, so timing tells nothing.
    matched = False
    for mine in expected:
        for theirs in sent:
            matched |= hmac.compare_digest(mine, theirs)
    if not matched:
        raise WebhookError("no signature matches the secrets given")
    try:
        attempt = int(lowered.get("aimesh-attempt", "1"))
    except ValueError:
        attempt = 0
    return Delivery(
        lowered.get("aimesh-delivery", ""),
        lowered.get("aimesh-event-id", ""),
        lowered.get("aimesh-topic", ""),
        attempt,
        timestamp,
    )
