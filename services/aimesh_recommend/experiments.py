"""The model registry's reads: versions page by page, and an A/B experiment's
exposures and conversions per version with the test between them."""

from __future__ import annotations

import datetime as dt
import enum
from collections.abc import Sequence
from dataclasses import dataclass

from aimesh_recommend import stats
from aimesh_recommend.store import RecommendStore, VersionRow
from aimesh_runtime.errors import InvalidArgument, NotFound
from aimesh_runtime.pages import cut_page, decode_page_token, encode_page_token, page_size


class InteractionKind(enum.IntEnum):
    """What a user did with an item; the numbers are the contract's and are stored."""

    VIEW = 1
    CLICK = 2
    PURCHASE = 3
    RATING = 4


DEFAULT_CONVERSIONS = (InteractionKind.CLICK, InteractionKind.PURCHASE)


@dataclass(frozen=True)
class Results:
    control: stats.Variant
    treatment: stats.Variant
    comparison: stats.Comparison


class ModelRegistry:
    """The registered model versions, and the experiments between them."""

    def __init__(self, store: RecommendStore) -> None:
        self._store = store

    async def list_versions(self, size: int, token: str) -> tuple[list[VersionRow], str]:
        limit = page_size(size)
        position = decode_page_token(token)
        if position is not None and not isinstance(position, int):
            raise InvalidArgument.field("page_token", "not a token from a previous page")
        rows = await self._store.versions(position, limit + 1)
        return cut_page(rows, limit, lambda row: encode_page_token(row.seq))

    async def experiment(
        self,
        control: str,
        treatment: str,
        kinds: Sequence[int],
        start: dt.datetime | None,
        end: dt.datetime | None,
    ) -> Results:
        """Exposures and conversions (interactions of `kinds`, by default clicks and
        purchases) of two versions between `start` and `end`, and the test."""
        if control == treatment:
            raise InvalidArgument.field("treatment_version", "must differ from control_version")
        for field, version in (("control_version", control), ("treatment_version", treatment)):
            if await self._store.version(version) is None:
                raise NotFound(
                    f"modelVersions/{version} is not registered",
                    reason="MODEL_VERSION_NOT_FOUND",
                    metadata={"model_version": version, "field": field},
                )
        chosen = list(kinds) or [int(kind) for kind in DEFAULT_CONVERSIONS]
        variants = []
        for version in (control, treatment):
            counts = await self._store.experiment_counts(version, chosen, start, end)
            variants.append(stats.Variant(version, *counts))
        return Results(variants[0], variants[1], stats.compare(variants[0], variants[1]))
