"""Recommend's domain types and registry reads, without protos or a database."""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence
from types import SimpleNamespace
from typing import Any

import pytest

from aimesh_recommend.experiments import DEFAULT_CONVERSIONS, InteractionKind, ModelRegistry
from aimesh_recommend.recommender import FallbackReason
from aimesh_runtime.errors import InvalidArgument, NotFound


class FakeStore:
    """The registry's reads over a list of versions and fixed counts."""

    def __init__(self, versions: list[str]) -> None:
        self.rows = [SimpleNamespace(seq=n, id=v) for n, v in enumerate(versions, 1)]
        self.asked_kinds: list[list[int]] = []

    async def versions(self, after: int | None, limit: int) -> list[Any]:
        return [r for r in self.rows if after is None or r.seq > after][:limit]

    async def version(self, version: str) -> Any:
        return next((r for r in self.rows if r.id == version), None)

    async def experiment_counts(
        self, version: str, kinds: Sequence[int], start: Any, end: Any
    ) -> tuple[int, int]:
        self.asked_kinds.append(list(kinds))
        return (1000, 100) if version == "a" else (1000, 150)


def test_fallback_reasons_are_recorded_by_their_contract_names() -> None:
    assert FallbackReason.NONE.serving_label == ""
    assert FallbackReason.BREAKER_OPEN.serving_label == "FALLBACK_REASON_BREAKER_OPEN"
    assert FallbackReason(1) is FallbackReason.MODEL_MISSING  # as the result cache stores it


async def test_versions_page_through_without_gaps() -> None:
    registry = ModelRegistry(FakeStore(["a", "b", "c"]))  # type: ignore[arg-type]
    first, token = await registry.list_versions(2, "")
    assert [r.id for r in first] == ["a", "b"] and token
    rest, last = await registry.list_versions(2, token)
    assert [r.id for r in rest] == ["c"] and last == ""
    with pytest.raises(InvalidArgument):
        await registry.list_versions(2, "bm90LWEtdG9rZW4")  # "not-a-token"


async def test_experiment_checks_versions_and_defaults_to_clicks_and_purchases() -> None:
    store = FakeStore(["a", "b"])
    registry = ModelRegistry(store)  # type: ignore[arg-type]
    with pytest.raises(InvalidArgument):
        await registry.experiment("a", "a", [], None, None)
    with pytest.raises(NotFound):
        await registry.experiment("a", "missing", [], None, None)
    results = await registry.experiment("a", "b", [], None, dt.datetime.now(dt.UTC))
    assert (results.control.conversions, results.treatment.conversions) == (100, 150)
    assert store.asked_kinds[-1] == [InteractionKind.CLICK, InteractionKind.PURCHASE]
    assert tuple(DEFAULT_CONVERSIONS) == (2, 3)
