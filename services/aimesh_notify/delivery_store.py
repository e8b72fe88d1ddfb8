"""SQL of notify's delivery queue: plain PostgreSQL. Rows are claimed with FOR
UPDATE SKIP LOCKED, so workers never wait on each other, leased until
run_after, and finished only by the holder of the lease.
"""

from __future__ import annotations

import datetime as dt
import uuid
from collections.abc import Sequence
from dataclasses import dataclass

import asyncpg

from aimesh_notify.event_store import CHANNEL


@dataclass(frozen=True)
class AttemptRow:
    attempt: int
    http_status: int
    error: str
    start_time: dt.datetime
    end_time: dt.datetime


@dataclass(frozen=True)
class DeliveryRow:
    id: int
    subscription_id: str
    event_id: str
    topic: str
    status: str
    run_after: dt.datetime
    create_time: dt.datetime
    update_time: dt.datetime
    attempts: tuple[AttemptRow, ...] = ()


@dataclass(frozen=True)
class Claimed:
    """A delivery leased to a worker, with all it needs to make the attempt."""

    id: int
    subscription_id: str
    lease: uuid.UUID
    attempt: int
    # The previous holder's lease ran out mid-attempt (it died or stalled).
    took_over: bool
    url: str
    timeout_ms: int
    secrets: tuple[str, ...]  # as stored until the worker opens them
    event_id: str
    topic: str
    payload: bytes
    content_type: str
    publisher: str = ""


@dataclass(frozen=True)
class QueueStats:
    """Deliveries by state, across every worker, and how late the oldest due one is."""

    due: int  # pending and due now: waiting for a free worker
    waiting: int  # pending, due later: backing off before a retry
    in_flight: int  # leased to a worker
    dead_letter: int
    oldest_due_s: float  # 0 when none is due


@dataclass(frozen=True)
class Outcome:
    """How one attempt ended, and what the delivery becomes."""

    id: int
    lease: uuid.UUID
    attempt: int
    http_status: int
    error: str
    start_time: dt.datetime
    end_time: dt.datetime
    status: str  # succeeded, pending (retry) or dead_letter
    retry_in_s: float = 0.0


_CLAIM = """
WITH due AS (
    SELECT id, status AS was FROM deliveries
    WHERE status IN ('pending', 'in_flight') AND run_after <= now()
    ORDER BY run_after
    LIMIT $1
    FOR UPDATE SKIP LOCKED
)
UPDATE deliveries d SET
    -- A lease that ran out on the last attempt: the attempt may be what kills
    -- workers (a poison message), so it goes to dead letter instead of again.
    status = CASE WHEN d.attempts >= $2 THEN 'dead_letter' ELSE 'in_flight' END,
    attempts = CASE WHEN d.attempts >= $2 THEN d.attempts ELSE d.attempts + 1 END,
    run_after = now() + make_interval(secs => $3 + coalesce(s.timeout_ms, 0) / 1000.0),
    lease = CASE WHEN d.attempts >= $2 THEN NULL ELSE $4::uuid END,
    update_time = now()
FROM due, subscriptions s, events e
WHERE d.id = due.id AND s.id = d.subscription_id AND e.pos = d.event_pos
RETURNING d.id, d.subscription_id, d.status, d.attempts, due.was, d.lease, d.run_after,
    s.url, s.timeout_ms, s.secret, s.previous_secret,
    s.previous_secret_expire_time > now() AS previous_live,
    e.id AS event_id, e.topic, e.payload, e.content_type, e.publisher
"""

_COMPLETE = """
WITH r AS (
    SELECT * FROM unnest($1::bigint[], $2::uuid[], $3::int[], $4::int[], $5::text[],
                         $6::timestamptz[], $7::timestamptz[], $8::text[], $9::float8[])
        AS r(id, lease, attempt, http_status, error, start_time, end_time, status, retry_in_s)
), done AS (
    UPDATE deliveries d SET
        status = r.status,
        run_after = CASE WHEN r.status = 'pending'
                         THEN now() + make_interval(secs => r.retry_in_s) ELSE now() END,
        lease = NULL,
        update_time = now()
    FROM r WHERE d.id = r.id AND d.lease = r.lease AND d.status = 'in_flight'
    RETURNING d.id
)
INSERT INTO delivery_attempts (delivery_id, attempt, http_status, error, start_time, end_time)
SELECT r.id, r.attempt, r.http_status, r.error, r.start_time, r.end_time
FROM r JOIN done USING (id)
"""


