"""Conversations and their messages: ownership, names and pages.

A conversation belongs to the principal that created it. Every lookup is by
id and owner together, so someone else's conversation reads exactly like one
that does not exist.
"""

from __future__ import annotations

import base64
import binascii
import datetime as dt
import json
import re
import uuid
from dataclasses import dataclass
from typing import Generic, TypeVar

from aimesh_chat.store import ChatStore, ConversationRow, MessageRow
from aimesh_runtime.errors import InvalidArgument, NotFound

DEFAULT_PAGE_SIZE = 50
MAX_PAGE_SIZE = 500
_CONVERSATION = re.compile(r"^conversations/([A-Za-z0-9_-]{1,64})$")
_MESSAGE = re.compile(r"^conversations/([A-Za-z0-9_-]{1,64})/messages/([A-Za-z0-9_-]{1,64})$")
_USER = re.compile(r"^users/([A-Za-z0-9_-]{1,64})$")


def new_id() -> str:
    return uuid.uuid4().hex


def conversation_name(conversation_id: str) -> str:
    return f"conversations/{conversation_id}"


def message_name(conversation_id: str, message_id: str) -> str:
    return f"conversations/{conversation_id}/messages/{message_id}"


def parse_conversation(name: str, field: str = "name") -> str:
    match = _CONVERSATION.match(name)
    if match is None:
        raise InvalidArgument.field(field, "must be conversations/{conversation}")
    return match.group(1)


def parse_message(name: str) -> tuple[str, str]:
    match = _MESSAGE.match(name)
    if match is None:
        raise InvalidArgument.field("name", "must be conversations/{conversation}/messages/{id}")
    return match.group(1), match.group(2)


def parse_user(name: str) -> str:
    match = _USER.match(name)
    if match is None:
        raise InvalidArgument.field("user", "must be users/{user}")
    return match.group(1)


def page_size(requested: int) -> int:
    if requested < 0:
        raise InvalidArgument.field("page_size", "must not be negative")
    return DEFAULT_PAGE_SIZE if requested == 0 else min(requested, MAX_PAGE_SIZE)


def _encode(value: object) -> str:
    return base64.urlsafe_b64encode(json.dumps(value).encode()).decode().rstrip("=")


def _decode(token: str) -> object:
    try:
        return json.loads(base64.urlsafe_b64decode(token + "=" * (-len(token) % 4)))
    except (binascii.Error, ValueError):
        raise InvalidArgument.field("page_token", "not a token from a previous page") from None


def _bad_token() -> InvalidArgument:
    return InvalidArgument.field("page_token", "not a token from a previous page")


T = TypeVar("T")


@dataclass(frozen=True)
class Page(Generic[T]):
    items: list[T]
    next_page_token: str


def not_found(name: str) -> NotFound:
    # The same words whether it is absent or someone else's.
    return NotFound(f"{name} not found", reason="CONVERSATION_NOT_FOUND", metadata={"name": name})


class Conversations:
    def __init__(self, store: ChatStore) -> None:
        self._store = store

    async def create(self, owner_id: str, display_name: str) -> ConversationRow:
        return await self._store.create_conversation(new_id(), owner_id, display_name)

    async def get(self, owner_id: str, name: str, field: str = "name") -> ConversationRow:
        row = await self._store.conversation_of(parse_conversation(name, field), owner_id)
        if row is None:
            raise not_found(name)
        return row

    async def list(self, owner_id: str, size: int, token: str) -> Page[ConversationRow]:
        limit = page_size(size)
        after: tuple[dt.datetime, str] | None = None
        if token:
            decoded = _decode(token)
            if not (isinstance(decoded, list) and len(decoded) == 2):
                raise _bad_token()
            try:
                after = dt.datetime.fromisoformat(str(decoded[0])), str(decoded[1])
            except ValueError:
                raise _bad_token() from None
        rows = await self._store.conversations_of(owner_id, after, limit + 1)
        following = ""
        if len(rows) > limit:
            rows = rows[:limit]
            following = _encode([rows[-1].update_time.isoformat(), rows[-1].id])
        return Page(rows, following)

    async def messages(self, owner_id: str, parent: str, size: int, token: str) -> Page[MessageRow]:
        conversation = await self.get(owner_id, parent, "parent")
        limit = page_size(size)
        after = 0
        if token:
            decoded = _decode(token)
            if not isinstance(decoded, int) or decoded < 0:
                raise _bad_token()
            after = decoded
        rows = await self._store.messages_of(conversation.id, after, limit + 1)
        following = ""
        if len(rows) > limit:
            rows = rows[:limit]
            following = _encode(rows[-1].seq)
        return Page(rows, following)

    async def message(self, owner_id: str, name: str) -> MessageRow:
        conversation_id, message_id = parse_message(name)
        row = await self._store.message_of(conversation_id, message_id, owner_id)
        if row is None:
            raise not_found(name)
        return row

    async def purge(self, user: str) -> int:
        return await self._store.purge_owner(parse_user(user))
