"""Webhook signatures, HMAC-SHA256 keyed with the subscription's secret.

- v1, over "{timestamp}.{body}": as first specified; receivers written for it
  keep working.
- v2, over the timestamp, the delivery id, the event id and the topic, each
  followed by a line feed, then the body: it also binds the headers a receiver
  acts on (the delivery id it dedupes on, the event, the topic), so a request
  captured in transit cannot be replayed under another id or topic. Header
  values never hold a line break, so the fields cannot shift into one another.
- v3, as v2 with the publisher (aimesh-publisher, "users/{id}") after the
  topic: a receiver can trust who published the event. v2 stays for receivers
  whose client package predates v3.

The timestamp is signed so a receiver can refuse replays older than a few
minutes. During a secret rotation every live secret signs: the header carries
a "v1=" and a "v2=" signature per secret, and a receiver holding either secret
verifies the delivery.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import secrets
from collections.abc import Iterable
from typing import NamedTuple

SECRET_PREFIX = "whsec_"


class Signed(NamedTuple):
    """What a delivery's signatures cover besides its body."""

    timestamp: int
    delivery_id: str
    event_id: str
    topic: str
    publisher: str = ""


def new_secret() -> str:
    return SECRET_PREFIX + base64.urlsafe_b64encode(secrets.token_bytes(32)).decode().rstrip("=")


def v1_message(signed: Signed, body: bytes) -> bytes:
    return b"%d." % signed.timestamp + body


def v2_message(signed: Signed, body: bytes) -> bytes:
    fields = (str(signed.timestamp), signed.delivery_id, signed.event_id, signed.topic)
    return "\n".join(fields).encode() + b"\n" + body


def v3_message(signed: Signed, body: bytes) -> bytes:
    fields = (
        str(signed.timestamp),
        signed.delivery_id,
        signed.event_id,
        signed.topic,
        signed.publisher,
    )
    return "\n".join(fields).encode() + b"\n" + body


def signature_header(live_secrets: Iterable[str], signed: Signed, body: bytes) -> str:
    v1, v2, v3 = v1_message(signed, body), v2_message(signed, body), v3_message(signed, body)
    parts = []
    for secret in live_secrets:
        key = secret.encode()
        parts.append("v1=" + hmac.new(key, v1, hashlib.sha256).hexdigest())
        parts.append("v2=" + hmac.new(key, v2, hashlib.sha256).hexdigest())
        parts.append("v3=" + hmac.new(key, v3, hashlib.sha256).hexdigest())
    return ",".join(parts)
