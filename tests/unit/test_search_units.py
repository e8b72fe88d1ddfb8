"""Pure parts of the search service: JSONL lines and metadata filters."""

from __future__ import annotations

import pytest

from aimesh_search import filters
from aimesh_search.importer import parse_line


def test_a_good_line_becomes_a_document_owned_by_the_caller() -> None:
    document = parse_line(b'{"id": "a-1", "text": "hello", "metadata": {"k": 1}}', "users/me")
    assert (document.id, document.text, document.metadata, document.owner) == (
        "a-1", "hello", {"k": 1}, "users/me",
    )  # fmt: skip


@pytest.mark.parametrize(
    "raw,problem",
    [
        (b"{broken", "not JSON"),
        (b"[1, 2]", "not a JSON object"),
        (b'{"id": "-x", "text": "t"}', "start with a letter"),
        (b'{"id": "a b", "text": "t"}', "id must be"),
        (b'{"id": "a", "text": ""}', "text must be"),
        (b'{"id": "a", "text": "t", "metadata": []}', "metadata must be"),
        (b'{"id": "a", "text": "t", "owner": "users/else"}', "only admins"),
    ],
)
def test_bad_lines_say_what_is_wrong(raw: bytes, problem: str) -> None:
    with pytest.raises(ValueError, match=problem):
        parse_line(raw, "users/me")


def test_deeply_nested_lines_are_a_line_error_not_a_crash() -> None:
    def line(metadata: str) -> bytes:
        return b'{"id": "a", "text": "t", "metadata": {"k": ' + metadata.encode() + b"}}"

    assert parse_line(line("[" * 30 + "]" * 30), "users/me").metadata["k"]
    for metadata in ("[" * 31 + "]" * 31, "[" * 100_000, "[" * 5_000 + "]" * 5_000):
        with pytest.raises(ValueError, match="nested more than 32 levels"):
            parse_line(line(metadata), "users/me")


def test_admins_may_import_for_others() -> None:
    line = b'{"id": "a", "text": "t", "owner": "users/else"}'
    assert parse_line(line, "users/me", may_assign_owner=True).owner == "users/else"


def test_filter_semantics_in_python_match_the_contract() -> None:
    wanted = [filters.Equals("n", 1.0), filters.Equals("flag", True)]
    assert filters.matches(wanted, {"n": 1.0, "flag": True})
    assert not filters.matches(wanted, {"n": 1, "flag": 1}), "true is not 1"
    assert not filters.matches(wanted, {"flag": True}), "a missing key never matches"
    ranged = [filters.Range("n", min=2, max=3)]
    assert filters.matches(ranged, {"n": 2.5}) and not filters.matches(ranged, {"n": "2.5"})
    assert not filters.matches(ranged, {"n": True}), "a bool is not a number"
    where, args = filters.to_sql(ranged, first_param=2)
    assert {"$2", "$3", "$4"} <= set(where.replace(")", " ").split()) and args == ["n", 2, 3]


def test_filters_any_of_and_open_ranges() -> None:
    colours = [filters.AnyOf("colour", ("red", "blue"))]
    assert filters.matches(colours, {"colour": "blue"})
    assert not filters.matches(colours, {"colour": "green"})
    where, args = filters.to_sql(colours, first_param=1)
    assert where == "(metadata -> $1 = ANY($2::jsonb[]))" and args == [
        "colour",
        ['"red"', '"blue"'],
    ]
    at_least = [filters.Range("n", min=5)]
    assert filters.matches(at_least, {"n": 7}) and not filters.matches(at_least, {"n": 4})
    assert filters.to_sql(at_least, first_param=1)[1] == ["n", 5]
    assert filters.to_sql([], first_param=1) == ("true", [])
