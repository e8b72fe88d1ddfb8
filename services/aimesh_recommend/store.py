"""SQL of the recommend service, over its own database only."""

from __future__ import annotations

import datetime as dt
import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import asyncpg

from aimesh_runtime import audit

KIND_NAMES = {1: "VIEW", 2: "CLICK", 3: "PURCHASE", 4: "RATING"}


@dataclass(frozen=True)
class NewInteraction:
    id: str
    user: str  # "users/{user}"
    item: str  # item id
    kind: int
    weight: float
    event_time: dt.datetime
    serving_id: str


@dataclass(frozen=True)
class ItemRow:
    id: str
    text: str
    metadata: dict[str, Any]
    content_embedded: bool
    create_time: dt.datetime
    update_time: dt.datetime


@dataclass
class JobRow:
    id: str
    model_version: str
    epochs: int
    state: str
    completed_epochs: int
    progress: float
    loss: float
    training_interactions: int
    error_message: str
    create_time: dt.datetime
    update_time: dt.datetime
    end_time: dt.datetime | None


@dataclass(frozen=True)
class VersionRow:
    version: str
    status: str
    metrics: dict[str, float]
    training_job: str
    create_time: dt.datetime
    update_time: dt.datetime
    seq: int


@dataclass(frozen=True)
class Artifact:
    version: str
    blob: bytes
    user_ids: list[str]
    item_ids: list[str]


@dataclass(frozen=True)
class Serving:
    id: str
    user: str
    model_version: str
    fallback_reason: str
    serve_time: dt.datetime


class Conflict(Exception):
    pass


def _item(row: asyncpg.Record) -> ItemRow:
    return ItemRow(
        row["id"], row["text"], json.loads(row["metadata"]), row["content_embedded"],
        row["create_time"], row["update_time"],
    )  # fmt: skip


def _version(row: asyncpg.Record) -> VersionRow:
    return VersionRow(
        row["version"], row["status"], json.loads(row["metrics"]), row["training_job"],
        row["create_time"], row["update_time"], row["seq"],
    )  # fmt: skip


VERSION_COLUMNS = "version, status, metrics, training_job, create_time, update_time, seq"


