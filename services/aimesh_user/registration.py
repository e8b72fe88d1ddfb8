"""How often Register may be called, per client address and per email.

Register must say when an email is taken (its answer carries the new user, and
there is no mail to confirm out of band), so it tells who has an account; Login
carefully does not. Rather than answer the same either way, which would need a
confirmation by mail, Register is rate-limited, before the email is looked up
and before any password hashing: per client address (a list of emails cannot be
walked quickly from one place) and per email (one address cannot be probed
again and again from many places). A throttled call is RESOURCE_EXHAUSTED with
RetryInfo whether or not the email is taken, so the refusal itself tells
nothing.
"""

from __future__ import annotations

from aimesh_runtime.errors import ResourceExhausted
from aimesh_runtime.ratelimit import RateLimiter

HOUR_S = 3600.0


class RegisterThrottle:
    def __init__(self, per_client_per_hour: int, per_email_per_hour: int) -> None:
        self._clients = RateLimiter(per_client_per_hour / HOUR_S, per_client_per_hour)
        self._emails = RateLimiter(per_email_per_hour / HOUR_S, per_email_per_hour)

    def admit(self, client: str, email: str) -> None:
        """Count one Register call; ResourceExhausted when either budget is spent."""
        wait = self._clients.acquire(client or "unknown")
        if not wait:
            wait = self._emails.acquire(email.strip().casefold())
        if wait:
            raise ResourceExhausted(
                "too many registrations; retry later",
                retry_after_s=wait,
                reason="REGISTER_RATE_LIMITED",
                metadata={"retry_after_ms": str(int(wait * 1000) + 1)},
            )
