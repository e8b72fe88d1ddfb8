"""The runtime's shared helpers: paging cut, keyset SQL, deadline share, Struct."""

from __future__ import annotations

import datetime as dt
import time

from aimesh_runtime.context import CallScope, current_call, downstream_timeout_s
from aimesh_runtime.db import KeysetPage
from aimesh_runtime.pages import cut_page, decode_page_token, encode_page_token, struct


def test_cut_page_keeps_limit_rows_and_tokens_the_last_kept() -> None:
    rows, token = cut_page([1, 2, 3, 4], 3, lambda row: encode_page_token(row))
    assert rows == [1, 2, 3]
    assert decode_page_token(token) == 3


def test_cut_page_without_a_further_row_has_no_token() -> None:
    assert cut_page([1, 2, 3], 3, lambda row: encode_page_token(row)) == ([1, 2, 3], "")
    assert cut_page([], 3, lambda row: encode_page_token(row)) == ([], "")


def test_keyset_first_page_binds_only_the_limit() -> None:
    page = KeysetPage.of(None, 10, column="create_time", first=2)
    assert page.where == "TRUE"
    assert page.order_limit == "ORDER BY create_time, id LIMIT $2"
    assert page.values == (10,)


def test_keyset_after_a_position_descending() -> None:
    at = dt.datetime(2026, 1, 2, tzinfo=dt.UTC)
    page = KeysetPage.of((at, "x"), 5, column="update_time", descending=True, first=2)
    assert page.where == "(update_time, id) < ($2, $3)"
    assert page.order_limit == "ORDER BY update_time DESC, id DESC LIMIT $4"
    assert page.values == (at, "x", 5)


def test_keyset_after_a_position_ascending() -> None:
    at = dt.datetime(2026, 1, 2, tzinfo=dt.UTC)
    page = KeysetPage.of((at, "x"), 5, column="create_time")
    assert page.where == "(create_time, id) > ($1, $2)"
    assert page.values == (at, "x", 5)


def test_downstream_timeout_is_the_cap_without_a_deadline() -> None:
    assert downstream_timeout_s(2.0, 0.5) == 2.0
    token = current_call.set(CallScope(method="m", request_id="r"))
    try:
        assert downstream_timeout_s(2.0, 0.5) == 2.0
    finally:
        current_call.reset(token)


def test_downstream_timeout_is_a_share_of_the_remaining_deadline() -> None:
    scope = CallScope(method="m", request_id="r", deadline=time.monotonic() + 1000.0)
    token = current_call.set(scope)
    try:
        assert 0 < downstream_timeout_s(10_000.0, 0.5) <= 500.0
        assert downstream_timeout_s(2.0, 0.5) == 2.0  # capped
        scope.deadline = time.monotonic() - 5.0  # already passed
        assert downstream_timeout_s(2.0, 0.5) == 0.001
    finally:
        current_call.reset(token)


def test_struct_holds_the_dict() -> None:
    message = struct({"a": 1, "b": ["x"]})
    assert message["a"] == 1
    assert list(message["b"]) == ["x"]
