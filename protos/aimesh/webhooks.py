"""Checking aimesh notify webhooks in the app that receives them.

Written by hand (not generated), standard library only. A delivery is a POST
whose `aimesh-signature` header holds, per live secret of the subscription
(two while a secret rotation's grace period runs), HMAC-SHA256 signatures
keyed with the secret:

- `v2=<hex>` over the values of aimesh-timestamp, aimesh-delivery,
  aimesh-event-id and aimesh-topic, each followed by a line feed, then the raw
  body: it binds the headers a receiver acts on, so a captured request cannot
  be replayed under another delivery id or topic. verify() requires it.
- `v3=<hex>` as v2 with the value of aimesh-publisher ("users/{id}", who
  published the event) after the topic. verify() checks it when present and
  then returns the publisher; from v2 alone the publisher is unknown ("").
- `v1=<hex>` over "{aimesh-timestamp}.{raw body}", for receivers written
  before v2; verify() takes it alone only with accept_v1_only=True (deliveries
  from notify releases before v2).

    from aimesh.webhooks import WebhookError, verify

    try:
        delivery = verify(body, request.headers, secrets=[os.environ["HOOK_SECRET"]])
    except WebhookError:
        return 401
    if seen(delivery.delivery_id):  # delivery is at least once: dedupe on the id
        return 200

Check the raw bytes as received, before any JSON parsing. The timestamp check
(5 minutes by default) stops a captured request from being replayed later.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, replace

DEFAULT_TOLERANCE_S = 300.0

# notify's secrets are "whsec_" and 43 URL-safe base64 characters; an empty or
# truncated one (an unset variable) must not key a check anyone can forge.
_SECRET = re.compile(r"whsec_[A-Za-z0-9_-]{32,}")
# Parsed before any arithmetic, so crafted headers end as WebhookError only.
_TIMESTAMP = re.compile(r"[0-9]{1,12}")
_SIGNATURE = re.compile(r"[0-9a-f]{64}")


class WebhookError(ValueError):
    """The request is not a delivery signed with one of the given secrets, now."""


@dataclass(frozen=True)
class Delivery:
    delivery_id: str  # the same on every attempt of one delivery: dedupe on it
    event_id: str
    topic: str
    attempt: int
    timestamp: int  # seconds since the epoch, when this attempt was signed
    # Who published the event ("users/{id}"), covered by the v3 signature; "" when
    # the delivery had no v3 signature, so an unsigned header is never reported.
    publisher: str = ""


def verify(
    body: bytes,
    headers: Mapping[str, str],
    secrets: str | Iterable[str],
    *,
    tolerance_s: float = DEFAULT_TOLERANCE_S,
    now: float | None = None,
    accept_v1_only: bool = False,
) -> Delivery:
    """The delivery, if one of `secrets` signed it within `tolerance_s` of
    `now`; WebhookError otherwise. Header names are matched in any case."""
    keys = _checked_secrets(secrets)
    lowered = {str(name).lower(): str(value).strip() for name, value in headers.items()}
    raw_timestamp = lowered.get("aimesh-timestamp", "")
    if not _TIMESTAMP.fullmatch(raw_timestamp):
        raise WebhookError(
            "no aimesh-timestamp header, or not a whole number of seconds "
            "(ASCII digits, at most 12)"
        )
    timestamp = int(raw_timestamp)
    current = time.time() if now is None else now
    if abs(current - timestamp) > tolerance_s:
        raise WebhookError(
            f"signed {current - timestamp:+.0f} s from now, beyond the {tolerance_s:g} s allowed"
        )
    raw_attempt = lowered.get("aimesh-attempt", "1")
    attempt = int(raw_attempt) if _TIMESTAMP.fullmatch(raw_attempt) else 0
    delivery = Delivery(
        lowered.get("aimesh-delivery", ""),
        lowered.get("aimesh-event-id", ""),
        lowered.get("aimesh-topic", ""),
        attempt,
        timestamp,
    )
    parts = [part.strip() for part in lowered.get("aimesh-signature", "").split(",")]
    v3 = [part[3:] for part in parts if part.startswith("v3=")]
    v2 = [part[3:] for part in parts if part.startswith("v2=")]
    v1 = [part[3:] for part in parts if part.startswith("v1=")]
    if v3:
        publisher = lowered.get("aimesh-publisher", "")
        delivery = replace(delivery, publisher=publisher)
        signed = [raw_timestamp, delivery.delivery_id, delivery.event_id, delivery.topic, publisher]
        message, sent = "\n".join(signed).encode() + b"\n" + body, v3
    elif v2:
        fields = (raw_timestamp, delivery.delivery_id, delivery.event_id, delivery.topic)
        message, sent = "\n".join(fields).encode() + b"\n" + body, v2
    elif v1 and accept_v1_only:
        message, sent = raw_timestamp.encode() + b"." + body, v1
    elif v1:
        raise WebhookError(
            "only v1 signatures, which leave the id and topic headers unsigned "
            "(accept_v1_only=True takes them, from notify releases before v2)"
        )
    else:
        raise WebhookError("no signature in the aimesh-signature header")
    if not all(_SIGNATURE.fullmatch(theirs) for theirs in sent):
        raise WebhookError("a signature is not 64 lowercase hex digits")
    # Every pair is compared, in constant time each, so timing tells nothing.
    matched = False
    for key in keys:
        mine = hmac.new(key.encode(), message, hashlib.sha256).hexdigest()
        for theirs in sent:
            matched |= hmac.compare_digest(mine, theirs)
    if not matched:
        raise WebhookError("no signature matches the secrets given")
    return delivery


def _checked_secrets(secrets: str | Iterable[str]) -> list[str]:
    keys = [secrets] if isinstance(secrets, str) else list(secrets)
    if not keys:
        raise WebhookError("no secret to check the signature with")
    for key in keys:
        if not isinstance(key, str) or not _SECRET.fullmatch(key):
            raise WebhookError(
                "a secret is empty or not a notify webhook secret (whsec_ and 43 URL-safe "
                "base64 characters, as CreateSubscription returned it)"
            )
    return keys
