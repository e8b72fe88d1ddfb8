"""List pagination as AIP-158 asks, and the proto conversions every servicer needs.

page_size 0 means the default, a larger one than the maximum is clamped, a
negative one is INVALID_ARGUMENT. Page tokens are opaque to callers: the
position after the last row, as base64url JSON.
"""

from __future__ import annotations

import base64
import binascii
import datetime as dt
import json
from collections.abc import Callable
from typing import Any, TypeVar

from google.protobuf import struct_pb2, timestamp_pb2

from aimesh_runtime.errors import InvalidArgument

T = TypeVar("T")

DEFAULT_PAGE_SIZE = 50
MAX_PAGE_SIZE = 500


def page_size(requested: int) -> int:
    if requested < 0:
        raise InvalidArgument.field("page_size", "must not be negative")
    return DEFAULT_PAGE_SIZE if requested == 0 else min(requested, MAX_PAGE_SIZE)


def bad_page_token() -> InvalidArgument:
    return InvalidArgument.field("page_token", "not a token from a previous page")


def encode_page_token(position: object) -> str:
    return base64.urlsafe_b64encode(json.dumps(position).encode()).decode().rstrip("=")


def decode_page_token(token: str) -> object:
    """The position a token holds; None for the first page."""
    if not token:
        return None
    try:
        return json.loads(base64.urlsafe_b64decode(token + "=" * (-len(token) % 4)))
    except (binascii.Error, ValueError):
        raise bad_page_token() from None


def cut_page(rows: list[T], limit: int, token_of: Callable[[T], str]) -> tuple[list[T], str]:
    """One page from rows fetched with `limit + 1`: the first `limit` rows, and
    the token of the next page (from its last row), or "" when there is none."""
    if len(rows) <= limit:
        return rows, ""
    rows = rows[:limit]
    return rows, token_of(rows[-1])


def timestamp(value: dt.datetime | None) -> timestamp_pb2.Timestamp | None:
    """A proto Timestamp, or None (an unset field) for None."""
    if value is None:
        return None
    stamp = timestamp_pb2.Timestamp()
    stamp.FromDatetime(value)
    return stamp


def struct(values: dict[str, Any]) -> struct_pb2.Struct:
    """A proto Struct holding a JSON-like dict."""
    message = struct_pb2.Struct()
    message.update(values)
    return message


def encode_keyset(time: dt.datetime, row_id: str) -> str:
    """A token for lists ordered by (a timestamp, an id)."""
    return encode_page_token([time.isoformat(), row_id])


def decode_keyset(token: str) -> tuple[dt.datetime, str] | None:
    position = decode_page_token(token)
    if position is None:
        return None
    if not (isinstance(position, list) and len(position) == 2):
        raise bad_page_token()
    try:
        return dt.datetime.fromisoformat(str(position[0])), str(position[1])
    except ValueError:
        raise bad_page_token() from None