class DeliveryStore:
    def __init__(self, pool: asyncpg.Pool) -> None:
        self._pool = pool

    async def claim(
        self, limit: int, max_attempts: int, visibility_s: float
    ) -> tuple[list[Claimed], list[tuple[int, int]]]:
        """Lease up to `limit` due deliveries; also returns (id, attempt) of those
        sent to dead letter because their last attempt's lease ran out."""
        lease = uuid.uuid4()
        rows = await self._pool.fetch(_CLAIM, limit, max_attempts, visibility_s, lease)
        claimed: list[Claimed] = []
        dead: list[tuple[int, int]] = []
        for row in rows:
            if row["status"] == "dead_letter":
                dead.append((row["id"], row["attempts"]))
                continue
            live = [row["secret"]]
            if row["previous_live"] and row["previous_secret"]:
                live.append(row["previous_secret"])
            claimed.append(
                Claimed(
                    row["id"],
                    row["subscription_id"],
                    row["lease"],
                    row["attempts"],
                    row["was"] == "in_flight",
                    row["url"],
                    row["timeout_ms"],
                    tuple(live),
                    row["event_id"],
                    row["topic"],
                    bytes(row["payload"]),
                    row["content_type"],
                    row["publisher"],
                )
            )
        return claimed, dead

    async def complete(self, outcomes: Sequence[Outcome]) -> None:
        """Record attempts and move their deliveries on, one round trip for all;
        an outcome whose lease was taken over changes nothing."""
        await self._pool.execute(
            _COMPLETE,
            [o.id for o in outcomes],
            [o.lease for o in outcomes],
            [o.attempt for o in outcomes],
            [o.http_status for o in outcomes],
            [o.error for o in outcomes],
            [o.start_time for o in outcomes],
            [o.end_time for o in outcomes],
            [o.status for o in outcomes],
            [o.retry_in_s for o in outcomes],
        )

    async def pause_subscription(self, subscription_id: str, seconds: float) -> int:
        """Hold the subscription's pending deliveries for `seconds`; how many moved."""
        result: str = await self._pool.execute(
            """UPDATE deliveries SET run_after = now() + make_interval(secs => $2),
                   update_time = now()
               WHERE status = 'pending' AND subscription_id = $1
                 AND run_after < now() + make_interval(secs => $2)""",
            subscription_id,
            seconds,
        )
        return int(result.split()[-1])

    async def queue_stats(self) -> QueueStats:
        # Both counts read partial indexes: the live queue and the dead letters.
        row = await self._pool.fetchrow(
            """SELECT count(*) FILTER (WHERE status = 'pending' AND run_after <= now()) AS due,
                      count(*) FILTER (WHERE status = 'pending' AND run_after > now()) AS waiting,
                      count(*) FILTER (WHERE status = 'in_flight') AS in_flight,
                      (SELECT count(*) FROM deliveries WHERE status = 'dead_letter')
                          AS dead_letter,
                      coalesce(extract(epoch FROM now() - min(run_after)
                          FILTER (WHERE status = 'pending' AND run_after <= now())), 0)::float8
                          AS oldest_due_s
               FROM deliveries WHERE status IN ('pending', 'in_flight')"""
        )
        return QueueStats(
            row["due"], row["waiting"], row["in_flight"], row["dead_letter"], row["oldest_due_s"]
        )

    async def record_lost_attempts(self, ids: Sequence[int], attempts: Sequence[int]) -> None:
        """Note attempts whose worker vanished, so the delivery's history shows them."""
        await self._pool.execute(
            """INSERT INTO delivery_attempts (delivery_id, attempt, error, start_time, end_time)
               SELECT id, attempt, 'lease expired: the worker stopped during the attempt',
                      now(), now()
               FROM unnest($1::bigint[], $2::int[]) AS r(id, attempt)""",
            list(ids),
            list(attempts),
        )

    async def redrive(self, subscription_id: str | None) -> int:
        """Put dead letters back in the queue with a fresh round of attempts."""
        async with self._pool.acquire() as connection, connection.transaction():
            result: str = await connection.execute(
                """UPDATE deliveries SET status = 'pending', attempts = 0, run_after = now(),
                       lease = NULL, update_time = now()
                   WHERE status = 'dead_letter' AND ($1::text IS NULL OR subscription_id = $1)""",
                subscription_id,
            )
            moved = int(result.split()[-1])
            if moved:
                await connection.execute(f"NOTIFY {CHANNEL}, 'redrive'")
        return moved

    async def deliveries(
        self, subscription_id: str, status: str | None, before_id: int | None, limit: int
    ) -> list[DeliveryRow]:
        rows = await self._pool.fetch(
            """SELECT d.id, d.subscription_id, e.id AS event_id, e.topic, d.status, d.run_after,
                      d.create_time, d.update_time
               FROM deliveries d JOIN events e ON e.pos = d.event_pos
               WHERE d.subscription_id = $1 AND ($2::text IS NULL OR d.status = $2)
                 AND ($3::bigint IS NULL OR d.id < $3)
               ORDER BY d.id DESC LIMIT $4""",
            subscription_id,
            status,
            before_id,
            limit,
        )
        if not rows:
            return []
        attempts = await self._pool.fetch(
            """SELECT delivery_id, attempt, http_status, error, start_time, end_time
               FROM delivery_attempts WHERE delivery_id = ANY($1::bigint[]) ORDER BY id""",
            [row["id"] for row in rows],
        )
        by_delivery: dict[int, list[AttemptRow]] = {}
        for a in attempts:
            by_delivery.setdefault(a["delivery_id"], []).append(
                AttemptRow(
                    a["attempt"], a["http_status"], a["error"], a["start_time"], a["end_time"]
                )
            )
        return [
            DeliveryRow(
                row["id"],
                row["subscription_id"],
                row["event_id"],
                row["topic"],
                row["status"],
                row["run_after"],
                row["create_time"],
                row["update_time"],
                tuple(by_delivery.get(row["id"], ())),
            )
            for row in rows
        ]
