"""Channels for service-to-service calls.

A channel built here carries a gRPC service config derived from the contract:
methods marked NO_SIDE_EFFECTS or IDEMPOTENT retry on UNAVAILABLE (gRFC A6),
retries are throttled so a dead backend is not hammered, and every unary
method has a timeout. Its interceptor sends the caller's remaining deadline,
trace context, request id and credentials downstream.

The timeouts are set per call by the interceptor, not in the service config:
grpcio's service-config "timeout" fires about 1.5 s early (grpc/grpc#34547,
#40633; seen with grpcio 1.85), so a 1 s timeout there fails every call at
once and a 5 s one allows 3.5 s. A per-call timeout covers all retry attempts,
as the service-config one would.
"""

from __future__ import annotations

import json
import time
from collections.abc import Mapping
from typing import Any

import grpc
from google.protobuf.descriptor import MethodDescriptor, ServiceDescriptor
from google.protobuf.descriptor_pb2 import MethodOptions
from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.trace import SpanKind, Status, StatusCode, TracerProvider
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from aimesh_runtime.context import call_scope

propagator = TraceContextTextMapPropagator()

SAFE_TO_RETRY = (MethodOptions.NO_SIDE_EFFECTS, MethodOptions.IDEMPOTENT)
RETRY_POLICY = {
    "maxAttempts": 4,
    "initialBackoff": "0.05s",
    "maxBackoff": "1s",
    "backoffMultiplier": 2,
    "retryableStatusCodes": ["UNAVAILABLE"],
}
# A failure costs one token, a success earns 0.1; retries stop below half.
RETRY_THROTTLING = {"maxTokens": 10, "tokenRatio": 0.1}


def _streams(method: MethodDescriptor) -> bool:
    return bool(method.client_streaming or method.server_streaming)


def method_timeouts(
    service: ServiceDescriptor,
    *,
    default_timeout_s: float = 5.0,
    timeouts: Mapping[str, float] | None = None,
) -> dict[str, float]:
    """Timeout of each unary method of `service`, by full method path (/pkg.Service/Method)."""
    timeouts = timeouts or {}
    return {
        f"/{service.full_name}/{method.name}": timeouts.get(method.name, default_timeout_s)
        for method in service.methods
        if not _streams(method)
    }


def service_config(
    service: ServiceDescriptor,
    *,
    retry_throttling: Mapping[str, float] | None = None,
    max_attempts: int | None = None,
) -> dict[str, Any]:
    """The gRPC service config for calling `service`, from its descriptor.

    Timeouts are not in it (see the module docstring): `method_timeouts` gives
    them to the channel's interceptor.
    """
    policy = RETRY_POLICY if max_attempts is None else {**RETRY_POLICY, "maxAttempts": max_attempts}
    configs = []
    for method in service.methods:
        entry: dict[str, Any] = {"name": [{"service": service.full_name, "method": method.name}]}
        if not _streams(method) and method.GetOptions().idempotency_level in SAFE_TO_RETRY:
            entry["retryPolicy"] = policy
        configs.append(entry)
    return {"methodConfig": configs, "retryThrottling": dict(retry_throttling or RETRY_THROTTLING)}


