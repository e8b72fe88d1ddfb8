"""The scoring batcher (aimesh_runtime.batching) and its metrics: concurrent
recommendation requests are scored as one matmul per batch, on one lane."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from aimesh_recommend.scoring import Ranked, ScoreRequest, score_batch
from aimesh_recommend.settings import RecommendSettings
from aimesh_runtime.batching import BATCH_BUCKETS, BatchMetrics, MicroBatcher
from aimesh_runtime.metrics import ModelMetrics


def batcher_metrics(registry: CollectorRegistry | None) -> BatchMetrics:
    return BatchMetrics(
        batch_size=Histogram(
            "aimesh_recommend_batch_size",
            "Users scored per batch.",
            buckets=BATCH_BUCKETS,
            registry=registry,
        ),
        queue_depth=Gauge(
            "aimesh_recommend_queue_depth", "Requests waiting to be scored.", registry=registry
        ),
        rejected=Counter(
            "aimesh_recommend_rejected",
            "Requests refused because the queue was full.",
            registry=registry,
        ),
    )


def scoring_batcher(
    settings: RecommendSettings,
    registry: CollectorRegistry | None,
    model_metrics: ModelMetrics,
    remote: Callable[[list[ScoreRequest]], Awaitable[list[Ranked]]] | None = None,
) -> MicroBatcher[ScoreRequest, Ranked]:
    """The scorer, not yet started; batches run on its lane thread, or with
    `remote` in a scoring process."""
    scorer_metrics = batcher_metrics(registry)
    model_metrics.track_queue(
        "recommend", lambda: next(iter(scorer_metrics.queue_depth.collect())).samples[0].value
    )

    def observed_batch(requests: Sequence[ScoreRequest]) -> list[Ranked]:
        model_metrics.observe_batch("recommend", len(requests))
        return score_batch(requests)

    async def observed_remote(requests: list[ScoreRequest]) -> list[Ranked]:
        model_metrics.observe_batch("recommend", len(requests))
        assert remote is not None
        return await remote(requests)

    return MicroBatcher(
        [observed_batch],  # one lane: a batch is one matmul, and torch is given the cores
        enabled=settings.batching,
        max_batch=settings.max_batch,
        max_wait_s=settings.max_wait_ms / 1000,
        queue_size=settings.queue_size,
        metrics=scorer_metrics,
        busy_reason="SCORER_BUSY",
        name="scorer",
        remote=[observed_remote] if remote is not None else None,
    )
