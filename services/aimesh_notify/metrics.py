"""Delivery metrics: attempts as this process's worker ends them, and the
queue as PostgreSQL holds it for every worker.

Attempts are counted where they happen (a few integer increments). The queue's
state is a query, so the service runs it every AIMESH_NOTIFY_QUEUE_STATS_S in
the background and scrapes read the last answer; a standalone worker reports
its attempts only.
"""

from __future__ import annotations

import time
from collections.abc import Iterator

from prometheus_client import CollectorRegistry
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from aimesh_notify.delivery_store import QueueStats
from aimesh_runtime.metrics import MethodMetrics, cumulative_buckets

# How an attempt ended: delivered, due again after a backoff, dead-lettered, or
# lost with its worker (the lease ran out, and the next worker notes it).
OUTCOMES = ("succeeded", "retry", "dead_letter", "lease_expired")


class DeliveryMetrics(Collector):
    def __init__(self, registry: CollectorRegistry) -> None:
        self._attempts = MethodMetrics("notify", "webhook")
        self._lost = 0
        self._pauses = 0
        self._queue: QueueStats | None = None
        self._queue_read_at = 0.0
        registry.register(self)

    def record_attempt(self, outcome: str, seconds: float) -> None:
        self._attempts.record(outcome, seconds)

    def record_lost(self, count: int) -> None:
        self._lost += count

    def record_pause(self) -> None:
        self._pauses += 1

    def record_queue(self, stats: QueueStats) -> None:
        self._queue = stats
        self._queue_read_at = time.time()

    def collect(self) -> Iterator[Metric]:
        attempts = CounterMetricFamily(
            "aimesh_notify_delivery_attempts",
            "Webhook attempts this process ended, by outcome.",
            labels=("outcome",),
        )
        codes = dict(self._attempts.codes)
        codes["lease_expired"] = self._lost
        for outcome in OUTCOMES:
            attempts.add_metric([outcome], codes.get(outcome, 0))
        duration = HistogramMetricFamily(
            "aimesh_notify_delivery_attempt_duration_seconds",
            "Time from sending a webhook to its answer (or failure), in this process.",
        )
        duration.add_metric([], cumulative_buckets(self._attempts), self._attempts.seconds)
        pauses = CounterMetricFamily(
            "aimesh_notify_receiver_pauses",
            "Times this process paused a subscription whose receiver stopped answering.",
        )
        pauses.add_metric([], self._pauses)
        yield from (attempts, duration, pauses)
        if self._queue is None:
            return  # a standalone worker, or no answer from the database yet
        deliveries = GaugeMetricFamily(
            "aimesh_notify_deliveries",
            "Deliveries in the queue, all workers together, by state: due (waiting for a "
            "worker), waiting (backing off before a retry), in_flight, dead_letter.",
            labels=("state",),
        )
        queue = self._queue
        for state, count in (
            ("due", queue.due),
            ("waiting", queue.waiting),
            ("in_flight", queue.in_flight),
            ("dead_letter", queue.dead_letter),
        ):
            deliveries.add_metric([state], count)
        yield deliveries
        yield GaugeMetricFamily(
            "aimesh_notify_oldest_due_seconds",
            "How long the oldest due delivery has waited for a worker: the queue's lag.",
            value=queue.oldest_due_s,
        )
        yield GaugeMetricFamily(
            "aimesh_notify_queue_read_timestamp_seconds",
            "When the queue figures above were read from the database.",
            value=self._queue_read_at,
        )
