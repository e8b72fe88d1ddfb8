"""GetExperimentResults: exposures and conversions per version, and the test."""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence
from dataclasses import dataclass

from aimesh.recommend.v1 import recommend_service_pb2 as pb
from aimesh_recommend import stats
from aimesh_recommend.store import RecommendStore
from aimesh_runtime.errors import InvalidArgument, NotFound

DEFAULT_CONVERSIONS = (pb.INTERACTION_KIND_CLICK, pb.INTERACTION_KIND_PURCHASE)


@dataclass(frozen=True)
class Results:
    control: stats.Variant
    treatment: stats.Variant
    comparison: stats.Comparison


async def experiment(
    store: RecommendStore,
    control: str,
    treatment: str,
    kinds: Sequence[int],
    start: dt.datetime | None,
    end: dt.datetime | None,
) -> Results:
    if control == treatment:
        raise InvalidArgument.field("treatment_version", "must differ from control_version")
    for field, version in (("control_version", control), ("treatment_version", treatment)):
        if await store.version(version) is None:
            raise NotFound(
                f"modelVersions/{version} is not registered",
                reason="MODEL_VERSION_NOT_FOUND",
                metadata={"model_version": version, "field": field},
            )
    chosen = list(kinds) or list(DEFAULT_CONVERSIONS)
    variants = []
    for version in (control, treatment):
        exposures, conversions = await store.experiment_counts(version, chosen, start, end)
        variants.append(stats.Variant(version, exposures, conversions))
    return Results(variants[0], variants[1], stats.compare(variants[0], variants[1]))
