"""JSON log lines: every one carries trace_id and span_id."""

from __future__ import annotations

import hashlib
import io
import json
import logging
from collections.abc import Iterator

import pytest
from opentelemetry.sdk.trace import TracerProvider

from aimesh_runtime.context import CallScope, current_call
from aimesh_runtime.telemetry import JsonFormatter


@pytest.fixture
def lines() -> Iterator[io.StringIO]:
    out = io.StringIO()
    handler = logging.StreamHandler(out)
    handler.setFormatter(JsonFormatter("search"))
    logger = logging.getLogger("test.json")
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False
    yield out
    logger.removeHandler(handler)


def entries(out: io.StringIO) -> list[dict[str, object]]:
    return [json.loads(line) for line in out.getvalue().splitlines()]


def test_a_recording_span_gives_its_ids(lines: io.StringIO) -> None:
    tracer = TracerProvider().get_tracer("t")
    with tracer.start_as_current_span("work") as span:
        logging.getLogger("test.json").info("inside %s", "span", extra={"rows": 3})
    (entry,) = entries(lines)
    context = span.get_span_context()
    assert entry["trace_id"] == format(context.trace_id, "032x")
    assert entry["span_id"] == format(context.span_id, "016x")
    assert entry["message"] == "inside span" and entry["rows"] == 3
    assert entry["service"] == "search" and entry["level"] == "INFO"


def test_an_rpc_without_tracing_still_has_ids_shared_by_its_request(lines: io.StringIO) -> None:
    log = logging.getLogger("test.json")
    token = current_call.set(CallScope(method="/m", request_id="req-42"))
    try:
        log.info("one")
        log.warning("two")
    finally:
        current_call.reset(token)
    token = current_call.set(CallScope(method="/next-hop", request_id="req-42"))
    try:
        log.info("downstream")
    finally:
        current_call.reset(token)
    first, second, downstream = entries(lines)
    expected = hashlib.blake2b(b"req-42", digest_size=16).hexdigest()
    assert first["trace_id"] == second["trace_id"] == downstream["trace_id"] == expected
    assert first["span_id"] == second["span_id"] != downstream["span_id"]
    assert len(str(first["span_id"])) == 16 and first["request_id"] == "req-42"


def test_lines_outside_any_rpc_still_have_the_keys(lines: io.StringIO) -> None:
    try:
        raise ValueError("boom")
    except ValueError:
        logging.getLogger("test.json").exception("start-up failed")
    (entry,) = entries(lines)
    assert "trace_id" in entry and entry["trace_id"] is None
    assert "span_id" in entry and entry["span_id"] is None
    assert "ValueError: boom" in str(entry["exception"])
