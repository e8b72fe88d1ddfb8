"""Subscriptions: ownership, names, validation, secrets.

A subscription belongs to the user who created it. Every lookup is by id and
owner together unless the caller holds notify.admin, so someone else's
subscription reads exactly like one that does not exist.
"""

from __future__ import annotations

import datetime as dt
import re
import uuid
from collections.abc import Sequence
from dataclasses import dataclass

from aimesh_notify.netguard import DeniedUrl, NetworkGuard
from aimesh_notify.sealing import SecretBox
from aimesh_notify.signing import new_secret
from aimesh_notify.store import SubscriptionRow, SubscriptionStore
from aimesh_runtime.auth import Principal
from aimesh_runtime.errors import FailedPrecondition, InvalidArgument, NotFound
from aimesh_runtime.ownership import Owner
from aimesh_runtime.pages import cut_page, decode_keyset, encode_keyset, page_size

ADMIN_SCOPE = "notify.admin"
DEFAULT_TIMEOUT_MS = 10_000
MAX_TIMEOUT_MS = 30_000
DEFAULT_GRACE = dt.timedelta(hours=24)
MAX_TOPICS = 32
UPDATABLE = frozenset({"display_name", "topics", "webhook.url", "webhook.timeout"})

_SUBSCRIPTION = re.compile(r"^subscriptions/([A-Za-z0-9_-]{1,64})$")
_USER = re.compile(r"^users/([A-Za-z0-9_-]{1,64})$")
_TOPIC_FILTER = re.compile(r"^[a-z][a-z0-9_]*(\.[a-z][a-z0-9_]*)*(\.\*)?$")


def subscription_name(subscription_id: str) -> str:
    return f"subscriptions/{subscription_id}"


def parse_subscription(name: str, field: str = "name") -> str:
    match = _SUBSCRIPTION.match(name)
    if match is None or match.group(1) == "-":
        raise InvalidArgument.field(field, "must be subscriptions/{subscription}")
    return match.group(1)


def parse_user(name: str) -> str:
    match = _USER.match(name)
    if match is None:
        raise InvalidArgument.field("user", "must be users/{user}")
    return match.group(1)


def owner_scope(caller: Principal) -> str | None:
    """Whose subscriptions the caller may see: its own, or all (None) for an admin."""
    return None if caller.has_scopes((ADMIN_SCOPE,)) else caller.subject


def not_found(name: str) -> NotFound:
    # The same words whether it is absent or someone else's.
    return NotFound(f"{name} not found", reason="SUBSCRIPTION_NOT_FOUND", metadata={"name": name})


@dataclass(frozen=True)
class Webhook:
    url: str
    timeout_ms: int  # 0 means the default


@dataclass(frozen=True)
class Page:
    items: list[SubscriptionRow]
    next_page_token: str


def check_topics(topics: Sequence[str], field: str) -> list[str]:
    if not topics:
        raise InvalidArgument.field(field, "at least one topic is required")
    if len(topics) > MAX_TOPICS or len(set(topics)) != len(topics):
        raise InvalidArgument.field(field, f"at most {MAX_TOPICS} distinct topics")
    for topic in topics:
        if not _TOPIC_FILTER.match(topic):
            raise InvalidArgument.field(field, f"{topic!r} is not a topic or a prefix ending .*")
    return list(topics)


def check_timeout(timeout_ms: int, field: str) -> int:
    if not 0 <= timeout_ms <= MAX_TIMEOUT_MS:
        raise InvalidArgument.field(field, "must be between 0 and 30 s")
    return timeout_ms or DEFAULT_TIMEOUT_MS


