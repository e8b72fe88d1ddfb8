"""Prometheus metrics per RPC (requests by code, latency histogram, in flight) and
per model (batch sizes, queue depth, tokens, A/B variants, GPU).

Kept as plain counters read by a custom collector at scrape time, rather than
prometheus_client's locked metric objects: an RPC then costs a few integer
increments, not five lock round trips. Scrapes run on the HTTP side thread and
only read.
"""

from __future__ import annotations

import contextlib
import sys
import weakref
from bisect import bisect_left
from collections.abc import Callable, Iterator
from typing import ClassVar

from prometheus_client import CollectorRegistry
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

# Upper bounds from 0.5 ms to 30 s: cheap reads sit at the bottom, model calls at the top.
LATENCY_BUCKETS = (
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
)  # fmt: skip
LABELS = ("grpc_service", "grpc_method")


class MethodMetrics:
    __slots__ = ("buckets", "codes", "in_flight", "method", "seconds", "service")

    def __init__(self, service: str, method: str) -> None:
        self.service = service
        self.method = method
        self.in_flight = 0
        self.codes: dict[str, int] = {}
        self.buckets = [0] * (len(LATENCY_BUCKETS) + 1)  # the last one is +Inf
        self.seconds = 0.0

    def record(self, code: str, seconds: float) -> None:
        self.codes[code] = self.codes.get(code, 0) + 1
        self.buckets[bisect_left(LATENCY_BUCKETS, seconds)] += 1
        self.seconds += seconds


def cumulative_buckets(stats: MethodMetrics) -> list[tuple[str, float]]:
    """Histogram buckets as Prometheus wants them: (upper bound, count at or below)."""
    cumulative, buckets = 0, []
    for bound, count in zip((*LATENCY_BUCKETS, float("inf")), list(stats.buckets), strict=True):
        cumulative += count
        buckets.append(("+Inf" if bound == float("inf") else str(bound), float(cumulative)))
    return buckets


class RpcMetrics(Collector):
    def __init__(self, registry: CollectorRegistry) -> None:
        self._methods: dict[str, MethodMetrics] = {}
        registry.register(self)

    def for_method(self, full_method: str) -> MethodMetrics:
        found = self._methods.get(full_method)
        if found is None:
            service, _, method = full_method.lstrip("/").partition("/")
            found = self._methods[full_method] = MethodMetrics(service, method)
        return found

    def collect(self) -> Iterator[Metric]:
        requests = CounterMetricFamily(
            "aimesh_rpc_server_requests",
            "RPCs completed, by method and status code.",
            labels=(*LABELS, "grpc_code"),
        )
        duration = HistogramMetricFamily(
            "aimesh_rpc_server_duration_seconds",
            "Time from receiving an RPC to its status, by method.",
            labels=LABELS,
        )
        in_flight = GaugeMetricFamily(
            "aimesh_rpc_server_in_flight", "RPCs being handled now, by method.", labels=LABELS
        )
        for stats in list(self._methods.values()):
            labels = [stats.service, stats.method]
            for code, count in list(stats.codes.items()):
                requests.add_metric([*labels, code], count)
            duration.add_metric(labels, cumulative_buckets(stats), stats.seconds)
            in_flight.add_metric(labels, stats.in_flight)
        yield from (requests, duration, in_flight)


# Texts or items per model batch: powers of two up to a large GPU batch.
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)


class _Batches:
    __slots__ = ("buckets", "count", "total")

    def __init__(self) -> None:
        self.buckets = [0] * (len(BATCH_BUCKETS) + 1)
        self.count = 0
        self.total = 0


