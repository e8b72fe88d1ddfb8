"""SQL of the notify service, over its own database only.

The queue half (claim, complete, redrive) is plain PostgreSQL: rows claimed
with FOR UPDATE SKIP LOCKED, so workers never wait on each other, leased
until run_after, and finished only by the holder of the lease.
"""

from __future__ import annotations

import datetime as dt
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import asyncpg

DEADLOCK_RETRIES = 3
CHANNEL = "aimesh_notify"  # LISTEN/NOTIFY channel: new events and due deliveries


@dataclass(frozen=True)
class SubscriptionRow:
    id: str
    owner_id: str
    display_name: str
    topics: tuple[str, ...]
    kind: str
    url: str | None
    timeout_ms: int | None
    # As stored: sealed (aimesh_notify/sealing.py), or plaintext from before sealing.
    secret: str | None
    secret_create_time: dt.datetime | None
    previous_secret: str | None
    previous_secret_expire_time: dt.datetime | None
    start_pos: int
    create_time: dt.datetime
    update_time: dt.datetime


@dataclass(frozen=True)
class EventRow:
    seq: int | None  # None until sequenced for streams
    id: str
    topic: str
    payload: bytes
    content_type: str
    idempotency_key: str
    publish_time: dt.datetime
    publisher: str = ""  # "users/{id}"; "" for events from before it was recorded


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
class TopicGrantRow:
    id: str
    topic_prefix: str
    grantee: str  # a user id
    create_time: dt.datetime


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


def _subscription(row: asyncpg.Record) -> SubscriptionRow:
    return SubscriptionRow(
        row["id"],
        row["owner_id"],
        row["display_name"],
        tuple(row["topics"]),
        row["kind"],
        row["url"],
        row["timeout_ms"],
        row["secret"],
        row["secret_create_time"],
        row["previous_secret"],
        row["previous_secret_expire_time"],
        row["start_pos"],
        row["create_time"],
        row["update_time"],
    )


def _event(row: asyncpg.Record) -> EventRow:
    return EventRow(
        row["seq"],
        row["id"],
        row["topic"],
        bytes(row["payload"]),
        row["content_type"],
        row["idempotency_key"],
        row["publish_time"],
        row["publisher"],
    )


# One statement and no lock: store the event unless its key exists, and queue
# a delivery for every matching webhook. No NOTIFY here either: PostgreSQL
# holds a global lock through the commit of a transaction that notifies,
# which would serialise every publish behind one disk flush.
_PUBLISH = """
WITH inserted AS (
    INSERT INTO events (id, topic, payload, content_type, idempotency_key, publisher)
    VALUES ($1, $2, $3, $4, $5, $6)
    ON CONFLICT (idempotency_key) DO NOTHING
    RETURNING *
), queued AS (
    INSERT INTO deliveries (subscription_id, event_pos)
    SELECT s.id, i.pos FROM inserted i
    JOIN subscriptions s ON s.kind = 'webhook' AND topic_matches(s.topics, i.topic)
    RETURNING 1
)
SELECT i.*, (SELECT count(*) FROM queued) AS queued FROM inserted i
"""

# The same for a batch: its events are stored in request order, in one
# statement; those whose key exists come back absent.
_PUBLISH_BATCH = """
WITH input AS (
    SELECT * FROM unnest($1::text[], $2::text[], $3::bytea[], $4::text[], $5::text[],
                         $6::text[])
        WITH ORDINALITY AS r(id, topic, payload, content_type, idempotency_key, publisher, n)
), inserted AS (
    INSERT INTO events (id, topic, payload, content_type, idempotency_key, publisher)
    SELECT id, topic, payload, content_type, idempotency_key, publisher FROM input ORDER BY n
    ON CONFLICT (idempotency_key) DO NOTHING
    RETURNING *
), queued AS (
    INSERT INTO deliveries (subscription_id, event_pos)
    SELECT s.id, i.pos FROM inserted i
    JOIN subscriptions s ON s.kind = 'webhook' AND topic_matches(s.topics, i.topic)
    RETURNING 1
)
SELECT i.*, (SELECT count(*) FROM queued) AS queued FROM inserted i
"""

