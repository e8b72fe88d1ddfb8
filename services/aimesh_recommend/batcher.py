"""Metrics of the scoring batcher (aimesh_runtime.batching): concurrent
recommendation requests are scored as one matmul per batch, on one lane."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from aimesh_runtime.batching import BATCH_BUCKETS, BatchMetrics


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
