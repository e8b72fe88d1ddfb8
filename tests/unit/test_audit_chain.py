"""The audit chain's hashing, without a database."""

from __future__ import annotations

import datetime as dt

from aimesh_runtime import audit


def test_canonical_json_is_one_text_per_value() -> None:
    assert audit.canonical({"b": 1, "a": [2, "é"]}) == audit.canonical({"a": [2, "é"], "b": 1})
    assert audit.canonical({"b": 1, "a": 2}) == '{"a":2,"b":1}'


def test_each_link_depends_on_the_previous_and_on_every_field() -> None:
    when = dt.datetime(2026, 1, 2, 3, 4, 5, 678901, tzinfo=dt.UTC)
    base = audit.link(audit.GENESIS, 1, "k", "s", "{}", when)
    assert base == audit.link(audit.GENESIS, 1, "k", "s", "{}", when.astimezone())
    variants = [
        audit.link(b"\x01" * 32, 1, "k", "s", "{}", when),
        audit.link(audit.GENESIS, 2, "k", "s", "{}", when),
        audit.link(audit.GENESIS, 1, "k2", "s", "{}", when),
        audit.link(audit.GENESIS, 1, "k", "s2", "{}", when),
        audit.link(audit.GENESIS, 1, "k", "s", '{"a":1}', when),
        audit.link(audit.GENESIS, 1, "k", "s", "{}", when + dt.timedelta(microseconds=1)),
    ]
    assert len({base, *variants}) == 7