# Numbers committed events in insertion order, under a lock so that one
# sequencer runs at a time: each run's numbers all become visible at its commit,
# and the next run's are larger.
SEQUENCER_LOCK = 7_361_224_055
_SEQUENCE = """
WITH batch AS (
    SELECT pos, row_number() OVER (ORDER BY pos) AS n FROM events
    WHERE seq IS NULL ORDER BY pos LIMIT $1
), base AS (
    SELECT last_seq FROM event_sequence
), numbered AS (
    UPDATE events e SET seq = base.last_seq + batch.n FROM batch, base
    WHERE e.pos = batch.pos RETURNING e.seq
)
UPDATE event_sequence SET last_seq = last_seq + (SELECT count(*) FROM numbered)
RETURNING (SELECT count(*) FROM numbered) AS numbered
"""

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


class NotifyStore:
    def __init__(self, pool: asyncpg.Pool) -> None:
        self._pool = pool

    # Subscriptions

    async def create_subscription(
        self,
        subscription_id: str,
        owner_id: str,
        display_name: str,
        topics: Sequence[str],
        kind: str,
        url: str | None,
        timeout_ms: int | None,
        secret: str | None,
    ) -> SubscriptionRow:
        row = await self._pool.fetchrow(
            """INSERT INTO subscriptions (id, owner_id, display_name, topics, kind, url,
                   timeout_ms, secret, secret_create_time, start_pos)
               VALUES ($1, $2, $3, $4, $5, $6, $7, $8,
                   CASE WHEN $8::text IS NULL THEN NULL ELSE now() END,
                   (SELECT coalesce(max(pos), 0) FROM events))
               RETURNING *""",
            subscription_id,
            owner_id,
            display_name,
            list(topics),
            kind,
            url,
            timeout_ms,
            secret,
        )
        return _subscription(row)

    # topic grants

    async def create_topic_grant(self, grant_id: str, prefix: str, grantee: str) -> TopicGrantRow:
        """The new grant, or the one that already gives `grantee` this prefix."""
        row = await self._pool.fetchrow(
            """INSERT INTO topic_grants (id, topic_prefix, grantee) VALUES ($1, $2, $3)
               ON CONFLICT (topic_prefix, grantee) DO UPDATE SET grantee = EXCLUDED.grantee
               RETURNING *""",
            grant_id, prefix, grantee,
        )  # fmt: skip
        return TopicGrantRow(**dict(row))

    async def topic_grants(
        self, after: tuple[dt.datetime, str] | None, limit: int
    ) -> list[TopicGrantRow]:
        rows = await self._pool.fetch(
            """SELECT * FROM topic_grants
               WHERE $1::timestamptz IS NULL OR (create_time, id) > ($1, $2)
               ORDER BY create_time, id LIMIT $3""",
            after[0] if after else None, after[1] if after else "", limit,
        )  # fmt: skip
        return [TopicGrantRow(**dict(row)) for row in rows]

    async def all_topic_grants(self) -> list[tuple[str, str]]:
        rows = await self._pool.fetch("SELECT topic_prefix, grantee FROM topic_grants")
        return [(row["topic_prefix"], row["grantee"]) for row in rows]

    async def delete_topic_grant(self, grant_id: str) -> bool:
        found = await self._pool.fetchval(
            "DELETE FROM topic_grants WHERE id = $1 RETURNING id", grant_id
        )
        return found is not None

    async def subscription(
        self, subscription_id: str, owner_id: str | None
    ) -> SubscriptionRow | None:
        """The subscription; someone else's reads as absent unless owner_id is None (admin)."""
        row = await self._pool.fetchrow(
            "SELECT * FROM subscriptions WHERE id = $1 AND ($2::text IS NULL OR owner_id = $2)",
            subscription_id,
            owner_id,
        )
        return None if row is None else _subscription(row)

    async def subscriptions(
        self, owner_id: str | None, after: tuple[dt.datetime, str] | None, limit: int
    ) -> list[SubscriptionRow]:
        rows = await self._pool.fetch(
            """SELECT * FROM subscriptions
               WHERE ($1::text IS NULL OR owner_id = $1)
                 AND ($2::timestamptz IS NULL OR (create_time, id) > ($2, $3))
               ORDER BY create_time, id LIMIT $4""",
            owner_id,
            after[0] if after else None,
            after[1] if after else "",
            limit,
        )
        return [_subscription(row) for row in rows]

    async def update_subscription(
        self,
        subscription_id: str,
        display_name: str,
        topics: Sequence[str],
        url: str | None,
        timeout_ms: int | None,
    ) -> SubscriptionRow | None:
        row = await self._pool.fetchrow(
            """UPDATE subscriptions SET display_name = $2, topics = $3, url = $4,
                   timeout_ms = $5, update_time = now()
               WHERE id = $1 RETURNING *""",
            subscription_id,
            display_name,
            list(topics),
            url,
            timeout_ms,
        )
        return None if row is None else _subscription(row)

    async def rotate_secret(
        self, subscription_id: str, secret: str, grace: dt.timedelta
    ) -> SubscriptionRow | None:
        row = await self._pool.fetchrow(
            """UPDATE subscriptions SET previous_secret = secret,
                   previous_secret_expire_time = now() + $3, secret = $2,
                   secret_create_time = now(), update_time = now()
               WHERE id = $1 AND kind = 'webhook' RETURNING *""",
            subscription_id,
            secret,
            grace,
        )
        return None if row is None else _subscription(row)

    async def key_check(self, sealed: str) -> str:
        """The sealed check value of the key, stored first if there is none yet."""
        await self._pool.execute(
            "INSERT INTO secret_key_check (sealed) VALUES ($1) ON CONFLICT DO NOTHING", sealed
        )
        stored: str = await self._pool.fetchval("SELECT sealed FROM secret_key_check")
        return stored

    async def replace_key_check(self, old: str, new: str) -> None:
        """Store the key check sealed anew, unless another process already did."""
        await self._pool.execute(
            "UPDATE secret_key_check SET sealed = $2 WHERE sealed = $1", old, new
        )

    async def secrets_not_sealed_under(
        self, prefix: str, after_id: str, limit: int
    ) -> list[SubscriptionRow]:
        """Subscriptions after `after_id`, in id order, holding a secret that is
        not sealed under the current key (its values start with `prefix`)."""
        rows = await self._pool.fetch(
            """SELECT * FROM subscriptions
               WHERE id > $2
                 AND ((secret IS NOT NULL AND NOT starts_with(secret, $1))
                      OR (previous_secret IS NOT NULL AND NOT starts_with(previous_secret, $1)))
               ORDER BY id LIMIT $3""",
            prefix,
            after_id,
            limit,
        )
        return [_subscription(row) for row in rows]

    async def seal_secrets(
        self, updates: Sequence[tuple[str, str | None, str | None, str | None, str | None]]
    ) -> int:
        """Write (id, secret, sealed, previous, previous sealed), each column only
        where it still holds what was read; how many rows changed."""
        columns = [list(column) for column in zip(*updates, strict=True)]
        result: str = await self._pool.execute(
            """UPDATE subscriptions s SET
                   secret = CASE WHEN s.secret = r.secret THEN r.sealed ELSE s.secret END,
                   previous_secret = CASE WHEN s.previous_secret = r.previous
                                          THEN r.previous_sealed ELSE s.previous_secret END
               FROM unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::text[])
                   AS r(id, secret, sealed, previous, previous_sealed)
               WHERE s.id = r.id
                 AND ((s.secret = r.secret AND r.sealed <> r.secret)
                      OR (s.previous_secret = r.previous AND r.previous_sealed <> r.previous))""",
            *columns,
        )
        return int(result.split()[-1])

    async def delete_subscription(self, subscription_id: str) -> bool:
        result: str = await self._pool.execute(
            "DELETE FROM subscriptions WHERE id = $1", subscription_id
        )
        return result != "DELETE 0"

    async def purge_owner(self, owner_id: str) -> int:
        result: str = await self._pool.execute(
            "DELETE FROM subscriptions WHERE owner_id = $1", owner_id
        )
        return int(result.split()[-1])

    # Events

    async def publish(
        self, event_id: str, topic: str, payload: bytes, content_type: str, key: str, publisher: str
    ) -> EventRow | None:
        """The new event, or None if the key was already used."""
        row = await self._pool.fetchrow(
            _PUBLISH, event_id, topic, payload, content_type, key, publisher
        )
        return None if row is None else _event(row)

    async def publish_batch(
        self,
        events: Sequence[tuple[str, str, bytes, str, str, str]],
        check: Callable[[list[EventRow]], None],
    ) -> tuple[list[EventRow], list[EventRow]]:
        """Store (id, topic, payload, content_type, key, publisher) events whose keys are
        new, in one transaction: the new events, and the first events of the
        keys already known. `check` sees those known ones before the commit and
        may raise, which stores nothing."""
        columns = [list(column) for column in zip(*events, strict=True)]
        for attempt in range(DEADLOCK_RETRIES + 1):
            try:
                async with self._pool.acquire() as connection, connection.transaction():
                    rows = await connection.fetch(_PUBLISH_BATCH, *columns)
                    new = [_event(row) for row in rows]
                    stored = {row.idempotency_key for row in new}
                    known_keys = [key for key in columns[4] if key not in stored]
                    known: list[EventRow] = []
                    if known_keys:
                        found = await connection.fetch(
                            "SELECT * FROM events WHERE idempotency_key = ANY($1::text[])",
                            known_keys,
                        )
                        known = [_event(row) for row in found]
                    check(known)
                return new, known
            except asyncpg.DeadlockDetectedError:
                # Two batches sharing keys in opposite orders; one of them retries.
                if attempt == DEADLOCK_RETRIES:
                    raise
        raise AssertionError("unreachable")

    async def event_by_key(self, key: str) -> EventRow | None:
        row = await self._pool.fetchrow("SELECT * FROM events WHERE idempotency_key = $1", key)
        return None if row is None else _event(row)

    async def pruned_through(self) -> int:
        value: int = await self._pool.fetchval("SELECT pruned_through FROM event_sequence")
        return value

    async def events_after(
        self, after_seq: int, start_pos: int, topics: Sequence[str], limit: int
    ) -> list[EventRow]:
        """Numbered events after `after_seq`, stored after `start_pos`, on `topics`."""
        rows = await self._pool.fetch(
            """SELECT * FROM events
               WHERE seq > $1 AND pos > $2 AND topic_matches($3, topic)
               ORDER BY seq LIMIT $4""",
            after_seq,
            start_pos,
            list(topics),
            limit,
        )
        return [_event(row) for row in rows]

    async def sequence(self, batch: int) -> int:
        """Number up to `batch` committed events; how many were numbered."""
        async with self._pool.acquire() as connection, connection.transaction():
            await connection.execute("SELECT pg_advisory_xact_lock($1)", SEQUENCER_LOCK)
            numbered: int = await connection.fetchval(_SEQUENCE, batch)
            if numbered:
                await connection.execute(f"NOTIFY {CHANNEL}, 'sequenced'")
        return numbered

    async def notify(self, payload: str) -> None:
        await self._pool.execute("SELECT pg_notify($1, $2)", CHANNEL, payload)

    async def prune_events(self, older_than: dt.timedelta) -> int:
        """Drop the oldest numbered events past retention, never one a delivery
        still waits on."""
        async with self._pool.acquire() as connection, connection.transaction():
            through: int | None = await connection.fetchval(
                """SELECT least(
                       (SELECT max(seq) FROM events
                        WHERE publish_time < now() - $1::interval),
                       (SELECT min(e.seq) - 1 FROM deliveries d
                        JOIN events e ON e.pos = d.event_pos
                        WHERE d.status IN ('pending', 'in_flight')))""",
                older_than,
            )
            if through is None:
                return 0
            result: str = await connection.execute("DELETE FROM events WHERE seq <= $1", through)
            await connection.execute(
                "UPDATE event_sequence SET pruned_through = greatest(pruned_through, $1)", through
            )
        return int(result.split()[-1])

    # The delivery queue

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
