"""Metadata filters as SQL over the documents' jsonb metadata.

Values are compared as JSON values (jsonb equality: 1 equals 1.0, "1" does
not); a document without the key never matches; ranges match numbers only.
"""

from __future__ import annotations

import json
from typing import Any

from google.protobuf import json_format

from aimesh.search.v1 import search_service_pb2 as pb


def to_sql(metadata_filter: pb.MetadataFilter, first_param: int) -> tuple[str, list[Any]]:
    """A WHERE fragment and its arguments, numbered from `first_param`."""
    clauses: list[str] = []
    args: list[Any] = []

    def param(value: Any) -> str:
        args.append(value)
        return f"${first_param + len(args) - 1}"

    for condition in metadata_filter.conditions:
        key = param(condition.key)
        test = condition.WhichOneof("test")
        if test == "equals":
            value = json.dumps(json_format.MessageToDict(condition.equals))
            clauses.append(f"metadata -> {key} = {param(value)}::jsonb")
        elif test == "any_of":
            values = [json.dumps(json_format.MessageToDict(v)) for v in condition.any_of.values]
            clauses.append(f"metadata -> {key} = ANY({param(values)}::jsonb[])")
        elif test == "range":
            bounds = [f"jsonb_typeof(metadata -> {key}) = 'number'"]
            if condition.range.HasField("min"):
                bounds.append(f"(metadata ->> {key})::float8 >= {param(condition.range.min)}")
            if condition.range.HasField("max"):
                bounds.append(f"(metadata ->> {key})::float8 <= {param(condition.range.max)}")
            clauses.append(" AND ".join(bounds))
    return (" AND ".join(f"({c})" for c in clauses) or "true"), args


def matches(metadata_filter: pb.MetadataFilter, metadata: dict[str, Any]) -> bool:
    """The same test in Python: for brute-force checks and documents in memory."""
    for condition in metadata_filter.conditions:
        if condition.key not in metadata:
            return False
        value = metadata[condition.key]
        test = condition.WhichOneof("test")
        if test == "equals":
            if not _json_equal(value, json_format.MessageToDict(condition.equals)):
                return False
        elif test == "any_of":
            options = [json_format.MessageToDict(v) for v in condition.any_of.values]
            if not any(_json_equal(value, option) for option in options):
                return False
        elif test == "range":
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                return False
            if condition.range.HasField("min") and value < condition.range.min:
                return False
            if condition.range.HasField("max") and value > condition.range.max:
                return False
    return True


def _json_equal(left: Any, right: Any) -> bool:
    if isinstance(left, bool) or isinstance(right, bool):
        return type(left) is type(right) and left == right
    return bool(left == right)
