"""SQL of the user-deletion saga, over the user service's own database.

Every write that moves a running saga first locks its row and checks that
this process still holds the lease, extending it: a process that lost its
lease (paused past it while another took over) changes nothing.
"""

from __future__ import annotations

import datetime as dt
import json
from collections.abc import Sequence
from dataclasses import dataclass

import asyncpg

from aimesh_runtime import audit, outbox


@dataclass(frozen=True)
class StepRow:
    position: int
    service: str
    state: str  # PENDING, SUCCEEDED, SKIPPED, FAILED
    attempts: int
    last_error: str
    deleted_count: int
    next_attempt_time: dt.datetime | None
    end_time: dt.datetime | None


@dataclass(frozen=True)
class DeletionRow:
    id: str
    user_id: str
    actor: str
    state: str  # RUNNING, SUCCEEDED, ABORTED
    abort_reason: str
    create_time: dt.datetime
    update_time: dt.datetime
    end_time: dt.datetime | None
    steps: tuple[StepRow, ...]


class LeaseLost(Exception):
    """Another process runs this saga now."""


def _step(row: asyncpg.Record) -> StepRow:
    return StepRow(
        row["position"], row["service"], row["state"], row["attempts"], row["last_error"],
        row["deleted_count"], row["next_attempt_time"], row["end_time"],
    )  # fmt: skip


async def _audit(
    conn: asyncpg.Connection, actor: str, action: str, user_id: str, details: dict[str, object]
) -> None:
    await conn.execute(
        "INSERT INTO audit_events (actor, action, target, details) VALUES ($1, $2, $3, $4::jsonb)",
        actor,
        action,
        f"users/{user_id}",
        json.dumps(details),
    )


async def _pseudonymise_audit(conn: asyncpg.Connection, user_id: str) -> None:
    """The erased user's audit events, and the chained audit log, name a pseudonym
    instead of the id from now on (see aimesh_runtime.audit.pseudonymise)."""
    alias = audit.new_pseudonym(user_id)
    await conn.execute(
        """UPDATE audit_events SET actor = replace(actor, $1, $2),
                                   target = replace(target, $1, $2),
                                   details = replace(details::text, $1, $2)::jsonb
            WHERE strpos(actor, $1) > 0 OR strpos(target, $1) > 0
               OR strpos(details::text, $1) > 0""",
        user_id,
        alias,
    )
    await audit.pseudonymise(conn, user_id, alias)


