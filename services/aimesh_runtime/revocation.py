"""Which users' tokens no longer count: a "not before" time per user.

A token is checked offline (signature and claims), so disabling or deleting
a user would leave its tokens, and the API keys exchanged for them, working
until they expire. The user service therefore keeps, per disabled or deleted
user, the time from which that user's tokens issued earlier are refused, for
as long as the longest token can live, and publishes the list in its JWKS
document (the `aimesh_not_before` member, user id -> epoch seconds; RFC 7517
lets readers ignore members they do not know). Every verifier already
fetches that document from the user service, through a path every mesh
policy opens, so no new route, subscription or peer call is needed.

Why polling and not an event stream: a verifier must know that it has not
missed a revocation, not only hear about those that reach it. Here each
verifier refetches the whole (short) list at most `poll_s` after it last did,
and refuses every token once its copy is older than `max_stale_s` (UNAVAILABLE,
retryable), so a revocation committed at T is in force in every service at
T + max_stale_s, whatever was lost or restarted in between. The user
deletion saga waits that long before its first purge, so nothing can be
created under the user after its data is erased. The price: a user service
unreachable for longer than max_stale_s stops token calls everywhere, which
is the only way to be sure a revoked token is not still accepted.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import logging
import math
import time
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

from aimesh_runtime.errors import Unavailable

log = logging.getLogger(__name__)

DOCUMENT_MEMBER = "aimesh_not_before"
DEFAULT_POLL_S = 1.0
DEFAULT_MAX_STALE_S = 5.0

DocumentFetcher = Callable[[], Awaitable[Mapping[str, Any]]]


def not_before_of(document: Mapping[str, Any]) -> dict[str, float]:
    """The user id -> not-before map of a JWKS document; none when it has no list."""
    listed = document.get(DOCUMENT_MEMBER, {})
    if not isinstance(listed, Mapping):
        raise ValueError(f"{DOCUMENT_MEMBER} is not an object")
    found: dict[str, float] = {}
    for user, when in listed.items():
        if isinstance(when, bool) or not isinstance(when, int | float) or not math.isfinite(when):
            raise ValueError(f"{DOCUMENT_MEMBER}[{user!r}] is not a time")
        found[str(user)] = float(when)
    return found


class Revocations:
    """A verifier's copy of the not-before list, refreshed from the issuer."""

    def __init__(
        self,
        fetch: DocumentFetcher,
        *,
        poll_s: float = DEFAULT_POLL_S,
        max_stale_s: float = DEFAULT_MAX_STALE_S,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._fetch = fetch
        self._clock = clock
        self._poll_s = poll_s
        self.max_stale_s = max_stale_s
        self._not_before: dict[str, float] = {}
        self._fetched_at = -math.inf  # clock() when the last good fetch began
        self._attempted_at = -math.inf  # clock() when the last fetch began
        self._fetching: asyncio.Task[None] | None = None

    def fresh(self) -> bool:
        """The copy is young enough to decide with, without waiting."""
        now = self._clock()
        if now - self._fetched_at > self._poll_s and now - self._attempted_at > self._poll_s:
            self._start_fetch()  # behind the calls that still use this copy
        return now - self._fetched_at <= self.max_stale_s

    def revoked(self, subject: str, issued_at: float) -> bool:
        not_before = self._not_before.get(subject)
        return not_before is not None and issued_at < not_before

    async def ensure_fresh(self) -> None:
        """Wait for a fetch when the copy is too old; Unavailable if none succeeds.

        Good enough is a fetch begun at most max_stale_s before this call came:
        a slow fetch still counts, a failing issuer does not."""
        wanted = self._clock() - self.max_stale_s
        for _ in range(2):  # a fetch already under way may have begun too early
            if self._fetched_at >= wanted:
                self.fresh()  # start the next poll when this copy is due for one
                return
            with contextlib.suppress(Exception):
                await asyncio.shield(self._start_fetch())
        if self._fetched_at < wanted:
            raise Unavailable(
                "cannot check token revocations now; retry shortly",
                reason="REVOCATIONS_UNAVAILABLE",
            )

    async def close(self) -> None:
        """Cancel a fetch still under way, so none outlives its server (or its socket)."""
        await _cancel(self._fetching)

    def _start_fetch(self) -> asyncio.Task[None]:
        if self._fetching is None or self._fetching.done():
            # Its own context: a poll is not a hop of the request that triggered it.
            self._fetching = asyncio.get_running_loop().create_task(
                self._refresh(), context=contextvars.Context()
            )
            self._fetching.add_done_callback(_consume)
        return self._fetching

    async def _refresh(self) -> None:
        started = self._attempted_at = self._clock()
        try:
            listed = not_before_of(await self._fetch())
        except Exception as error:
            log.warning("revocation list fetch failed: %s", error)
            raise
        self._not_before = listed
        self._fetched_at = max(self._fetched_at, started)


def _consume(task: asyncio.Task[None]) -> None:
    if not task.cancelled():
        task.exception()


async def _cancel(task: asyncio.Task[None] | None) -> None:
    if task is not None and not task.done():
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
