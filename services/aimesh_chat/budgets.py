"""Daily token budgets per principal, checked before the model is called."""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable

from aimesh_runtime.errors import ResourceExhausted


def utc_now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


class Budgets:
    def __init__(self, daily_tokens: int, clock: Callable[[], dt.datetime] = utc_now) -> None:
        self._daily = daily_tokens
        self._clock = clock

    @property
    def daily(self) -> int:
        """Tokens a principal may use per UTC day."""
        return self._daily

    def today(self) -> dt.date:
        return self._clock().date()

    def seconds_to_reset(self) -> float:
        now = self._clock()
        midnight = dt.datetime.combine(now.date() + dt.timedelta(days=1), dt.time(), dt.UTC)
        return (midnight - now).total_seconds()

    def enforce(self, used: int, estimate: int) -> None:
        """Refuse when today's usage plus this message's estimate exceeds the budget.

        Concurrent answers of one principal may each pass and overshoot by one
        answer's worth: usage is known only when an answer ends.
        """
        if used + estimate > self._daily:
            retry = self.seconds_to_reset()
            raise ResourceExhausted(
                "daily token budget spent; it resets at 00:00 UTC",
                retry_after_s=retry,
                reason="TOKEN_BUDGET_EXHAUSTED",
                metadata={
                    "budget_tokens": str(self._daily),
                    "used_tokens": str(used),
                    "retry_after_s": str(int(retry) + 1),
                },
            )
