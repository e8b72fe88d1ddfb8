"""The server pipeline: one interceptor that runs every cross-cutting step.

For each RPC, in order: request id and call scope, trace span (context from
the caller's metadata), metrics, authentication and per-method scopes,
per-principal rate limit, protovalidate rules, deadline capture, then the
handler; domain errors become a status with details, and anything unexpected
becomes INTERNAL. The steps share one wrapper per method, built once and
cached, because each extra grpc.aio interceptor layer costs a coroutine and a
handler object on every call.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
import os
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any

import asyncpg
import grpc
import protovalidate
from google.protobuf.message import DecodeError
from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.trace import SpanKind, Status, StatusCode, Tracer
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from aimesh_runtime.auth import (
    ANONYMOUS,
    INFRASTRUCTURE_PREFIXES,
    ApiKeyAuthenticator,
    MethodPolicy,
    Principal,
    TokenVerifier,
    authorize,
)
from aimesh_runtime.context import CallScope, current_call
from aimesh_runtime.errors import (
    FieldViolation,
    InvalidArgument,
    ResourceExhausted,
    ServiceError,
    Unauthenticated,
    internal_status,
)
from aimesh_runtime.metrics import MethodMetrics, RpcMetrics
from aimesh_runtime.ownership import OwnershipGuard
from aimesh_runtime.ratelimit import RateLimiter

log = logging.getLogger("aimesh.rpc")
propagator = TraceContextTextMapPropagator()

# Server span is an error for these codes (OpenTelemetry RPC conventions).
SERVER_FAULT_CODES = frozenset(
    {"UNKNOWN", "DEADLINE_EXCEEDED", "UNIMPLEMENTED", "INTERNAL", "UNAVAILABLE", "DATA_LOSS"}
)
MAX_VIOLATIONS = 20
# PostgreSQL text cannot hold NUL (or bytes invalid in the database encoding);
# protobuf strings can. Such input is the caller's error, wherever it is stored.
UNSTORABLE_TEXT = (
    asyncpg.exceptions.CharacterNotInRepertoireError,
    asyncpg.exceptions.UntranslatableCharacterError,
)


def render_field_path(violation: protovalidate.Violation) -> str:
    """'user.roles[1]' from a protovalidate violation's field path."""
    parts: list[str] = []
    path = violation.proto.field
    for element in path.elements if path is not None else ():
        name = element.field_name
        subscript = element.subscript
        if subscript is not None:
            value = subscript.value
            name += f'["{value}"]' if isinstance(value, str) else f"[{value}]"
        parts.append(name)
    return ".".join(parts)


@dataclass
class MethodInfo:
    name: str
    span_name: str
    policy: MethodPolicy | None
    metrics: MethodMetrics
    span_attributes: dict[str, str]


