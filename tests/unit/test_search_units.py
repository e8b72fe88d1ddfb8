"""Pure parts of the search service: JSONL lines and metadata filters."""

from __future__ import annotations

import pytest
from google.protobuf import struct_pb2

from aimesh.search.v1 import search_service_pb2 as pb
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
    conditions = [
        pb.MetadataCondition(key="n", equals=struct_pb2.Value(number_value=1)),
        pb.MetadataCondition(key="flag", equals=struct_pb2.Value(bool_value=True)),
    ]
    wanted = pb.MetadataFilter(conditions=conditions)
    assert filters.matches(wanted, {"n": 1.0, "flag": True})
    assert not filters.matches(wanted, {"n": 1, "flag": 1}), "true is not 1"
    assert not filters.matches(wanted, {"flag": True}), "a missing key never matches"
    ranged = pb.MetadataFilter(
        conditions=[pb.MetadataCondition(key="n", range=pb.NumberRange(min=2, max=3))]
    )
    assert filters.matches(ranged, {"n": 2.5}) and not filters.matches(ranged, {"n": "2.5"})
    where, args = filters.to_sql(ranged, first_param=2)
    assert {"$2", "$3", "$4"} <= set(where.replace(")", " ").split()) and args == ["n", 2.0, 3.0]
