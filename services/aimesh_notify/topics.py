"""Who may publish to a topic.

The platform's topics (`user.*`, `search.*`, `chat.*`, `recommend.*`,
`notify.*`) are published by the services that own them, through their
outboxes, with a service account: no member and no admin can forge, say, a
`user.deleted` that subscribers would act on. A member publishes under its own
namespace, `apps.u<its user id>.*` (the id as registration makes it: lower-case
hex; the "u" because a topic word starts with a letter). Any other topic is
the platform's: admins and service accounts only.
"""

from __future__ import annotations

import re

from aimesh_runtime.ownership import Owner

PLATFORM_TOPICS = frozenset({"user", "search", "chat", "recommend", "notify"})
APPS = "apps"
_APP_WORD = re.compile(r"^u([a-z0-9_]{1,64})$")
_USER_ID = re.compile(r"^[a-z0-9_]{1,64}$")


def app_namespace(user_id: str) -> str | None:
    """The topic prefix a member may publish under ("apps.u<id>."), None if its id cannot
    be a topic word (ids with capitals or dashes: not those registration makes)."""
    return f"{APPS}.u{user_id}." if _USER_ID.match(user_id) else None


async def topic_owner(topic: str) -> Owner:
    words = topic.split(".")
    if words[0] in PLATFORM_TOPICS:
        return Owner("", shared=True, services_only=True)
    if words[0] == APPS and len(words) > 2:
        match = _APP_WORD.match(words[1])
        if match is not None:
            return Owner(match.group(1), shared=True)
    # Topic names are no secret: refuse with PERMISSION_DENIED, not NOT_FOUND.
    return Owner("", shared=True)