class Subscriptions:
    def __init__(self, store: SubscriptionStore, guard: NetworkGuard, box: SecretBox) -> None:
        self._store = store
        self._guard = guard
        self._box = box

    async def _checked_url(self, url: str, field: str) -> str:
        try:
            await self._guard.check(url)
        except DeniedUrl as error:
            raise InvalidArgument.field(field, str(error)) from None
        return url

    async def create(
        self,
        caller: Principal,
        display_name: str,
        topics: Sequence[str],
        webhook: Webhook | None,
    ) -> tuple[SubscriptionRow, str]:
        """The new subscription and, for a webhook, its secret (shown this once)."""
        topics = check_topics(topics, "subscription.topics")
        subscription_id = uuid.uuid4().hex
        secret = ""
        url: str | None = None
        timeout_ms: int | None = None
        if webhook is not None:
            url = await self._checked_url(webhook.url, "subscription.webhook.url")
            timeout_ms = check_timeout(webhook.timeout_ms, "subscription.webhook.timeout")
            secret = new_secret()
        row = await self._store.create_subscription(
            subscription_id,
            caller.subject,
            display_name,
            topics,
            "webhook" if webhook is not None else "stream",
            url,
            timeout_ms,
            self._box.seal(subscription_id, secret) if secret else None,
        )
        return row, secret

    async def owner_of(self, name: str) -> Owner | None:
        """Who owns the subscription `name`; None if there is none."""
        subscription_id = name.removeprefix("subscriptions/").split("/", 1)[0]
        row = await self.by_id(subscription_id)
        return None if row is None else Owner(row.owner_id)

    async def by_id(self, subscription_id: str) -> SubscriptionRow | None:
        """The subscription as stored now, whoever owns it (the caller was checked before)."""
        return await self._store.subscription(subscription_id, None)

    async def get(self, caller: Principal, name: str, field: str = "name") -> SubscriptionRow:
        row = await self._store.subscription(parse_subscription(name, field), owner_scope(caller))
        if row is None:
            raise not_found(name)
        return row

    async def list(self, caller: Principal, size: int, token: str) -> Page:
        limit = page_size(size)
        rows = await self._store.subscriptions(owner_scope(caller), decode_keyset(token), limit + 1)
        return Page(*cut_page(rows, limit, lambda row: encode_keyset(row.create_time, row.id)))

    async def update(
        self,
        caller: Principal,
        name: str,
        paths: Sequence[str],
        display_name: str,
        topics: Sequence[str],
        webhook: Webhook | None,
        sets_stream: bool,
    ) -> SubscriptionRow:
        unknown = sorted(set(paths) - UPDATABLE)
        if unknown or not paths:
            raise InvalidArgument.field(
                "update_mask", f"paths must be among {', '.join(sorted(UPDATABLE))}"
            )
        row = await self.get(caller, name, "subscription.name")
        touches_webhook = any(p.startswith("webhook.") for p in paths)
        if (row.kind == "stream" and touches_webhook) or (row.kind == "webhook" and sets_stream):
            raise FailedPrecondition(
                f"{name} is a {row.kind} subscription; its channel kind cannot change",
                reason="CHANNEL_KIND_FIXED",
                metadata={"name": name, "kind": row.kind},
            )
        new_name = display_name if "display_name" in paths else row.display_name
        new_topics = row.topics
        if "topics" in paths:
            new_topics = tuple(check_topics(topics, "subscription.topics"))
        url, timeout_ms = row.url, row.timeout_ms
        if "webhook.url" in paths:
            url = await self._checked_url(
                webhook.url if webhook else "", "subscription.webhook.url"
            )
        if "webhook.timeout" in paths:
            timeout_ms = check_timeout(
                webhook.timeout_ms if webhook else 0, "subscription.webhook.timeout"
            )
        updated = await self._store.update_subscription(
            row.id, new_name, new_topics, url, timeout_ms
        )
        if updated is None:
            raise not_found(name)
        return updated

    async def delete(self, caller: Principal, name: str) -> None:
        row = await self.get(caller, name)
        if not await self._store.delete_subscription(row.id):
            raise not_found(name)

    async def rotate_secret(
        self, caller: Principal, name: str, grace: dt.timedelta
    ) -> tuple[SubscriptionRow, str]:
        row = await self.get(caller, name)
        if row.kind != "webhook":
            raise FailedPrecondition(
                f"{name} is a stream subscription and has no secret",
                reason="NOT_A_WEBHOOK",
                metadata={"name": name},
            )
        secret = new_secret()
        rotated = await self._store.rotate_secret(
            row.id, self._box.seal(row.id, secret), grace or DEFAULT_GRACE
        )
        if rotated is None:
            raise not_found(name)
        return rotated, secret

    async def purge(self, user: str) -> int:
        return await self._store.purge_owner(parse_user(user))
