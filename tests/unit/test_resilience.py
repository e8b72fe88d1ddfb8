"""Circuit breaker, rate limiter, retry service config and deadline propagation."""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

import grpc
import pytest
from opentelemetry.sdk.trace import TracerProvider

from aimesh.chat.v1 import chat_service_pb2
from aimesh.user.v1 import user_service_pb2
from aimesh_runtime.client import PropagatingInterceptor, method_timeouts, service_config
from aimesh_runtime.context import CallScope, current_call
from aimesh_runtime.ratelimit import RateLimiter
from aimesh_runtime.resilience import BreakerOpen, BreakerState, CircuitBreaker


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def unavailable() -> grpc.aio.AioRpcError:
    return grpc.aio.AioRpcError(
        grpc.StatusCode.UNAVAILABLE, grpc.aio.Metadata(), grpc.aio.Metadata()
    )


def invalid() -> grpc.aio.AioRpcError:
    return grpc.aio.AioRpcError(
        grpc.StatusCode.INVALID_ARGUMENT, grpc.aio.Metadata(), grpc.aio.Metadata()
    )


async def fail_with(error: BaseException) -> None:
    raise error


async def succeed() -> str:
    return "ok"


async def test_breaker_opens_after_threshold_and_stops_calling() -> None:
    clock = Clock()
    breaker = CircuitBreaker("dep", failure_threshold=3, reset_timeout_s=5, clock=clock)
    for _ in range(3):
        with pytest.raises(grpc.aio.AioRpcError):
            await breaker.call(lambda: fail_with(unavailable()))
    assert breaker.state is BreakerState.OPEN
    calls = 0

    async def counted() -> str:
        nonlocal calls
        calls += 1
        return "ok"

    with pytest.raises(BreakerOpen) as refused:
        await breaker.call(counted)
    assert calls == 0 and 0 < refused.value.retry_after_s <= 5


async def test_half_open_trial_closes_on_success_and_reopens_on_failure() -> None:
    clock = Clock()
    breaker = CircuitBreaker("dep", failure_threshold=1, reset_timeout_s=5, clock=clock)
    with pytest.raises(grpc.aio.AioRpcError):
        await breaker.call(lambda: fail_with(unavailable()))
    clock.now = 5.0
    assert breaker.state is BreakerState.HALF_OPEN
    with pytest.raises(grpc.aio.AioRpcError):
        await breaker.call(lambda: fail_with(unavailable()))
    assert breaker.state is BreakerState.OPEN
    clock.now = 10.0
    assert await breaker.call(succeed) == "ok"
    assert breaker.state is BreakerState.CLOSED


async def test_half_open_admits_one_trial_at_a_time() -> None:
    clock = Clock()
    breaker = CircuitBreaker("dep", failure_threshold=1, reset_timeout_s=1, clock=clock)
    with pytest.raises(grpc.aio.AioRpcError):
        await breaker.call(lambda: fail_with(unavailable()))
    clock.now = 1.0
    gate = asyncio.Event()

    async def slow() -> str:
        await gate.wait()
        return "ok"

    trial = asyncio.ensure_future(breaker.call(slow))
    await asyncio.sleep(0)
    with pytest.raises(BreakerOpen):
        await breaker.call(succeed)
    gate.set()
    assert await trial == "ok"


async def test_caller_errors_do_not_trip_the_breaker() -> None:
    breaker = CircuitBreaker("dep", failure_threshold=2)
    for _ in range(5):
        with pytest.raises(grpc.aio.AioRpcError):
            await breaker.call(lambda: fail_with(invalid()))
    assert breaker.state is BreakerState.CLOSED


async def test_fallback_gets_the_cause() -> None:
    clock = Clock()
    breaker = CircuitBreaker("dep", failure_threshold=1, reset_timeout_s=60, clock=clock)
    causes: list[str] = []

    async def fallback(error: BaseException) -> str:
        causes.append(type(error).__name__)
        return "degraded"

    assert await breaker.call_or_fallback(lambda: fail_with(unavailable()), fallback) == "degraded"
    assert await breaker.call_or_fallback(succeed, fallback) == "degraded"
    assert causes == ["AioRpcError", "BreakerOpen"]
    with pytest.raises(grpc.aio.AioRpcError):
        await CircuitBreaker("other").call_or_fallback(lambda: fail_with(invalid()), fallback)