class ServerPipeline(grpc.aio.ServerInterceptor):
    def __init__(
        self,
        *,
        policies: Mapping[str, MethodPolicy],
        metrics: RpcMetrics,
        tracer: Tracer,
        verifier: TokenVerifier | None,
        api_keys: ApiKeyAuthenticator | None,
        limiter: RateLimiter,
        anonymous_limiter: RateLimiter | None = None,
        trust_forwarded_for: bool = False,
        trusted_proxy_hops: int = 1,
        slow_call_s: float = 1.0,
        ownership: OwnershipGuard | None = None,
    ) -> None:
        self._policies = policies
        self._metrics = metrics
        self._tracer = tracer
        self._verifier = verifier
        self._api_keys = api_keys
        self._limiter = limiter
        # Calls without a principal (login, registration, bad credentials) are
        # limited per client address, much tighter: each may cost a password hash.
        self._anonymous_limiter = anonymous_limiter or RateLimiter(rate=10.0, burst=30)
        self._trust_forwarded_for = trust_forwarded_for
        self._trusted_proxy_hops = trusted_proxy_hops
        self._slow_call_s = slow_call_s
        # Whose objects each method may touch (issue 20); checked after validation.
        self._ownership = ownership
        self._validator = protovalidate.Validator()
        self._tracing = not isinstance(tracer, trace.NoOpTracer)
        self._wrapped: dict[str, grpc.RpcMethodHandler] = {}

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        """As an interceptor (for servers whose handlers were not wrapped when
        they were registered: see `wrap_handlers`)."""
        method = handler_call_details.method
        wrapped = self._wrapped.get(method)
        if wrapped is not None:
            return wrapped
        handler = await continuation(handler_call_details)
        if handler is None:  # unknown method: grpc answers UNIMPLEMENTED
            return handler
        return self.wrapped(method, handler)

    def wrapped(self, method: str, handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
        """`handler` of `method` (/package.Service/Method) with every step in front."""
        wrapped = self._wrapped.get(method)
        if wrapped is None:
            wrapped = self._wrapped[method] = self._wrap(method, handler)
        return wrapped

    def wrap_handlers(
        self, service: str, handlers: Mapping[str, grpc.RpcMethodHandler]
    ) -> dict[str, grpc.RpcMethodHandler]:
        """A service's handlers (by method name) with the pipeline built in, for
        registering them on the server: then no interceptor runs per call."""
        return {
            name: self.wrapped(f"/{service}/{name}", handler) for name, handler in handlers.items()
        }

    def _wrap(self, method: str, handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
        service, _, name = method.lstrip("/").partition("/")
        policy = self._policies.get(method)
        if policy is None and method.startswith(INFRASTRUCTURE_PREFIXES):
            policy = MethodPolicy(public=True, scopes=())
        info = MethodInfo(
            name=method,
            span_name=method.lstrip("/"),
            policy=policy,
            metrics=self._metrics.for_method(method),
            span_attributes={"rpc.system": "grpc", "rpc.service": service, "rpc.method": name},
        )
        codecs = {
            "request_deserializer": _tolerant(handler.request_deserializer),
            "response_serializer": handler.response_serializer,
        }
        if handler.unary_unary:
            return grpc.unary_unary_rpc_method_handler(
                self._unary(info, handler.unary_unary), **codecs
            )
        if handler.unary_stream:
            return grpc.unary_stream_rpc_method_handler(
                self._server_stream(info, handler.unary_stream, validate_each=False), **codecs
            )
        if handler.stream_unary:
            return grpc.stream_unary_rpc_method_handler(
                self._unary(info, handler.stream_unary, validate_each=True), **codecs
            )
        return grpc.stream_stream_rpc_method_handler(
            self._server_stream(info, handler.stream_stream, validate_each=True), **codecs
        )

    def _unary(
        self, info: MethodInfo, behavior: Callable[..., Any], validate_each: bool = False
    ) -> Callable[[Any, grpc.aio.ServicerContext], Awaitable[Any]]:
        async def handle(request: Any, context: grpc.aio.ServicerContext) -> Any:
            call, request = await self._open(info, request, context, validate_each)
            try:
                response = await behavior(request, context)
            except BaseException as error:
                await self._fail(call, error, context)
                raise
            call.finish("OK", context)
            return response

        return handle

    def _server_stream(
        self, info: MethodInfo, behavior: Callable[..., Any], validate_each: bool
    ) -> Callable[[Any, grpc.aio.ServicerContext], AsyncIterator[Any]]:
        async def handle(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
            call, request = await self._open(info, request, context, validate_each)
            try:
                result = behavior(request, context)
                if inspect.isasyncgen(result):
                    async for response in result:
                        yield response
                else:  # a handler that writes with context.write()
                    await result
            except BaseException as error:
                await self._fail(call, error, context)
                raise
            call.finish("OK", context)

        return handle

    async def _open(
        self,
        info: MethodInfo,
        request: Any,
        context: grpc.aio.ServicerContext,
        streaming_request: bool,
    ) -> tuple[_Call, Any]:
        """Every step before the handler; a refusal aborts the RPC with its status."""
        call, metadata = self._begin(info, context)
        try:
            principal = self._known_principal(info, metadata)
            if principal is None:
                try:
                    principal = await self._authenticate(metadata)
                except Unauthenticated:
                    # Guessing credentials costs the guesser its anonymous budget.
                    self._limit(self._anonymous_limiter, self._client(metadata, context))
                    raise
            self._admit(info, call.scope, principal, metadata, context)
            if streaming_request:  # each message is checked as the handler reads it
                request = self._validated_stream(request, info.name, principal)
            else:
                self._validate(request)
                await self._check_ownership(info.name, principal, request)
        except BaseException as error:
            await self._fail(call, error, context)
            raise
        return call, request

    async def _validated_stream(
        self, requests: AsyncIterator[Any], method: str, principal: Principal
    ) -> AsyncIterator[Any]:
        async for request in requests:
            self._validate(request)
            await self._check_ownership(method, principal, request)
            yield request

    async def _check_ownership(self, method: str, principal: Principal, request: Any) -> None:
        if self._ownership is not None:
            await self._ownership.check(method, principal, request)

    def _validate(self, request: Any) -> None:
        if isinstance(request, Undecodable):
            raise InvalidArgument(
                f"request is not a valid {request.type_name} message",
                [FieldViolation("request", request.reason)],
            )
        violations = self._validator.collect_violations(request)
        if violations:
            # Details travel in trailers, which gRPC caps at 16 KiB: a bad 1000-item
            # batch must still read as INVALID_ARGUMENT, so the list is bounded.
            fields = [
                FieldViolation(render_field_path(v) or v.proto.rule_id, v.proto.message)
                for v in violations[:MAX_VIOLATIONS]
            ]
            summary = "; ".join(f"{f.field}: {f.description}" for f in fields[:3])
            if len(violations) > 3:
                summary += f"; and {len(violations) - 3} more"
            raise InvalidArgument(f"invalid request: {summary}", fields)

    def _begin(
        self, info: MethodInfo, context: grpc.aio.ServicerContext
    ) -> tuple[_Call, dict[str, str]]:
        """Open the call's scope, trace context and metrics; nothing here can fail."""
        started = time.perf_counter()
        metadata = {k: v for k, v in context.invocation_metadata() or () if isinstance(v, str)}
        request_id = metadata.get("x-request-id") or os.urandom(16).hex()
        remaining = context.time_remaining()
        scope = CallScope(
            method=info.name,
            request_id=request_id,
            deadline=None if remaining is None else time.monotonic() + remaining,
            forward=[("x-request-id", request_id)],
            client_address=self._client(metadata, context),
        )
        span: trace.Span | None = None
        if self._tracing:
            parent = propagator.extract(metadata)
            span = self._tracer.start_span(
                info.span_name,
                context=parent,
                kind=SpanKind.SERVER,
                attributes=info.span_attributes,
            )
            token = otel_context.attach(trace.set_span_in_context(span, parent))
        elif "traceparent" in metadata:
            # No spans of our own, but logs and downstream calls keep the caller's trace.
            token = otel_context.attach(propagator.extract(metadata))
        else:
            token = None
        current_call.set(scope)
        info.metrics.in_flight += 1
        return _Call(self, info, scope, span, token, started), metadata

    def _known_principal(self, info: MethodInfo, metadata: Mapping[str, str]) -> Principal | None:
        """The caller without awaiting, when that is possible (public method, cached token)."""
        if info.policy is not None and info.policy.public:
            return ANONYMOUS  # credentials are ignored: a stale token must not block Login
        authorization = metadata.get("authorization")
        if authorization is None or self._verifier is None:
            return None
        if not authorization.startswith("Bearer "):
            return None
        return self._verifier.cached(authorization[7:].strip())

    def _admit(
        self,
        info: MethodInfo,
        scope: CallScope,
        principal: Principal,
        metadata: Mapping[str, str],
        context: grpc.aio.ServicerContext,
    ) -> None:
        """Authorize and rate-limit the caller; raise a ServiceError to refuse."""
        scope.principal = principal
        if principal.subject:
            self._limit(self._limiter, principal.subject)
        else:
            self._limit(self._anonymous_limiter, scope.client_address)
        authorize(info.name, info.policy, principal)
        if principal.token:
            scope.forward.append(("authorization", "Bearer " + principal.token))

    @staticmethod
    def _limit(limiter: RateLimiter, key: str) -> None:
        wait = limiter.acquire(key)
        if wait > 0:
            raise ResourceExhausted(
                "rate limit exceeded; retry later",
                retry_after_s=wait,
                metadata={"retry_after_ms": str(int(wait * 1000) + 1)},
            )

    def _client(self, metadata: Mapping[str, str], context: grpc.aio.ServicerContext) -> str:
        """The caller's address: behind trusted proxies, the X-Forwarded-For entry the
        outermost of them appended. Each proxy appends the address it saw, so that entry is
        `trusted_proxy_hops` from the right; anything left of it came from the client and
        may be forged."""
        if self._trust_forwarded_for:
            hops = [hop.strip() for hop in metadata.get("x-forwarded-for", "").split(",")]
            hops = [hop for hop in hops if hop]
            if len(hops) >= self._trusted_proxy_hops > 0:
                return hops[-self._trusted_proxy_hops]
        return _peer_host(context)

    async def _authenticate(self, metadata: Mapping[str, str]) -> Principal:
        """The caller from its token or API key; ANONYMOUS when it sent neither."""
        authorization = metadata.get("authorization")
        if authorization is not None:
            scheme, _, token = authorization.partition(" ")
            if scheme.lower() != "bearer" or not token.strip():
                raise Unauthenticated(
                    "authorization must be 'Bearer <token>'", reason="TOKEN_MALFORMED"
                )
            if self._verifier is None:
                raise Unauthenticated("tokens are not accepted here", reason="NO_VERIFIER")
            return await self._verifier.verify(token.strip())
        api_key = metadata.get("x-api-key")
        if api_key is not None:
            if self._api_keys is None:
                raise Unauthenticated("API keys are not accepted here", reason="NO_API_KEYS")
            return await self._api_keys.authenticate(api_key)
        return ANONYMOUS

    async def _fail(
        self, call: _Call, error: BaseException, context: grpc.aio.ServicerContext
    ) -> None:
        if isinstance(error, UNSTORABLE_TEXT):
            error = InvalidArgument(
                "a text field holds a character that cannot be stored (such as NUL)",
                [FieldViolation("request", str(error).splitlines()[0])],
                reason="UNSTORABLE_CHARACTER",
            )
        if isinstance(error, ServiceError):
            call.finish(error.code.name, context, error)
            await context.abort_with_status(_with_request_id(error.to_status(), call.scope))
        elif isinstance(error, asyncio.CancelledError):
            remaining = context.time_remaining()
            expired = remaining is not None and remaining <= 0
            call.finish("DEADLINE_EXCEEDED" if expired else "CANCELLED", context)
        elif isinstance(error, grpc.aio.AbortError):  # the handler aborted itself
            code = context.code()
            call.finish(code.name if isinstance(code, grpc.StatusCode) else "UNKNOWN", context)
        elif isinstance(error, Exception):
            log.exception("unhandled error in %s", call.info.name)
            call.finish("INTERNAL", context, error)
            await context.abort_with_status(
                _with_request_id(internal_status(call.scope.request_id), call.scope)
            )
        else:
            call.finish("CANCELLED", context)


class _Call:
    """Bookkeeping of one RPC, closed exactly once."""

    __slots__ = ("done", "info", "pipeline", "scope", "span", "started", "token")

    def __init__(
        self,
        pipeline: ServerPipeline,
        info: MethodInfo,
        scope: CallScope,
        span: trace.Span | None,
        token: object | None,
        started: float,
    ) -> None:
        self.pipeline = pipeline
        self.info = info
        self.scope = scope
        self.span = span
        self.token = token
        self.started = started
        self.done = False

    def finish(
        self, code: str, context: grpc.aio.ServicerContext, error: BaseException | None = None
    ) -> None:
        if self.done:
            return
        self.done = True
        elapsed = time.perf_counter() - self.started
        info = self.info
        info.metrics.in_flight -= 1
        info.metrics.record(code, elapsed)
        slow = elapsed > self.pipeline._slow_call_s
        if code != "OK" or slow or log.isEnabledFor(logging.DEBUG):
            # Logged before the trace context closes, so the line carries its ids.
            if code in SERVER_FAULT_CODES:
                level = logging.ERROR
            else:
                level = logging.INFO if code != "OK" or slow else logging.DEBUG
            log.log(
                level,
                "rpc %s %s in %.1f ms",
                info.name,
                code,
                elapsed * 1000,
                extra={
                    "grpc_method": info.name,
                    "grpc_code": code,
                    "duration_ms": round(elapsed * 1000, 3),
                    "principal": self.scope.principal.subject,
                    "error": str(error) if error else None,
                },
            )
        span = self.span
        if span is not None:
            span.set_attribute("rpc.grpc.status_code", code)
            if code in SERVER_FAULT_CODES:
                span.set_status(Status(StatusCode.ERROR, str(error) if error else code))
            span.end()
        if self.token is not None:
            # A streaming handler may resume in another context; detaching then fails.
            with contextlib.suppress(ValueError):
                otel_context.detach(self.token)  # type: ignore[arg-type]


@dataclass(frozen=True)
class Undecodable:
    """A request whose bytes did not parse; the pipeline answers INVALID_ARGUMENT."""

    type_name: str
    reason: str


def _tolerant(deserialize: Callable[[bytes], Any] | None) -> Callable[[bytes], Any] | None:
    """The deserializer, with corrupt bytes turned into an Undecodable.

    A DecodeError raised inside grpc's own deserialization step reaches the
    caller as UNKNOWN, before any interceptor could map it (found by fuzzing).
    """
    if deserialize is None:
        return None
    owner = getattr(deserialize, "__self__", None)
    type_name = getattr(getattr(owner, "DESCRIPTOR", None), "full_name", "request")

    def parse(data: bytes) -> Any:
        try:
            return deserialize(data)
        except DecodeError as error:
            return Undecodable(type_name, str(error) or "wire format is corrupt")

    return parse


@dataclass(frozen=True)
class _Status(grpc.Status):
    code: grpc.StatusCode
    details: str
    trailing_metadata: tuple[tuple[str, str | bytes], ...]


def _with_request_id(status: grpc.Status, scope: CallScope) -> grpc.Status:
    """The status with x-request-id in its trailers, so callers can quote it."""
    return _Status(
        status.code,
        status.details,
        (*(status.trailing_metadata or ()), ("x-request-id", scope.request_id)),
    )


def _peer_host(context: grpc.aio.ServicerContext) -> str:
    peer = context.peer() or "unknown"
    host, _, _ = peer.rpartition(":")
    return host or peer
