"""Prometheus metrics per RPC, in a registry of the server's own."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

# Buckets from 0.5 ms to 30 s: cheap reads sit at the bottom, model calls at the top.
LATENCY_BUCKETS = (
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
)


class RpcMetrics:
    """Counts, latency and in-flight gauges per method, with children cached."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry
        self.requests = Counter(
            "aimesh_rpc_server_requests",
            "RPCs completed, by method and status code.",
            ("grpc_service", "grpc_method", "grpc_code"),
            registry=registry,
        )
        self.duration = Histogram(
            "aimesh_rpc_server_duration_seconds",
            "Time from receiving an RPC to its status, by method.",
            ("grpc_service", "grpc_method"),
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self.in_flight = Gauge(
            "aimesh_rpc_server_in_flight",
            "RPCs being handled now, by method.",
            ("grpc_service", "grpc_method"),
            registry=registry,
        )
        self._codes: dict[tuple[str, str, str], Counter] = {}

    def for_method(self, full_method: str) -> MethodMetrics:
        service, _, method = full_method.lstrip("/").partition("/")
        return MethodMetrics(self, service, method)

    def completed(self, service: str, method: str, code: str) -> Counter:
        key = (service, method, code)
        child = self._codes.get(key)
        if child is None:
            child = self._codes[key] = self.requests.labels(service, method, code)
        return child


class MethodMetrics:
    __slots__ = ("_parent", "duration", "in_flight", "method", "service")

    def __init__(self, parent: RpcMetrics, service: str, method: str) -> None:
        self._parent = parent
        self.service = service
        self.method = method
        self.duration = parent.duration.labels(service, method)
        self.in_flight = parent.in_flight.labels(service, method)

    def record(self, code: str, seconds: float) -> None:
        self.duration.observe(seconds)
        self._parent.completed(self.service, self.method, code).inc()
