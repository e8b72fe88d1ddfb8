"""Login throttling per account and per client address.

After `free_failures` failed logins in a row for one email (known or not, so
the answer tells nothing about whether it exists), each further failure locks
that email for an exponentially growing delay (1 s, 2 s, 4 s ... capped at
`max_delay_s`): a guesser gets a few tries a minute per account, however many
addresses it spreads them over. The same holds per client address with a
higher threshold, for one address trying many accounts. A locked login
answers RESOURCE_EXHAUSTED with RetryInfo without checking the password.

An attacker must not lock the owner out: the account lock is short (capped),
it does not apply from an address that account logged in from before (within
`known_address_days`), and a successful login clears the account's failures.
State lives in the database, so every replica sees the same counts.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import asyncpg

from aimesh_runtime.errors import ResourceExhausted


@dataclass(frozen=True)
class ThrottlePolicy:
    free_failures: int = 5
    address_free_failures: int = 50
    base_delay_s: float = 1.0
    max_delay_s: float = 30.0
    # Failures older than this are forgotten.
    window_s: float = 900.0
    known_address_days: int = 30

    def delay_s(self, failures: int, free: int) -> float:
        if failures <= free:
            return 0.0
        return min(self.base_delay_s * 2.0 ** min(failures - free - 1, 30), self.max_delay_s)


def _key(kind: str, value: str) -> bytes:
    return hashlib.sha256(f"{kind}\0{value}".encode()).digest()


def account_key(email: str) -> bytes:
    return _key("account", email.strip().lower())


def address_key(address: str) -> bytes:
    return _key("address", address)


class LoginThrottle:
    def __init__(self, pool: asyncpg.Pool, policy: ThrottlePolicy) -> None:
        self._pool = pool
        self._policy = policy

    async def check(self, email: str, address: str) -> None:
        """Raise ResourceExhausted while the email or the address is locked."""
        account, client = account_key(email), address_key(address)
        async with self._pool.acquire() as connection:
            rows = await connection.fetch(
                """SELECT key, extract(epoch FROM locked_until - now())::float8 AS wait
                     FROM login_failures WHERE key = ANY($1) AND locked_until > now()""",
                [account, client],
            )
            waits = {bytes(row["key"]): float(row["wait"]) for row in rows}
            if account in waits and await connection.fetchval(
                """SELECT 1 FROM login_known_addresses WHERE account_key = $1
                      AND address_key = $2 AND last_success > now() - make_interval(days => $3)""",
                account,
                client,
                self._policy.known_address_days,
            ):
                del waits[account]  # the owner's usual address is not held back
        if waits:
            wait = max(waits.values())
            raise ResourceExhausted(
                "too many failed logins; retry later",
                retry_after_s=wait,
                reason="LOGIN_THROTTLED",
                metadata={"retry_after_ms": str(int(wait * 1000) + 1)},
            )

    async def failed(self, email: str, address: str) -> None:
        policy = self._policy
        async with self._pool.acquire() as connection:
            for key, free in (
                (account_key(email), policy.free_failures),
                (address_key(address), policy.address_free_failures),
            ):
                failures = await connection.fetchval(
                    """INSERT INTO login_failures AS f (key, failures) VALUES ($1, 1)
                       ON CONFLICT (key) DO UPDATE SET
                           failures = CASE WHEN f.update_time < now() - make_interval(secs => $2)
                                           THEN 1 ELSE f.failures + 1 END,
                           update_time = now()
                       RETURNING failures""",
                    key,
                    policy.window_s,
                )
                delay = policy.delay_s(failures, free)
                if delay > 0:
                    await connection.execute(
                        """UPDATE login_failures
                              SET locked_until = now() + make_interval(secs => $2)
                            WHERE key = $1""",
                        key,
                        delay,
                    )
            # Forget stale rows a few at a time, so the table does not grow with every guess.
            await connection.execute(
                """DELETE FROM login_failures WHERE key IN (
                       SELECT key FROM login_failures
                        WHERE update_time < now() - make_interval(secs => $1) LIMIT 20)""",
                policy.window_s,
            )

    async def succeeded(self, email: str, address: str) -> None:
        """Clear the account's failures and remember the address it used."""
        account = account_key(email)
        async with self._pool.acquire() as connection:
            await connection.execute("DELETE FROM login_failures WHERE key = $1", account)
            await connection.execute(
                """INSERT INTO login_known_addresses (account_key, address_key) VALUES ($1, $2)
                   ON CONFLICT (account_key, address_key) DO UPDATE SET last_success = now()""",
                account,
                address_key(address),
            )