def test_rate_limiter_allows_burst_then_asks_to_wait() -> None:
    limiter = RateLimiter(rate=10.0, burst=3)
    assert [limiter.acquire("a") for _ in range(3)] == [0.0, 0.0, 0.0]
    wait = limiter.acquire("a")
    assert 0 < wait <= 0.1
    assert limiter.acquire("b") == 0.0, "each principal has its own bucket"


def test_rate_limiter_forgets_oldest_keys_beyond_capacity() -> None:
    limiter = RateLimiter(rate=1.0, burst=1, max_keys=2)
    limiter.acquire("a")
    limiter.acquire("b")
    limiter.acquire("c")
    assert limiter.acquire("a") == 0.0, "a was evicted, so it starts with a full bucket"


def test_service_config_retries_only_idempotent_unary_methods() -> None:
    service = user_service_pb2.DESCRIPTOR.services_by_name["UserService"]
    config = service_config(service)
    by_method = {entry["name"][0]["method"]: entry for entry in config["methodConfig"]}
    assert "retryPolicy" in by_method["GetUser"]  # NO_SIDE_EFFECTS
    assert "retryPolicy" in by_method["RevokeApiKey"]  # IDEMPOTENT
    assert "retryPolicy" not in by_method["Register"]  # a create without a key
    # grpcio applies service-config timeouts ~1.5 s early: they are set per call instead.
    assert all("timeout" not in entry for entry in config["methodConfig"])
    timeouts = method_timeouts(service, timeouts={"Login": 2.0})
    assert timeouts["/aimesh.user.v1.UserService/Login"] == 2.0
    assert timeouts["/aimesh.user.v1.UserService/GetUser"] == 5.0
    assert by_method["GetUser"]["retryPolicy"]["retryableStatusCodes"] == ["UNAVAILABLE"]
    assert config["retryThrottling"] == {"maxTokens": 10, "tokenRatio": 0.1}
    tuned = service_config(service, retry_throttling={"maxTokens": 10, "tokenRatio": 0.3})
    assert tuned["retryThrottling"] == {"maxTokens": 10, "tokenRatio": 0.3}
    more = service_config(service, max_attempts=5)
    assert {e["name"][0]["method"]: e for e in more["methodConfig"]}["GetUser"]["retryPolicy"][
        "maxAttempts"
    ] == 5
    assert by_method["GetUser"]["retryPolicy"]["maxAttempts"] == 4  # the default is untouched
    json.dumps(config)  # grpc takes it as JSON


def test_streaming_methods_get_no_timeout_or_retry() -> None:
    service = chat_service_pb2.DESCRIPTOR.services_by_name["ChatService"]
    config = service_config(service)
    stream = next(e for e in config["methodConfig"] if e["name"][0]["method"] == "StreamChat")
    assert "timeout" not in stream and "retryPolicy" not in stream
    assert "/aimesh.chat.v1.ChatService/StreamChat" not in method_timeouts(service)


async def test_interceptor_gives_a_call_without_timeout_its_method_timeout() -> None:
    seen: dict[str, Any] = {}

    async def continuation(details: grpc.aio.ClientCallDetails, request: object) -> Any:
        seen[details.method] = details.timeout
        raise RuntimeError("stop here")

    interceptor = PropagatingInterceptor(TracerProvider(), {"/pkg.S/M": 1.0})
    for method, timeout in (("/pkg.S/M", None), ("/pkg.S/M2", None), ("/pkg.S/N", 0.2)):
        details = grpc.aio.ClientCallDetails(method, timeout, grpc.aio.Metadata(), None, None)
        with pytest.raises(RuntimeError):
            await interceptor.intercept_unary_unary(continuation, details, object())
    assert seen == {"/pkg.S/M": 1.0, "/pkg.S/M2": None, "/pkg.S/N": 0.2}


async def test_outgoing_call_gets_remaining_deadline_and_caller_metadata() -> None:
    seen: dict[str, Any] = {}

    async def continuation(details: grpc.aio.ClientCallDetails, request: object) -> Any:
        seen["timeout"] = details.timeout
        seen["metadata"] = dict(details.metadata)
        raise RuntimeError("stop here")

    scope = CallScope(
        method="/x/Y",
        request_id="rid-1",
        deadline=time.monotonic() + 0.5,
        forward=[("x-request-id", "rid-1"), ("authorization", "Bearer t")],
    )
    token = current_call.set(scope)
    try:
        details = grpc.aio.ClientCallDetails("/pkg.S/M", 30.0, grpc.aio.Metadata(), None, None)
        with pytest.raises(RuntimeError):
            await PropagatingInterceptor(TracerProvider()).intercept_unary_unary(
                continuation, details, object()
            )
    finally:
        current_call.reset(token)
    assert 0.4 < seen["timeout"] <= 0.5
    assert seen["metadata"]["authorization"] == "Bearer t"
    assert seen["metadata"]["x-request-id"] == "rid-1"
    assert "traceparent" in seen["metadata"]