class ModelMetrics(Collector):
    """Model-side metrics every AI service reports the same way.

    Batch sizes, queue depth, token usage, A/B variant counts and, where torch
    sees a CUDA device, GPU utilisation and memory. One per registry (a
    monolith's five services share one): get it with `ModelMetrics.of(registry)`.
    Every family is declared from the first scrape, so dashboards resolve their
    queries before the first model call; GPU series appear only with a GPU.
    """

    _by_registry: ClassVar[weakref.WeakKeyDictionary[CollectorRegistry, ModelMetrics]] = (
        weakref.WeakKeyDictionary()
    )

    def __init__(self, registry: CollectorRegistry) -> None:
        self._batches: dict[str, _Batches] = {}
        self._queues: dict[str, Callable[[], float]] = {}
        self._tokens: dict[tuple[str, str], int] = {}
        self._variants: dict[tuple[str, str], int] = {}
        registry.register(self)

    @classmethod
    def of(cls, registry: CollectorRegistry) -> ModelMetrics:
        found = cls._by_registry.get(registry)
        if found is None:
            found = cls._by_registry[registry] = cls(registry)
        return found

    def observe_batch(self, model: str, size: int) -> None:
        batches = self._batches.get(model)
        if batches is None:
            batches = self._batches[model] = _Batches()
        batches.buckets[bisect_left(BATCH_BUCKETS, size)] += 1
        batches.count += 1
        batches.total += size

    def track_queue(self, model: str, depth: Callable[[], float]) -> None:
        """Read `depth()` at each scrape: no bookkeeping on the hot path."""
        self._queues[model] = depth

    def add_tokens(self, model: str, kind: str, count: int) -> None:
        """Tokens used by `model`; kind is "input" or "output"."""
        if count > 0:
            key = (model, kind)
            self._tokens[key] = self._tokens.get(key, 0) + count

    def count_variant(self, model: str, variant: str) -> None:
        """One request served by `variant` (an A/B arm or model version) of `model`."""
        key = (model, variant)
        self._variants[key] = self._variants.get(key, 0) + 1

    def collect(self) -> Iterator[Metric]:
        batch = HistogramMetricFamily(
            "aimesh_model_batch_size", "Items per model batch.", labels=("model",)
        )
        for model, batches in list(self._batches.items()):
            cumulative, buckets = 0, []
            for bound, count in zip(
                (*BATCH_BUCKETS, float("inf")), list(batches.buckets), strict=True
            ):
                cumulative += count
                buckets.append(("+Inf" if bound == float("inf") else str(bound), cumulative))
            batch.add_metric([model], buckets, batches.total)
        queue = GaugeMetricFamily(
            "aimesh_model_queue_depth", "Items waiting for the model.", labels=("model",)
        )
        for model, depth in list(self._queues.items()):
            queue.add_metric([model], depth())
        tokens = CounterMetricFamily(
            "aimesh_model_tokens", "Tokens used, by model and kind.", labels=("model", "kind")
        )
        for (model, kind), count in list(self._tokens.items()):
            tokens.add_metric([model, kind], count)
        variants = CounterMetricFamily(
            "aimesh_model_variant_requests",
            "Requests served, by model and A/B variant.",
            labels=("model", "variant"),
        )
        for (model, variant), count in list(self._variants.items()):
            variants.add_metric([model, variant], count)
        yield from (batch, queue, tokens, variants, *gpu_metrics())


def gpu_metrics() -> list[Metric]:
    """GPU utilisation and memory per CUDA device, read through torch when it is loaded.

    Only a process that already imported torch is asked (the user image has no
    torch, and importing it costs seconds); utilisation needs NVML, and is left
    out where torch cannot read it.
    """
    utilisation = GaugeMetricFamily(
        "aimesh_gpu_utilization_ratio",
        "Share of time a kernel ran on the GPU over the last sample period.",
        labels=("device",),
    )
    memory = GaugeMetricFamily(
        "aimesh_gpu_memory_used_bytes", "GPU memory held by this process.", labels=("device",)
    )
    torch = sys.modules.get("torch")
    if torch is not None:
        try:
            devices = torch.cuda.device_count() if torch.cuda.is_available() else 0
        except Exception:  # a broken driver must not break the scrape
            devices = 0
        for index in range(devices):
            name = f"cuda:{index}"
            memory.add_metric([name], float(torch.cuda.memory_allocated(index)))
            with contextlib.suppress(Exception):  # no NVML: memory only
                utilisation.add_metric([name], torch.cuda.utilization(index) / 100)
    return [utilisation, memory]
