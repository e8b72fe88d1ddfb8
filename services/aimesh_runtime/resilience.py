"""Circuit breaker with a fallback hook, for calls to other services and models.

CLOSED counts consecutive failures; at `failure_threshold` it goes OPEN and
refuses calls without touching the dependency for `reset_timeout_s`; then one
trial call runs HALF_OPEN: success closes the breaker, failure reopens it.

Written here rather than taken from PyPI: aiobreaker has had no release since
2021 and pybreaker's async support is built on Tornado; this is the part of
them we need, asyncio-native and with the state visible to metrics.
"""

from __future__ import annotations

import asyncio
import enum
import logging
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

import grpc

from aimesh_runtime.errors import Unavailable

log = logging.getLogger(__name__)

T = TypeVar("T")

# gRPC codes that say the dependency, not the request, is at fault. CANCELLED
# reaches a caller as a status only when the other side aborted the call (a
# server shutting down resets streams that raced its GOAWAY); a call our own
# side cancels raises asyncio.CancelledError instead.
DEPENDENCY_FAULT_CODES = frozenset(
    {
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.CANCELLED,
        grpc.StatusCode.DEADLINE_EXCEEDED,
        grpc.StatusCode.INTERNAL,
        grpc.StatusCode.UNKNOWN,
    }
)
# Not RESOURCE_EXHAUSTED: downstream rate limits are per caller, and one caller
# over its limit must not switch the dependency off for everyone.


class BreakerState(enum.Enum):
    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half_open"


class BreakerOpen(Exception):
    """Raised instead of calling a dependency whose breaker is open."""

    def __init__(self, name: str, retry_after_s: float) -> None:
        super().__init__(f"circuit breaker {name!r} is open")
        self.name = name
        self.retry_after_s = retry_after_s


def is_dependency_fault(error: BaseException) -> bool:
    if isinstance(error, grpc.aio.AioRpcError):
        return error.code() in DEPENDENCY_FAULT_CODES
    return isinstance(error, (TimeoutError, ConnectionError, OSError))


class CircuitBreaker:
    def __init__(
        self,
        name: str,
        *,
        failure_threshold: int = 5,
        reset_timeout_s: float = 5.0,
        is_failure: Callable[[BaseException], bool] = is_dependency_fault,
        clock: Callable[[], float] = time.monotonic,
        on_change: Callable[[str, BreakerState], None] | None = None,
    ) -> None:
        self.name = name
        self.failure_threshold = failure_threshold
        self.reset_timeout_s = reset_timeout_s
        self._is_failure = is_failure
        self._clock = clock
        self._on_change = on_change
        self._state = BreakerState.CLOSED
        self._failures = 0
        self._opened_at = 0.0
        self._trial_running = False

    @property
    def state(self) -> BreakerState:
        if self._state is BreakerState.OPEN and self._reset_due():
            return BreakerState.HALF_OPEN
        return self._state

    def _reset_due(self) -> bool:
        return self._clock() - self._opened_at >= self.reset_timeout_s

    def _set(self, state: BreakerState) -> None:
        if state is not self._state:
            log.warning("breaker %s: %s -> %s", self.name, self._state.value, state.value)
            self._state = state
            if self._on_change is not None:
                self._on_change(self.name, state)

    def _admit(self) -> bool:
        """Whether a call may go through now; True marks a half-open trial."""
        if self._state is BreakerState.CLOSED:
            return False
        if self._state is BreakerState.OPEN and self._reset_due():
            self._set(BreakerState.HALF_OPEN)
        if self._state is BreakerState.HALF_OPEN and not self._trial_running:
            self._trial_running = True
            return True
        retry_after = max(0.0, self.reset_timeout_s - (self._clock() - self._opened_at))
        raise BreakerOpen(self.name, retry_after)

    def record_success(self) -> None:
        self._failures = 0
        self._set(BreakerState.CLOSED)

    def record_failure(self) -> None:
        self._failures += 1
        if self._state is BreakerState.HALF_OPEN or self._failures >= self.failure_threshold:
            self._opened_at = self._clock()
            self._set(BreakerState.OPEN)

    async def call(self, operation: Callable[[], Awaitable[T]]) -> T:
        """Run `operation` through the breaker; raise BreakerOpen when refused."""
        trial = self._admit()
        # A cancelled call (a BaseException) says nothing about the dependency: it
        # counts as neither success nor failure, and only frees the trial slot.
        try:
            result = await operation()
        except Exception as error:
            if self._is_failure(error):
                self.record_failure()
            elif trial:  # the dependency answered, so it is up
                self.record_success()
            raise
        else:
            self.record_success()
            return result
        finally:
            if trial:
                self._trial_running = False

    async def call_or_fallback(
        self,
        operation: Callable[[], Awaitable[T]],
        fallback: Callable[[BaseException], Awaitable[T]],
    ) -> T:
        """Run `operation`; on an open breaker or a dependency fault, use `fallback`.

        The fallback gets the cause so it can say why the answer is degraded.
        Errors that are the caller's fault (INVALID_ARGUMENT and so on) still raise.
        """
        try:
            return await self.call(operation)
        except BreakerOpen as error:
            return await fallback(error)
        except Exception as error:
            if self._is_failure(error):
                return await fallback(error)
            raise


class FirstLoad:
    """A service's data, read once at start before it reports SERVING. A call
    that arrives earlier (its client did not wait for SERVING) waits for it,
    rather than failing or answering from nothing; UNAVAILABLE after `wait_s`."""

    def __init__(self, unavailable: str, wait_s: float) -> None:
        self._unavailable = unavailable
        self._wait_s = wait_s
        self._done = asyncio.Event()

    @property
    def done(self) -> bool:
        return self._done.is_set()

    def set(self) -> None:
        self._done.set()

    async def wait(self) -> None:
        if self._done.is_set():
            return
        try:
            await asyncio.wait_for(self._done.wait(), self._wait_s)
        except TimeoutError:
            raise Unavailable(self._unavailable, reason="LOADING") from None
