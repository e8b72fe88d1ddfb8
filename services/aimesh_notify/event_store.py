"""SQL of notify's events: publishing (with the deliveries it queues), the
sequencer that numbers them for streams, reading them back, and retention.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import asyncpg

DEADLOCK_RETRIES = 3
CHANNEL = "aimesh_notify"  # LISTEN/NOTIFY channel: new events and due deliveries


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


class EventStore:
    def __init__(self, pool: asyncpg.Pool) -> None:
        self._pool = pool

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
