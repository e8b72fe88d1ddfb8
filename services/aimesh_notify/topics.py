"""Who may publish to a topic.

The platform's topics (`user.*`, `search.*`, `chat.*`, `recommend.*`,
`notify.*`) are published by the service that owns each, through its outbox,
with its own account (the scope "mesh.service.<service>"): no member, no admin
and no other service can forge, say, a `user.deleted` that subscribers would
act on. A member publishes under its own
namespace, `apps.u<its user id>.*` (the id as registration makes it: lower-case
hex; the "u" because a topic word starts with a letter), and under the
prefixes an admin granted it. Any other topic is the platform's: admins and
service accounts only.
"""

from __future__ import annotations

import asyncio
import re
import time
import uuid

from aimesh_notify.store import SubscriptionStore, TopicGrantRow
from aimesh_runtime.errors import InvalidArgument, NotFound
from aimesh_runtime.ownership import Owner
from aimesh_runtime.pages import cut_page, decode_keyset, encode_keyset, page_size

PLATFORM_TOPICS = frozenset({"user", "search", "chat", "recommend", "notify"})
APPS = "apps"
# How long a grant's removal may take to reach a replica: grants are read whole
# and kept this long, so publishing costs no query of its own.
GRANTS_TTL_S = 5.0
_APP_WORD = re.compile(r"^u([a-z0-9_]{1,64})$")
_USER_ID = re.compile(r"^[a-z0-9_]{1,64}$")
_GRANTEE = re.compile(r"^users/([A-Za-z0-9_-]{1,64})$")


def app_namespace(user_id: str) -> str | None:
    """The topic prefix a member may publish under ("apps.u<id>."), None if its id cannot
    be a topic word (ids with capitals or dashes: not those registration makes)."""
    return f"{APPS}.u{user_id}." if _USER_ID.match(user_id) else None


def grant_name(grant_id: str) -> str:
    return f"topicGrants/{grant_id}"


class Topics:
    """Topic ownership for the pipeline, and the grants admins make."""

    def __init__(self, store: SubscriptionStore) -> None:
        self._store = store
        self._grants: list[tuple[str, str]] = []
        self._read_at = -1e9
        self._lock = asyncio.Lock()

    async def owner(self, topic: str) -> Owner:
        words = topic.split(".")
        if words[0] in PLATFORM_TOPICS:
            return Owner("", shared=True, reserved_to=words[0])
        writers = frozenset(
            grantee for prefix, grantee in await self._current() if topic.startswith(prefix)
        )
        if words[0] == APPS and len(words) > 2:
            match = _APP_WORD.match(words[1])
            if match is not None:
                return Owner(match.group(1), shared=True, writers=writers)
        # Topic names are no secret: refuse with PERMISSION_DENIED, not NOT_FOUND.
        return Owner("", shared=True, writers=writers)

    async def _current(self) -> list[tuple[str, str]]:
        if time.monotonic() - self._read_at > GRANTS_TTL_S:
            async with self._lock:
                if time.monotonic() - self._read_at > GRANTS_TTL_S:
                    self._grants = await self._store.all_topic_grants()
                    self._read_at = time.monotonic()
        return self._grants

    async def grant(self, prefix: str, grantee: str) -> TopicGrantRow:
        if prefix.split(".")[0] in PLATFORM_TOPICS:
            raise InvalidArgument.field(
                "topic_grant.topic_prefix", "the platform's topics are published by its services"
            )
        match = _GRANTEE.match(grantee)
        if match is None:
            raise InvalidArgument.field("topic_grant.grantee", "must be users/{user}")
        row = await self._store.create_topic_grant(uuid.uuid4().hex, prefix, match.group(1))
        self._read_at = -1e9  # this replica sees it at once
        return row

    async def list(self, size: int, token: str) -> tuple[list[TopicGrantRow], str]:
        limit = page_size(size)
        rows = await self._store.topic_grants(decode_keyset(token), limit + 1)
        return cut_page(rows, limit, lambda row: encode_keyset(row.create_time, row.id))

    async def revoke(self, name: str) -> None:
        if not await self._store.delete_topic_grant(name.removeprefix("topicGrants/")):
            raise NotFound(f"{name} not found", metadata={"name": name})
        self._read_at = -1e9
