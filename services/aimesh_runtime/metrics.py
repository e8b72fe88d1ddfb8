"""Prometheus metrics per RPC: requests by code, latency histogram, in flight.

Kept as plain counters read by a custom collector at scrape time, rather than
prometheus_client's locked metric objects: an RPC then costs a few integer
increments, not five lock round trips. Scrapes run on the HTTP side thread and
only read.
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Iterator

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
            cumulative, buckets = 0, []
            for bound, count in zip(
                (*LATENCY_BUCKETS, float("inf")), list(stats.buckets), strict=True
            ):
                cumulative += count
                buckets.append(("+Inf" if bound == float("inf") else str(bound), cumulative))
            duration.add_metric(labels, buckets, stats.seconds)
            in_flight.add_metric(labels, stats.in_flight)
        yield from (requests, duration, in_flight)
