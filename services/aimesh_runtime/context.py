"""Request-scoped values, set by the server pipeline for the handler's task."""

from __future__ import annotations

import time
from contextvars import ContextVar
from dataclasses import dataclass, field

from aimesh_runtime.auth import ANONYMOUS, Principal


@dataclass
class CallScope:
    """What the pipeline knows about the RPC being served."""

    method: str
    request_id: str
    principal: Principal = ANONYMOUS
    # time.monotonic() at which the caller's deadline passes; None if unbounded.
    deadline: float | None = None
    # Metadata forwarded to downstream calls so every hop sees the same caller.
    forward: list[tuple[str, str]] = field(default_factory=list)
    # The caller's address as the rate limits see it (the trusted X-Forwarded-For hop).
    client_address: str = ""
    # Ids for log lines when no span is recording; made on the first line logged.
    log_ids: tuple[str, str] | None = None

    def remaining_s(self) -> float | None:
        if self.deadline is None:
            return None
        return self.deadline - time.monotonic()


current_call: ContextVar[CallScope | None] = ContextVar("aimesh_current_call", default=None)


def call_scope() -> CallScope | None:
    return current_call.get()


def downstream_timeout_s(cap_s: float, share: float) -> float:
    """The timeout for a downstream call: `share` of the caller's remaining
    deadline, at most `cap_s`, and `cap_s` when the caller set no deadline."""
    scope = current_call.get()
    remaining = None if scope is None else scope.remaining_s()
    if remaining is None:
        return cap_s
    return max(min(cap_s, remaining * share), 0.001)


def principal() -> Principal:
    scope = current_call.get()
    return ANONYMOUS if scope is None else scope.principal


def request_id() -> str:
    scope = current_call.get()
    return "" if scope is None else scope.request_id
