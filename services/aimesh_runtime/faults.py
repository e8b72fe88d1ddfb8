"""Fault injection for chaos tests on a laptop, with Istio's semantics.

Configured by environment (unset means no interceptor at all, so no cost):

- ``AIMESH_FAULT_DELAY=2s@10%``: hold 10% of calls for 2 s before the handler
  runs (``150ms``, ``1.5s``; the percentage defaults to 100%).
- ``AIMESH_FAULT_ABORT=UNAVAILABLE@10%``: answer 10% of calls with that gRPC
  status instead of running the handler.
- ``AIMESH_FAULT_HEADER=x-aimesh-chaos=on``: only calls whose metadata carries
  this exact header value are eligible (Istio's ``match.headers.exact``).
- ``AIMESH_FAULT_METHODS=/aimesh.search.v1.``: only methods starting with one
  of these comma-separated prefixes (Istio's ``match.uri.prefix``).

As in Istio's HTTPFaultInjection, delay and abort are sampled independently
and a delayed call may then also be aborted; the caller's deadline still
applies while it waits. Health and reflection are never faulted: kubelet
probes do not pass through a VirtualService either. The interceptor sits in
front of the server pipeline, so an injected abort never reaches the handler,
the way a sidecar's abort never reaches the application.
"""

from __future__ import annotations

import asyncio
import inspect
import random
import re
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any

import grpc

from aimesh_runtime.auth import INFRASTRUCTURE_PREFIXES
from aimesh_runtime.config import ConfigError

DELAY_ENV = "AIMESH_FAULT_DELAY"
ABORT_ENV = "AIMESH_FAULT_ABORT"
HEADER_ENV = "AIMESH_FAULT_HEADER"
METHODS_ENV = "AIMESH_FAULT_METHODS"

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s)\s*$")


@dataclass(frozen=True)
class FaultConfig:
    delay_s: float = 0.0
    delay_percent: float = 0.0
    abort_code: grpc.StatusCode | None = None
    abort_percent: float = 0.0
    header: tuple[str, str] | None = None
    methods: tuple[str, ...] = ()

    @property
    def active(self) -> bool:
        return (self.delay_s > 0 and self.delay_percent > 0) or (
            self.abort_code is not None and self.abort_percent > 0
        )


def _split_percent(raw: str, variable: str) -> tuple[str, float]:
    value, at, percent = raw.partition("@")
    if not at:
        return value.strip(), 100.0
    try:
        share = float(percent.strip().removesuffix("%"))
    except ValueError:
        raise ConfigError(f"{variable}: {percent!r} is not a percentage") from None
    if not 0 <= share <= 100:
        raise ConfigError(f"{variable}: percentage must be between 0 and 100")
    return value.strip(), share


def parse_duration(raw: str, variable: str = DELAY_ENV) -> float:
    found = _DURATION.match(raw)
    if found is None:
        raise ConfigError(f"{variable}: {raw!r} is not a duration like 2s or 150ms")
    number = float(found.group(1))
    return number / 1000 if found.group(2) == "ms" else number


def load_faults(environ: Mapping[str, str]) -> FaultConfig:
    """The fault configuration from the environment; ConfigError names a bad variable."""
    delay_s = delay_percent = abort_percent = 0.0
    abort_code: grpc.StatusCode | None = None
    header: tuple[str, str] | None = None
    if raw := environ.get(DELAY_ENV, "").strip():
        value, delay_percent = _split_percent(raw, DELAY_ENV)
        delay_s = parse_duration(value)
    if raw := environ.get(ABORT_ENV, "").strip():
        value, abort_percent = _split_percent(raw, ABORT_ENV)
        code = grpc.StatusCode.__members__.get(value.upper())
        if code is None or code is grpc.StatusCode.OK:
            raise ConfigError(f"{ABORT_ENV}: {value!r} is not a gRPC error code name")
        abort_code = code
    if raw := environ.get(HEADER_ENV, "").strip():
        name, equals, expected = raw.partition("=")
        if not equals or not name.strip():
            raise ConfigError(f"{HEADER_ENV}: expected name=value, got {raw!r}")
        header = (name.strip().lower(), expected.strip())
    methods = tuple(m.strip() for m in environ.get(METHODS_ENV, "").split(",") if m.strip())
    return FaultConfig(delay_s, delay_percent, abort_code, abort_percent, header, methods)


Handler = Any  # grpc.RpcMethodHandler; grpc ships no types


class FaultInjector(grpc.aio.ServerInterceptor):  # type: ignore[misc]
    def __init__(self, config: FaultConfig, rng: random.Random | None = None) -> None:
        self.config = config
        self._random = (rng or random.Random()).random
        self.injected_delays = 0
        self.injected_aborts = 0

    def decide(self, method: str, metadata: Mapping[str, Any]) -> tuple[float, bool]:
        """(delay in seconds, abort?) for one call."""
        config = self.config
        if method.startswith(INFRASTRUCTURE_PREFIXES):
            return 0.0, False
        if config.methods and not method.startswith(config.methods):
            return 0.0, False
        if config.header is not None and metadata.get(config.header[0]) != config.header[1]:
            return 0.0, False
        delay = 0.0
        if config.delay_s > 0 and self._random() * 100 < config.delay_percent:
            delay = config.delay_s
        abort = config.abort_code is not None and self._random() * 100 < config.abort_percent
        return delay, abort

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[Handler]],
        details: grpc.HandlerCallDetails,
    ) -> Handler:
        handler = await continuation(details)
        if handler is None:
            return handler
        metadata = {k: v for k, v in details.invocation_metadata or () if isinstance(v, str)}
        delay, abort = self.decide(details.method, metadata)
        if not delay and not abort:
            return handler
        self.injected_delays += delay > 0
        self.injected_aborts += abort
        return _faulted(handler, delay, self.config.abort_code if abort else None)


def _faulted(handler: Handler, delay_s: float, code: grpc.StatusCode | None) -> Handler:
    async def inject(context: grpc.aio.ServicerContext) -> None:
        if delay_s:
            await asyncio.sleep(delay_s)
        if code is not None:
            await context.abort(code, f"fault injected: {code.name}")

    codecs = {
        "request_deserializer": handler.request_deserializer,
        "response_serializer": handler.response_serializer,
    }
    if handler.unary_unary or handler.stream_unary:
        behavior = handler.unary_unary or handler.stream_unary

        async def unary(request: Any, context: grpc.aio.ServicerContext) -> Any:
            await inject(context)
            return await behavior(request, context)

        make = (
            grpc.unary_unary_rpc_method_handler
            if handler.unary_unary
            else grpc.stream_unary_rpc_method_handler
        )
        return make(unary, **codecs)

    streaming = handler.unary_stream or handler.stream_stream

    async def stream(request: Any, context: grpc.aio.ServicerContext) -> Any:
        await inject(context)
        result = streaming(request, context)
        if inspect.isasyncgen(result):
            async for response in result:
                yield response
        else:  # a handler that writes with context.write()
            await result

    make = (
        grpc.unary_stream_rpc_method_handler
        if handler.unary_stream
        else grpc.stream_stream_rpc_method_handler
    )
    return make(stream, **codecs)


def fault_interceptors(environ: Mapping[str, str]) -> list[grpc.aio.ServerInterceptor]:
    """[FaultInjector] when faults are configured, else nothing (no per-call cost)."""
    config = load_faults(environ)
    return [FaultInjector(config)] if config.active else []
