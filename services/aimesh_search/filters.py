"""Metadata filters as SQL over the documents' jsonb metadata.

Values are compared as JSON values (jsonb equality: 1 equals 1.0, "1" does
not); a document without the key never matches; ranges match numbers only.
A filter is a sequence of conditions, all of which must hold.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Equals:
    key: str
    value: Any  # a JSON value


@dataclass(frozen=True)
class AnyOf:
    key: str
    values: tuple[Any, ...]  # JSON values


@dataclass(frozen=True)
class Range:
    """Numbers from `min` to `max`, both included; None leaves that side open."""

    key: str
    min: float | None = None
    max: float | None = None


Condition = Equals | AnyOf | Range


def to_sql(conditions: Sequence[Condition], first_param: int) -> tuple[str, list[Any]]:
    """A WHERE fragment and its arguments, numbered from `first_param`."""
    clauses: list[str] = []
    args: list[Any] = []

    def param(value: Any) -> str:
        args.append(value)
        return f"${first_param + len(args) - 1}"

    for condition in conditions:
        key = param(condition.key)
        if isinstance(condition, Equals):
            clauses.append(f"metadata -> {key} = {param(json.dumps(condition.value))}::jsonb")
        elif isinstance(condition, AnyOf):
            values = [json.dumps(v) for v in condition.values]
            clauses.append(f"metadata -> {key} = ANY({param(values)}::jsonb[])")
        else:
            bounds = [f"jsonb_typeof(metadata -> {key}) = 'number'"]
            if condition.min is not None:
                bounds.append(f"(metadata ->> {key})::float8 >= {param(condition.min)}")
            if condition.max is not None:
                bounds.append(f"(metadata ->> {key})::float8 <= {param(condition.max)}")
            clauses.append(" AND ".join(bounds))
    return (" AND ".join(f"({c})" for c in clauses) or "true"), args


def matches(conditions: Sequence[Condition], metadata: dict[str, Any]) -> bool:
    """The same test in Python: for brute-force checks and documents in memory."""
    for condition in conditions:
        if condition.key not in metadata:
            return False
        value = metadata[condition.key]
        if isinstance(condition, Equals):
            if not _json_equal(value, condition.value):
                return False
        elif isinstance(condition, AnyOf):
            if not any(_json_equal(value, option) for option in condition.values):
                return False
        else:
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                return False
            if condition.min is not None and value < condition.min:
                return False
            if condition.max is not None and value > condition.max:
                return False
    return True


def _json_equal(left: Any, right: Any) -> bool:
    if isinstance(left, bool) or isinstance(right, bool):
        return type(left) is type(right) and left == right
    return bool(left == right)