class DeletionStore:
    def __init__(self, pool: asyncpg.Pool, owner: str, lease_s: float) -> None:
        self._pool = pool
        self._owner = owner
        self._lease_s = lease_s

    async def start(
        self, deletion_id: str, actor: str, user_id: str, services: Sequence[str]
    ) -> str | None:
        """Disable the user and record a new saga; the id of the running one if
        there is one already, None if the user does not exist."""
        async with self._pool.acquire() as conn, conn.transaction():
            if await conn.fetchval("SELECT 1 FROM users WHERE id = $1 FOR UPDATE", user_id) is None:
                return None
            running = await conn.fetchval(
                "SELECT id FROM user_deletions WHERE user_id = $1 AND state = 'RUNNING'", user_id
            )
            if running is not None:
                return str(running)
            await conn.execute("UPDATE users SET disable_time = now() WHERE id = $1", user_id)
            await conn.execute(
                "INSERT INTO user_deletions (id, user_id, actor) VALUES ($1, $2, $3)",
                deletion_id,
                user_id,
                actor,
            )
            await conn.executemany(
                """INSERT INTO user_deletion_steps (deletion_id, position, service)
                   VALUES ($1, $2, $3)""",
                [(deletion_id, position, service) for position, service in enumerate(services)],
            )
            await _audit(conn, actor, "user.deletion_started", user_id, {"deletion": deletion_id})
        return deletion_id

    async def get(self, deletion_id: str) -> DeletionRow | None:
        async with self._pool.acquire() as conn:
            row = await conn.fetchrow("SELECT * FROM user_deletions WHERE id = $1", deletion_id)
            if row is None:
                return None
            steps = await conn.fetch(
                "SELECT * FROM user_deletion_steps WHERE deletion_id = $1 ORDER BY position",
                deletion_id,
            )
        return DeletionRow(
            row["id"], row["user_id"], row["actor"], row["state"], row["abort_reason"],
            row["create_time"], row["update_time"], row["end_time"],
            tuple(_step(step) for step in steps),
        )  # fmt: skip

    async def not_before(self, within_s: float) -> dict[str, float]:
        """Per user disabled in the last `within_s` seconds, when (epoch seconds):
        the saga's row is written in the transaction that disables the user, and
        stays after the account is gone. Tokens issued before are refused, also
        after an aborted saga enabled the account again (the user logs in anew)."""
        rows = await self._pool.fetch(
            """SELECT user_id, extract(epoch FROM max(create_time)) AS not_before
                 FROM user_deletions
                WHERE create_time > now() - make_interval(secs => $1)
                GROUP BY user_id""",
            within_s,
        )
        return {str(row["user_id"]): float(row["not_before"]) for row in rows}

    async def now(self) -> dt.datetime:
        """The database's clock, which next_attempt_time is computed with."""
        now: dt.datetime = await self._pool.fetchval("SELECT now()")
        return now

    async def claim(self, deletion_id: str) -> bool:
        """Take the lease if it is free, lapsed or already ours."""
        claimed = await self._pool.fetchval(
            """UPDATE user_deletions SET lease_owner = $2,
                   lease_until = now() + make_interval(secs => $3)
               WHERE id = $1 AND state = 'RUNNING'
                 AND (lease_owner IS NULL OR lease_owner = $2 OR lease_until < now())
               RETURNING id""",
            deletion_id,
            self._owner,
            self._lease_s,
        )
        return claimed is not None

    async def release(self, deletion_id: str) -> None:
        await self._pool.execute(
            """UPDATE user_deletions SET lease_owner = NULL, lease_until = NULL
               WHERE id = $1 AND lease_owner = $2""",
            deletion_id,
            self._owner,
        )

    async def unleased(self) -> list[str]:
        """Running sagas nobody holds: the ones a crash left behind."""
        rows = await self._pool.fetch(
            """SELECT id FROM user_deletions WHERE state = 'RUNNING'
                 AND (lease_owner IS NULL OR lease_until < now())
               ORDER BY create_time LIMIT 100"""
        )
        return [str(row["id"]) for row in rows]

    async def _hold(self, conn: asyncpg.Connection, deletion_id: str) -> None:
        owner = await conn.fetchval(
            "SELECT lease_owner FROM user_deletions WHERE id = $1 AND state = 'RUNNING' FOR UPDATE",
            deletion_id,
        )
        if owner != self._owner:
            raise LeaseLost(deletion_id)
        await conn.execute(
            """UPDATE user_deletions SET lease_until = now() + make_interval(secs => $2),
                   update_time = now() WHERE id = $1""",
            deletion_id,
            self._lease_s,
        )

    async def renew(self, deletion_id: str) -> None:
        async with self._pool.acquire() as conn, conn.transaction():
            await self._hold(conn, deletion_id)

    async def step_succeeded(
        self, deletion_id: str, position: int, deleted: int, *, skipped: str = ""
    ) -> None:
        async with self._pool.acquire() as conn, conn.transaction():
            await self._hold(conn, deletion_id)
            await conn.execute(
                """UPDATE user_deletion_steps SET state = $3, last_error = $4,
                       deleted_count = deleted_count + $5, attempts = attempts + $6,
                       next_attempt_time = NULL, end_time = now()
                   WHERE deletion_id = $1 AND position = $2""",
                deletion_id, position, "SKIPPED" if skipped else "SUCCEEDED", skipped,
                deleted, 0 if skipped else 1,
            )  # fmt: skip

    async def step_failed(
        self, deletion_id: str, position: int, error: str, retry_in_s: float, *, attempted: bool
    ) -> None:
        async with self._pool.acquire() as conn, conn.transaction():
            await self._hold(conn, deletion_id)
            await conn.execute(
                """UPDATE user_deletion_steps SET attempts = attempts + $5, last_error = $3,
                       next_attempt_time = now() + make_interval(secs => $4)
                   WHERE deletion_id = $1 AND position = $2""",
                deletion_id, position, error[:1000], retry_in_s, int(attempted),
            )  # fmt: skip

    async def abort(self, deletion: DeletionRow, position: int, reason: str) -> None:
        """Compensate: nothing was erased, so the account is enabled again."""
        async with self._pool.acquire() as conn, conn.transaction():
            await self._hold(conn, deletion.id)
            await conn.execute(
                """UPDATE user_deletion_steps SET state = 'FAILED', attempts = attempts + 1,
                       last_error = $3, next_attempt_time = NULL, end_time = now()
                   WHERE deletion_id = $1 AND position = $2""",
                deletion.id, position, reason[:1000],
            )  # fmt: skip
            await conn.execute(
                """UPDATE user_deletions SET state = 'ABORTED', abort_reason = $2,
                       end_time = now(), update_time = now(), lease_owner = NULL,
                       lease_until = NULL
                   WHERE id = $1""",
                deletion.id,
                reason[:1000],
            )
            await conn.execute(
                "UPDATE users SET disable_time = NULL WHERE id = $1", deletion.user_id
            )
            await _audit(
                conn, deletion.actor, "user.deletion_aborted", deletion.user_id,
                {"deletion": deletion.id, "reason": reason[:1000]},
            )  # fmt: skip

    async def delete_account(self, deletion: DeletionRow, position: int) -> None:
        """The last step: the account, its keys and tokens go, the saga ends, and
        user.deleted is queued, all in one transaction."""
        async with self._pool.acquire() as conn, conn.transaction():
            await self._hold(conn, deletion.id)
            deleted = await conn.fetchval(
                "WITH gone AS (DELETE FROM users WHERE id = $1 RETURNING 1) "
                "SELECT count(*) FROM gone",
                deletion.user_id,
            )
            await conn.execute(
                """UPDATE user_deletion_steps SET state = 'SUCCEEDED', attempts = attempts + 1,
                       deleted_count = deleted_count + $3, last_error = '',
                       next_attempt_time = NULL, end_time = now()
                   WHERE deletion_id = $1 AND position = $2""",
                deletion.id, position, int(deleted),
            )  # fmt: skip
            await conn.execute(
                """UPDATE user_deletions SET state = 'SUCCEEDED', end_time = now(),
                       update_time = now(), lease_owner = NULL, lease_until = NULL
                   WHERE id = $1""",
                deletion.id,
            )
            await _audit(
                conn, deletion.actor, "user.deleted", deletion.user_id, {"deletion": deletion.id}
            )
            await _pseudonymise_audit(conn, deletion.user_id)
            name = f"users/{deletion.user_id}"
            await outbox.emit(
                conn,
                topic="user.deleted",
                key=name,
                payload={"user": name, "deletion": f"userDeletions/{deletion.id}"},
            )
