"""Conversations and their messages: ownership, names and pages.

A conversation belongs to the principal that created it. Every lookup is by
id and owner together, so someone else's conversation reads exactly like one
that does not exist.
"""

from __future__ import annotations

import re
import uuid
from dataclasses import dataclass
from typing import Generic, TypeVar

from aimesh_chat.store import ChatStore, ConversationRow, MessageRow
from aimesh_runtime.errors import InvalidArgument, NotFound
from aimesh_runtime.ownership import Owner
from aimesh_runtime.pages import (
    bad_page_token,
    cut_page,
    decode_keyset,
    decode_page_token,
    encode_keyset,
    encode_page_token,
    page_size,
)

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

    async def owner_of(self, name: str) -> Owner | None:
        """Who owns the conversation `name` ("conversations/{id}/...") lies in."""
        conversation_id = name.removeprefix("conversations/").split("/", 1)[0]
        owner_id = await self._store.conversation_owner(conversation_id)
        return None if owner_id is None else Owner(owner_id)

    async def create(self, owner_id: str, display_name: str) -> ConversationRow:
        return await self._store.create_conversation(new_id(), owner_id, display_name)

    async def get(self, owner_id: str, name: str, field: str = "name") -> ConversationRow:
        row = await self._store.conversation_of(parse_conversation(name, field), owner_id)
        if row is None:
            raise not_found(name)
        return row

    async def list(self, owner_id: str, size: int, token: str) -> Page[ConversationRow]:
        limit = page_size(size)
        rows = await self._store.conversations_of(owner_id, decode_keyset(token), limit + 1)
        return Page(*cut_page(rows, limit, lambda row: encode_keyset(row.update_time, row.id)))

    async def messages(self, owner_id: str, parent: str, size: int, token: str) -> Page[MessageRow]:
        conversation = await self.get(owner_id, parent, "parent")
        limit = page_size(size)
        after = decode_page_token(token) or 0
        if not isinstance(after, int) or after < 0:
            raise bad_page_token()
        rows = await self._store.messages_of(conversation.id, after, limit + 1)
        return Page(*cut_page(rows, limit, lambda row: encode_page_token(row.seq)))

    async def message(self, owner_id: str, name: str) -> MessageRow:
        conversation_id, message_id = parse_message(name)
        row = await self._store.message_of(conversation_id, message_id, owner_id)
        if row is None:
            raise not_found(name)
        return row

    async def purge(self, user: str) -> int:
        return await self._store.purge_owner(parse_user(user))