class PropagatingInterceptor(
    grpc.aio.UnaryUnaryClientInterceptor,
    grpc.aio.UnaryStreamClientInterceptor,
    grpc.aio.StreamUnaryClientInterceptor,
    grpc.aio.StreamStreamClientInterceptor,
):
    """Send the remaining deadline, trace context, request id and caller downstream."""

    def __init__(
        self,
        tracer_provider: TracerProvider | None = None,
        timeouts: Mapping[str, float] | None = None,
    ) -> None:
        self._tracer = trace.get_tracer("aimesh.client", tracer_provider=tracer_provider)
        self._timeouts = dict(timeouts or {})  # by full method path

    def _prepare(
        self, details: grpc.aio.ClientCallDetails
    ) -> tuple[grpc.aio.ClientCallDetails, trace.Span]:
        metadata = list(details.metadata or ())
        method = details.method.decode() if isinstance(details.method, bytes) else details.method
        timeout = details.timeout if details.timeout is not None else self._timeouts.get(method)
        scope = call_scope()
        if scope is not None:
            present = {key for key, _ in metadata}
            metadata.extend(item for item in scope.forward if item[0] not in present)
            if scope.deadline is not None:
                remaining = max(scope.deadline - time.monotonic(), 0.001)
                timeout = remaining if timeout is None else min(timeout, remaining)
        span = self._tracer.start_span(method.lstrip("/"), kind=SpanKind.CLIENT)
        carrier: dict[str, str] = {}
        current = otel_context.get_current()
        if span.get_span_context().is_valid:  # a no-op tracer passes the caller's trace on
            current = trace.set_span_in_context(span, current)
        propagator.inject(carrier, context=current)
        metadata.extend(carrier.items())
        return (
            grpc.aio.ClientCallDetails(
                method=details.method,
                timeout=timeout,
                metadata=grpc.aio.Metadata(*metadata),
                credentials=details.credentials,
                wait_for_ready=details.wait_for_ready,
            ),
            span,
        )

    async def intercept_unary_unary(self, continuation, client_call_details, request):  # type: ignore[no-untyped-def]
        details, span = self._prepare(client_call_details)
        call = await continuation(details, request)
        try:
            await call
        except grpc.aio.AioRpcError as error:
            _end(span, error.code())
        else:
            _end(span, grpc.StatusCode.OK)
        return call

    async def intercept_unary_stream(self, continuation, client_call_details, request):  # type: ignore[no-untyped-def]
        details, span = self._prepare(client_call_details)
        call = await continuation(details, request)
        call.add_done_callback(lambda _: span.end())
        return call

    async def intercept_stream_unary(self, continuation, client_call_details, request_iterator):  # type: ignore[no-untyped-def]
        details, span = self._prepare(client_call_details)
        call = await continuation(details, request_iterator)
        call.add_done_callback(lambda _: span.end())
        return call

    async def intercept_stream_stream(self, continuation, client_call_details, request_iterator):  # type: ignore[no-untyped-def]
        details, span = self._prepare(client_call_details)
        call = await continuation(details, request_iterator)
        call.add_done_callback(lambda _: span.end())
        return call


def _end(span: trace.Span, code: grpc.StatusCode) -> None:
    span.set_attribute("rpc.grpc.status_code", code.name)
    if code is not grpc.StatusCode.OK:
        span.set_status(Status(StatusCode.ERROR, code.name))
    span.end()


def connect(
    target: str,
    service: ServiceDescriptor,
    *,
    default_timeout_s: float = 5.0,
    timeouts: Mapping[str, float] | None = None,
    tracer_provider: TracerProvider | None = None,
    max_message_bytes: int = 4 * 1024 * 1024,
    retry_throttling: Mapping[str, float] | None = None,
    max_attempts: int | None = None,
    max_reconnect_backoff_s: float | None = None,
) -> grpc.aio.Channel:
    """An insecure channel to `target`: inside the mesh, Istio's sidecars add mTLS.

    `retry_throttling` replaces RETRY_THROTTLING for this dependency (gRFC A6's
    maxTokens and tokenRatio), `max_attempts` the retry policy's (gRPC allows at
    most 5). `max_reconnect_backoff_s` caps the wait between
    connection attempts to a backend that is down (gRPC's default grows to
    120 s: after a 15 s outage the next attempt can be 6 s away); set it near a
    circuit breaker's reset timeout, or the breaker's half-open trial fails on
    a channel that has not yet reconnected to a backend that is back. Inside
    the mesh the channel's peer is the local sidecar, so this matters for
    direct connections (local runs, compose).
    """
    config = service_config(service, retry_throttling=retry_throttling, max_attempts=max_attempts)
    per_call = method_timeouts(service, default_timeout_s=default_timeout_s, timeouts=timeouts)
    options = [
        ("grpc.service_config", json.dumps(config)),
        ("grpc.enable_retries", 1),
        ("grpc.keepalive_time_ms", 30_000),
        ("grpc.keepalive_timeout_ms", 10_000),
        ("grpc.max_receive_message_length", max_message_bytes),
        ("grpc.max_send_message_length", max_message_bytes),
    ]
    if max_reconnect_backoff_s is not None:
        backoff_ms = max(1, round(max_reconnect_backoff_s * 1000))
        options += [
            ("grpc.max_reconnect_backoff_ms", backoff_ms),
            ("grpc.initial_reconnect_backoff_ms", min(1000, backoff_ms)),
        ]
    return grpc.aio.insecure_channel(
        target, options=options, interceptors=[PropagatingInterceptor(tracer_provider, per_call)]
    )
