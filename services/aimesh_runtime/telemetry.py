"""JSON logs that carry trace ids, and OpenTelemetry tracing exported over OTLP."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import sys
import time
from typing import Any

from opentelemetry import trace
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor
from opentelemetry.sdk.trace.sampling import ParentBased, TraceIdRatioBased

from aimesh_runtime import context

_STANDARD_ATTRIBUTES = frozenset(
    vars(logging.LogRecord("", 0, "", 0, "", None, None)).keys() | {"message", "asctime"}
)


def _log_ids() -> tuple[str | None, str | None]:
    """The trace and span ids a log line carries.

    The current span's when there is one (recording, or the caller's remote
    context). Inside an RPC with neither (no OTLP endpoint, no traceparent from
    the caller) the ids are made for the log alone: the trace id is derived from
    the request id, which every hop forwards, so lines of one request share it
    across services; the span id is this call's. Outside any RPC (start-up,
    background jobs) both are null.
    """
    span_context = trace.get_current_span().get_span_context()
    if span_context.is_valid:
        return format(span_context.trace_id, "032x"), format(span_context.span_id, "016x")
    scope = context.call_scope()
    if scope is None:
        return None, None
    if scope.log_ids is None:
        derived = hashlib.blake2b(scope.request_id.encode(), digest_size=16).hexdigest()
        scope.log_ids = (derived, os.urandom(8).hex())
    return scope.log_ids


class JsonFormatter(logging.Formatter):
    """One JSON object a line; every line has trace_id and span_id (null outside an RPC)."""

    def __init__(self, service: str) -> None:
        super().__init__()
        self._service = service

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname,
            "service": self._service,
            "logger": record.name,
            "message": record.getMessage(),
        }
        entry["trace_id"], entry["span_id"] = _log_ids()
        request_id = context.request_id()
        if request_id:
            entry["request_id"] = request_id
        for key, value in vars(record).items():
            if key not in _STANDARD_ATTRIBUTES and value is not None:
                entry[key] = value
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)


def configure_logging(service: str, level: str) -> None:
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(JsonFormatter(service))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())


def tracer_provider(service: str, otlp_endpoint: str, sample_ratio: float) -> trace.TracerProvider:
    """An SDK provider exporting over OTLP, or a no-op one when there is nowhere to export.

    Recording spans that nobody exports costs about a fifth of a cheap RPC's
    time; without an endpoint the pipeline still carries the caller's trace
    context through logs and downstream calls, it just adds no spans of its own.
    """
    if not otlp_endpoint:
        return trace.NoOpTracerProvider()
    provider = TracerProvider(
        resource=Resource.create({"service.name": f"aimesh-{service}"}),
        sampler=ParentBased(TraceIdRatioBased(sample_ratio)),
    )
    from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

    provider.add_span_processor(
        BatchSpanProcessor(OTLPSpanExporter(endpoint=otlp_endpoint, insecure=True))
    )
    return provider
