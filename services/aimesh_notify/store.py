"""SQL of notify's subscriptions and topic grants, and the sealing of their
secrets at rest, over the notify database only. Events are in event_store.py,
the delivery queue in delivery_store.py.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence
from dataclasses import dataclass

import asyncpg


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
class TopicGrantRow:
    id: str
    topic_prefix: str
    grantee: str  # a user id
    create_time: dt.datetime


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


class SubscriptionStore:
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