class RecommendStore:
    def __init__(self, pool: asyncpg.Pool) -> None:
        self.pool = pool

    # interactions

    async def record(self, interactions: Sequence[NewInteraction]) -> int:
        """Insert all, in one transaction; returns how many were new."""
        async with self.pool.acquire() as connection, connection.transaction():
            rows = await connection.fetch(
                """INSERT INTO interactions
                       (id, user_id, item_id, kind, weight, event_time, serving_id)
                   SELECT * FROM unnest($1::text[], $2::text[], $3::text[], $4::smallint[],
                                        $5::float8[], $6::timestamptz[], $7::text[])
                   ON CONFLICT (id) DO NOTHING RETURNING id""",
                [i.id for i in interactions], [i.user for i in interactions],
                [i.item for i in interactions], [i.kind for i in interactions],
                [i.weight for i in interactions], [i.event_time for i in interactions],
                [i.serving_id for i in interactions],
            )  # fmt: skip
        return len(rows)

    async def interaction_counts(self) -> tuple[int, int, int]:
        row = await self.pool.fetchrow(
            """SELECT count(*) AS n, count(DISTINCT user_id) AS users,
                      count(DISTINCT item_id) AS items FROM interactions"""
        )
        assert row is not None
        return int(row["n"]), int(row["users"]), int(row["items"])

    async def training_events(self) -> list[tuple[str, str, float, float]]:
        """(user, item, weight, epoch seconds), for training and evaluation."""
        rows = await self.pool.fetch(
            """SELECT user_id, item_id, CASE WHEN weight = 0 THEN 1 ELSE weight END AS w,
                      extract(epoch FROM event_time)::float8 AS t FROM interactions"""
        )
        return [(r["user_id"], r["item_id"], r["w"], r["t"]) for r in rows]

    async def seen_items(self, user: str) -> list[str]:
        rows = await self.pool.fetch(
            "SELECT DISTINCT item_id FROM interactions WHERE user_id = $1", user
        )
        return [row["item_id"] for row in rows]

    async def seen_pairs(self) -> list[tuple[str, str]]:
        """Every (user, item) pair with an interaction: what serving masks."""
        rows = await self.pool.fetch("SELECT DISTINCT user_id, item_id FROM interactions")
        return [(row["user_id"], row["item_id"]) for row in rows]

    async def popularity(self, limit: int) -> list[tuple[str, float]]:
        """Catalogue items by distinct users who interacted, most first."""
        rows = await self.pool.fetch(
            """SELECT it.id, count(DISTINCT i.user_id)::float8 AS n
               FROM items it LEFT JOIN interactions i ON i.item_id = it.id
               GROUP BY it.id ORDER BY n DESC, it.id LIMIT $1""",
            limit,
        )
        return [(row["id"], row["n"]) for row in rows]

    async def purge_user(self, user: str) -> int:
        async with self.pool.acquire() as connection, connection.transaction():
            deleted = await connection.fetchval(
                """WITH gone AS (DELETE FROM interactions WHERE user_id = $1 RETURNING 1)
                   SELECT count(*) FROM gone""",
                user,
            )
            await connection.execute("DELETE FROM servings WHERE user_id = $1", user)
            await audit.pseudonymise(connection, user.removeprefix("users/"))
        return int(deleted)

    # items

    async def upsert_items(self, items: Sequence[tuple[str, str, dict[str, Any]]]) -> list[ItemRow]:
        rows = await self.pool.fetch(
            """INSERT INTO items (id, text, metadata)
               SELECT id, text, metadata::jsonb
               FROM unnest($1::text[], $2::text[], $3::text[]) AS u(id, text, metadata)
               ON CONFLICT (id) DO UPDATE SET text = excluded.text,
                   metadata = excluded.metadata, update_time = now(),
                   content_embedded = items.content_embedded AND items.text = excluded.text
               RETURNING *""",
            [i[0] for i in items], [i[1] for i in items], [json.dumps(i[2]) for i in items],
        )  # fmt: skip
        by_id = {row["id"]: _item(row) for row in rows}
        return [by_id[i[0]] for i in items]

    async def mark_embedded(self, ids: Sequence[str], texts: Sequence[str]) -> None:
        # Only if the text is still the one that was embedded.
        await self.pool.execute(
            """UPDATE items SET content_embedded = true
               FROM unnest($1::text[], $2::text[]) AS u(id, text)
               WHERE items.id = u.id AND items.text = u.text""",
            list(ids), list(texts),
        )  # fmt: skip

    async def item(self, item_id: str) -> ItemRow | None:
        row = await self.pool.fetchrow("SELECT * FROM items WHERE id = $1", item_id)
        return None if row is None else _item(row)

    async def items(self, after: str, limit: int) -> list[ItemRow]:
        rows = await self.pool.fetch(
            "SELECT * FROM items WHERE id > $1 ORDER BY id LIMIT $2", after, limit
        )
        return [_item(row) for row in rows]

    async def catalogue_version(self) -> int:
        """Raised by every change to the items (trigger of migration 0003)."""
        return int(await self.pool.fetchval("SELECT version FROM catalogue_version"))

    async def item_ids(self) -> list[str]:
        return [row["id"] for row in await self.pool.fetch("SELECT id FROM items")]

    async def delete_item(self, item_id: str) -> bool:
        return (
            await self.pool.fetchval("DELETE FROM items WHERE id = $1 RETURNING id", item_id)
            is not None
        )

    # training jobs and the registry

    async def create_job(self, job_id: str, version: str, epochs: int, count: int) -> JobRow:
        """Insert a PENDING job and its TRAINING version together."""
        async with self.pool.acquire() as connection, connection.transaction():
            try:
                await connection.execute(
                    """INSERT INTO model_versions (version, status, training_job)
                       VALUES ($1, 'TRAINING', $2)""",
                    version, f"trainingJobs/{job_id}",
                )  # fmt: skip
            except asyncpg.UniqueViolationError:
                raise Conflict(version) from None
            row = await connection.fetchrow(
                """INSERT INTO training_jobs (id, model_version, epochs, state,
                       training_interactions)
                   VALUES ($1, $2, $3, 'PENDING', $4) RETURNING *""",
                job_id, version, epochs, count,
            )  # fmt: skip
        return JobRow(**dict(row))

    async def next_version(self) -> str:
        versions = await self.pool.fetch("SELECT version FROM model_versions")
        numbers = [int(r["version"][1:]) for r in versions if r["version"][1:].isdigit()]
        return f"v{max(numbers, default=0) + 1}"

    async def job(self, job_id: str) -> JobRow | None:
        row = await self.pool.fetchrow("SELECT * FROM training_jobs WHERE id = $1", job_id)
        return None if row is None else JobRow(**dict(row))

    async def update_job(self, job_id: str, **values: Any) -> JobRow | None:
        """Set fields of a job that has not ended; None if it has."""
        names = list(values)
        sets = ", ".join(f"{name} = ${n + 2}" for n, name in enumerate(names))
        row = await self.pool.fetchrow(
            f"""UPDATE training_jobs SET {sets}, update_time = now()
                WHERE id = $1 AND state IN ('PENDING', 'RUNNING') RETURNING *""",
            job_id, *values.values(),
        )  # fmt: skip
        return None if row is None else JobRow(**dict(row))

    async def end_job(
        self, job_id: str, state: str, error: str = "", connection: Any = None
    ) -> JobRow | None:
        """Move a live job to a final state, and fail its version unless it SUCCEEDED."""
        run = connection or self.pool
        row = await run.fetchrow(
            """UPDATE training_jobs SET state = $2, error_message = $3,
                   update_time = now(), end_time = now(),
                   progress = CASE WHEN $2 = 'SUCCEEDED' THEN 1 ELSE progress END
               WHERE id = $1 AND state IN ('PENDING', 'RUNNING') RETURNING *""",
            job_id, state, error,
        )  # fmt: skip
        if row is not None and state != "SUCCEEDED":
            await run.execute(
                """UPDATE model_versions SET status = 'FAILED', update_time = now()
                   WHERE version = $1 AND status = 'TRAINING'""",
                row["model_version"],
            )
        return None if row is None else JobRow(**dict(row))

    async def interrupt_orphaned_jobs(self) -> int:
        rows = await self.pool.fetch(
            """SELECT id FROM training_jobs WHERE state IN ('PENDING', 'RUNNING')"""
        )
        for row in rows:
            await self.end_job(row["id"], "FAILED", "interrupted: the service restarted")
        return len(rows)

    async def register(
        self,
        connection: Any,
        version: str,
        blob: bytes,
        user_ids: list[str],
        item_ids: list[str],
        metrics: dict[str, float],
    ) -> bool:
        """Store the artifact and make the version READY (in the caller's transaction)."""
        done = await connection.fetchval(
            """UPDATE model_versions SET status = 'READY', artifact = $2, user_ids = $3,
                   item_ids = $4, metrics = $5::jsonb, update_time = now()
               WHERE version = $1 AND status = 'TRAINING' RETURNING version""",
            version, blob, user_ids, item_ids, json.dumps(metrics),
        )  # fmt: skip
        return done is not None

    async def version(self, version: str) -> VersionRow | None:
        row = await self.pool.fetchrow(
            f"SELECT {VERSION_COLUMNS} FROM model_versions WHERE version = $1", version
        )
        return None if row is None else _version(row)

    async def versions(self, before_seq: int | None, limit: int) -> list[VersionRow]:
        rows = await self.pool.fetch(
            f"""SELECT {VERSION_COLUMNS} FROM model_versions
                WHERE $1::bigint IS NULL OR seq < $1 ORDER BY seq DESC LIMIT $2""",
            before_seq, limit,
        )  # fmt: skip
        return [_version(row) for row in rows]

    async def artifact(self, version: str) -> Artifact | None:
        row = await self.pool.fetchrow(
            """SELECT version, artifact, user_ids, item_ids FROM model_versions
               WHERE version = $1 AND status = 'READY'""",
            version,
        )
        if row is None or row["artifact"] is None:
            return None
        return Artifact(row["version"], bytes(row["artifact"]), row["user_ids"], row["item_ids"])

    # servings and experiments

    async def add_servings(self, servings: Sequence[Serving], connection: Any = None) -> None:
        await (connection or self.pool).execute(
            """INSERT INTO servings (id, user_id, model_version, fallback_reason, serve_time)
               SELECT * FROM unnest($1::text[], $2::text[], $3::text[], $4::text[],
                                    $5::timestamptz[])
               ON CONFLICT (id) DO NOTHING""",
            [s.id for s in servings], [s.user for s in servings],
            [s.model_version for s in servings], [s.fallback_reason for s in servings],
            [s.serve_time for s in servings],
        )  # fmt: skip

    async def experiment_counts(
        self,
        version: str,
        kinds: Sequence[int],
        start: dt.datetime | None,
        end: dt.datetime | None,
    ) -> tuple[int, int]:
        """(exposed users, exposed users with an outcome attributed to this version)."""
        row = await self.pool.fetchrow(
            """WITH exposed AS (
                   SELECT id, user_id FROM servings
                   WHERE model_version = $1
                     AND ($3::timestamptz IS NULL OR serve_time >= $3)
                     AND ($4::timestamptz IS NULL OR serve_time < $4))
               SELECT (SELECT count(DISTINCT user_id) FROM exposed) AS exposures,
                      (SELECT count(DISTINCT e.user_id) FROM exposed e
                       JOIN interactions i ON i.serving_id = e.id AND i.user_id = e.user_id
                       WHERE i.kind = ANY($2::smallint[])) AS conversions""",
            version, list(kinds), start, end,
        )  # fmt: skip
        assert row is not None
        return int(row["exposures"]), int(row["conversions"])