async def test_a_cancelled_trial_neither_closes_nor_reopens() -> None:
    clock = Clock()
    breaker = CircuitBreaker("dep", failure_threshold=1, reset_timeout_s=1, clock=clock)
    with pytest.raises(grpc.aio.AioRpcError):
        await breaker.call(lambda: fail_with(unavailable()))
    clock.now = 1.0

    async def hang() -> str:
        await asyncio.sleep(60)
        return "late"

    trial = asyncio.ensure_future(breaker.call(hang))
    await asyncio.sleep(0)
    trial.cancel()
    with pytest.raises(asyncio.CancelledError):
        await trial
    assert breaker.state is BreakerState.HALF_OPEN, "a hung dependency is not proven up"
    assert await breaker.call(succeed) == "ok", "the trial slot is free again"
    assert breaker.state is BreakerState.CLOSED


async def test_a_call_the_dependency_cancelled_gets_the_fallback() -> None:
    # A server that stops resets streams that raced its GOAWAY: the caller sees
    # CANCELLED, which it never asked for, so the answer must be the fallback.
    breaker = CircuitBreaker("dep", failure_threshold=2)
    cancelled = grpc.aio.AioRpcError(
        grpc.StatusCode.CANCELLED, grpc.aio.Metadata(), grpc.aio.Metadata()
    )
    causes: list[BaseException] = []

    async def fallback(cause: BaseException) -> str:
        causes.append(cause)
        return "degraded"

    for _ in range(2):
        assert await breaker.call_or_fallback(lambda: fail_with(cancelled), fallback) == "degraded"
    assert causes == [cancelled, cancelled]
    assert breaker.state is BreakerState.OPEN


async def test_rate_limited_answers_do_not_trip_the_breaker() -> None:
    breaker = CircuitBreaker("dep", failure_threshold=2)
    exhausted = grpc.aio.AioRpcError(
        grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.aio.Metadata(), grpc.aio.Metadata()
    )
    for _ in range(5):
        with pytest.raises(grpc.aio.AioRpcError):
            await breaker.call(lambda: fail_with(exhausted))
    assert breaker.state is BreakerState.CLOSED


async def test_concurrent_first_tokens_share_one_jwks_fetch() -> None:
    from aimesh_runtime.auth import TokenVerifier
    from tests.tokens import claims, jwks, signed

    fetches = 0

    async def slow_jwks() -> Any:
        nonlocal fetches
        fetches += 1
        await asyncio.sleep(0.05)
        return await jwks()

    verifier = TokenVerifier(
        slow_jwks, issuer="aimesh-user", audience="aimesh", max_lifetime_s=3600
    )
    tokens = [signed(claims(sub=f"u{i}")) for i in range(20)]
    principals = await asyncio.gather(*(verifier.verify(token) for token in tokens))
    assert [p.subject for p in principals] == [f"u{i}" for i in range(20)]
    assert fetches == 1


async def test_a_first_caller_giving_up_does_not_cancel_the_jwks_fetch() -> None:
    """The first request after a (re)start fetches the keys; its deadline passing
    used to cancel the fetch, and then every token was "signed by an unknown key"
    for min_refetch_s (10 s), though the issuer was up."""
    from aimesh_runtime.auth import TokenVerifier
    from tests.tokens import claims, jwks, signed

    fetches = 0

    async def slow_jwks() -> Any:
        nonlocal fetches
        fetches += 1
        await asyncio.sleep(0.2)
        return await jwks()

    verifier = TokenVerifier(
        slow_jwks, issuer="aimesh-user", audience="aimesh", max_lifetime_s=3600
    )
    with pytest.raises(TimeoutError):  # the first request's deadline passes mid-fetch
        await asyncio.wait_for(verifier.verify(signed(claims(sub="first"))), timeout=0.05)
    principal = await verifier.verify(signed(claims(sub="second")))
    assert principal.subject == "second"
    assert fetches == 1
