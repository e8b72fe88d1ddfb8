"""SQL of the search service, over its own database only."""

from __future__ import annotations

import datetime as dt
import json
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import asyncpg
import numpy as np

from aimesh_runtime import outbox
from aimesh_search.encoder import Vectors


@dataclass(frozen=True)
class CollectionRow:
    id: str
    display_name: str
    embedding_model: str
    dimension: int
    max_input_tokens: int
    create_time: dt.datetime
    update_time: dt.datetime
    document_count: int = 0
    owner: str = ""  # "users/{id}"; "" for the platform's
    visibility: str = "PRIVATE"  # or "ORGANISATION"


@dataclass(frozen=True)
class DocumentRow:
    collection_id: str
    id: str
    vector_id: int
    text: str
    metadata: dict[str, Any]
    owner: str
    text_truncated: bool
    create_time: dt.datetime
    update_time: dt.datetime


@dataclass(frozen=True)
class NewDocument:
    id: str
    text: str
    metadata: dict[str, Any]
    owner: str
    text_truncated: bool
    embedding: np.ndarray


@dataclass
class ImportJobRow:
    collection_id: str
    id: str
    display_name: str
    state: str
    total_bytes: int
    committed_bytes: int
    committed_lines: int
    upserted_documents: int
    truncated_documents: int
    failed_lines: int
    line_errors: list[dict[str, Any]] = field(default_factory=list)
    error_message: str = ""
    feeder: str | None = None
    create_time: dt.datetime | None = None
    update_time: dt.datetime | None = None
    end_time: dt.datetime | None = None


class Conflict(Exception):
    pass


def _document(row: asyncpg.Record) -> DocumentRow:
    return DocumentRow(
        row["collection_id"], row["id"], row["vector_id"], row["text"],
        json.loads(row["metadata"]), row["owner"], row["text_truncated"],
        row["create_time"], row["update_time"],
    )  # fmt: skip


def _job(row: asyncpg.Record) -> ImportJobRow:
    values = dict(row)
    values["line_errors"] = json.loads(values["line_errors"])
    return ImportJobRow(**values)


COLLECTION_COLUMNS = """c.id, c.display_name, c.embedding_model, c.dimension, c.max_input_tokens,
    c.create_time, c.update_time, c.owner, c.visibility,
    (SELECT count(*) FROM documents d WHERE d.collection_id = c.id) AS document_count"""


class SearchStore:
    def __init__(self, pool: asyncpg.Pool) -> None:
        self._pool = pool

    # collections

    async def insert_collection(
        self,
        collection_id: str,
        display_name: str,
        model: str,
        dimension: int,
        max_tokens: int,
        owner: str,
        visibility: str,
    ) -> CollectionRow:
        try:
            await self._pool.execute(
                """INSERT INTO collections (id, display_name, embedding_model, dimension,
                                          max_input_tokens, owner, visibility)
                   VALUES ($1, $2, $3, $4, $5, $6, $7)""",
                collection_id, display_name, model, dimension, max_tokens, owner, visibility,
            )  # fmt: skip
        except asyncpg.UniqueViolationError:
            raise Conflict(collection_id) from None
        found = await self.collection(collection_id)
        assert found is not None
        return found

    async def collection(self, collection_id: str) -> CollectionRow | None:
        row = await self._pool.fetchrow(
            f"SELECT {COLLECTION_COLUMNS} FROM collections c WHERE c.id = $1", collection_id
        )
        return None if row is None else CollectionRow(**dict(row))

    async def collections(
        self, after: str, limit: int, visible_to: str | None = None
    ) -> list[CollectionRow]:
        """A page of collections; only those `visible_to` may read ("users/{id}"), or all."""
        rows = await self._pool.fetch(
            f"""SELECT {COLLECTION_COLUMNS} FROM collections c
                WHERE c.id > $1
                  AND ($3::text IS NULL OR c.owner = $3 OR c.visibility = 'ORGANISATION')
                ORDER BY c.id LIMIT $2""",
            after, limit, visible_to,
        )  # fmt: skip
        return [CollectionRow(**dict(row)) for row in rows]

    async def update_collection(
        self, collection_id: str, display_name: str | None, visibility: str | None
    ) -> bool:
        """Set the given fields (None: keep); False if there is no such collection."""
        found = await self._pool.fetchval(
            """UPDATE collections SET display_name = coalesce($2, display_name),
                   visibility = coalesce($3, visibility), update_time = now()
               WHERE id = $1 RETURNING id""",
            collection_id, display_name, visibility,
        )  # fmt: skip
        return found is not None

    async def collection_owner(self, collection_id: str) -> tuple[str, str] | None:
        """(owner, visibility) of a collection, or None if it does not exist."""
        row = await self._pool.fetchrow(
            "SELECT owner, visibility FROM collections WHERE id = $1", collection_id
        )
        return None if row is None else (row["owner"], row["visibility"])

    async def all_collections(self) -> list[CollectionRow]:
        return await self.collections("", 1_000_000)

    async def delete_collection(self, collection_id: str) -> bool:
        deleted = await self._pool.fetchval(
            "DELETE FROM collections WHERE id = $1 RETURNING id", collection_id
        )
        return deleted is not None

    # documents

    async def upsert_documents(
        self, collection_id: str, documents: Sequence[NewDocument]
    ) -> list[DocumentRow]:
        async with self._pool.acquire() as connection, connection.transaction():
            return await upsert_in(connection, collection_id, documents)

    async def document(self, collection_id: str, document_id: str) -> DocumentRow | None:
        row = await self._pool.fetchrow(
            "SELECT * FROM documents WHERE collection_id = $1 AND id = $2",
            collection_id, document_id,
        )  # fmt: skip
        return None if row is None else _document(row)

    async def documents(self, collection_id: str, after: str, limit: int) -> list[DocumentRow]:
        rows = await self._pool.fetch(
            """SELECT * FROM documents WHERE collection_id = $1 AND id > $2
               ORDER BY id LIMIT $3""",
            collection_id, after, limit,
        )  # fmt: skip
        return [_document(row) for row in rows]

    async def documents_by_vector_ids(
        self, collection_id: str, vector_ids: Sequence[int]
    ) -> dict[int, DocumentRow] | None:
        """The documents holding these vectors; None if the collection is gone."""
        rows = await self._pool.fetch(
            """SELECT d.* FROM collections c
               LEFT JOIN documents d
                 ON d.collection_id = c.id AND d.vector_id = ANY($2::bigint[])
               WHERE c.id = $1""",
            collection_id, list(vector_ids),
        )  # fmt: skip
        if not rows:
            return None
        return {row["vector_id"]: _document(row) for row in rows if row["vector_id"] is not None}

    async def delete_document(self, collection_id: str, document_id: str) -> int | None:
        vector_id: int | None = await self._pool.fetchval(
            "DELETE FROM documents WHERE collection_id = $1 AND id = $2 RETURNING vector_id",
            collection_id, document_id,
        )  # fmt: skip
        return vector_id

    async def delete_owned(self, owner: str) -> dict[str, list[int]]:
        async with self._pool.acquire() as connection, connection.transaction():
            rows = await connection.fetch(
                "DELETE FROM documents WHERE owner = $1 RETURNING collection_id, vector_id", owner
            )
            # Its collections outlive it as the platform's (admins may then delete them),
            # rather than staying owned by nobody who can sign in.
            await connection.execute("UPDATE collections SET owner = '' WHERE owner = $1", owner)
        removed: dict[str, list[int]] = {}
        for row in rows:
            removed.setdefault(row["collection_id"], []).append(row["vector_id"])
        return removed

    async def matching_vector_ids(
        self, collection_id: str, where: str, args: list[Any]
    ) -> list[int]:
        """Vector ids of documents whose metadata satisfies `where` (built by filters.py)."""
        rows = await self._pool.fetch(
            f"SELECT vector_id FROM documents WHERE collection_id = $1 AND ({where})",
            collection_id, *args,
        )  # fmt: skip
        return [row["vector_id"] for row in rows]

    async def stream_embeddings(
        self, collection_id: str, dimension: int, batch: int = 10_000
    ) -> AsyncIterator[tuple[np.ndarray, Vectors]]:
        """All (vector ids, vectors) of a collection, in batches, for rebuilding its index."""
        async with self._pool.acquire() as connection, connection.transaction():
            cursor = connection.cursor(
                "SELECT vector_id, embedding FROM documents WHERE collection_id = $1",
                collection_id,
            )
            ids: list[int] = []
            blobs: list[bytes] = []
            async for row in cursor:
                ids.append(row["vector_id"])
                blobs.append(row["embedding"])
                if len(ids) == batch:
                    yield _matrix(ids, blobs, dimension)
                    ids, blobs = [], []
            if ids:
                yield _matrix(ids, blobs, dimension)

    # import jobs

    async def import_job(self, collection_id: str, job_id: str) -> ImportJobRow | None:
        row = await self._pool.fetchrow(
            "SELECT * FROM import_jobs WHERE collection_id = $1 AND id = $2", collection_id, job_id
        )
        return None if row is None else _job(row)

    async def import_jobs(self, collection_id: str, after: str, limit: int) -> list[ImportJobRow]:
        rows = await self._pool.fetch(
            """SELECT * FROM import_jobs WHERE collection_id = $1 AND id > $2
               ORDER BY id LIMIT $3""",
            collection_id, after, limit,
        )  # fmt: skip
        return [_job(row) for row in rows]

    async def claim_import_job(
        self, collection_id: str, job_id: str, display_name: str, total_bytes: int, feeder: str
    ) -> ImportJobRow:
        """Create the job, or take over an unfed one, marking it RUNNING for `feeder`."""
        async with self._pool.acquire() as connection, connection.transaction():
            await connection.execute(
                """INSERT INTO import_jobs (collection_id, id, display_name, state, total_bytes)
                   VALUES ($1, $2, $3, 'INTERRUPTED', $4)
                   ON CONFLICT (collection_id, id) DO NOTHING""",
                collection_id, job_id, display_name, total_bytes,
            )  # fmt: skip
            row = await connection.fetchrow(
                "SELECT * FROM import_jobs WHERE collection_id = $1 AND id = $2 FOR UPDATE",
                collection_id, job_id,
            )  # fmt: skip
            job = _job(row)
            if job.state in ("INTERRUPTED", "CANCELLED"):
                row = await connection.fetchrow(
                    """UPDATE import_jobs SET state = 'RUNNING', feeder = $3,
                           total_bytes = greatest(total_bytes, $4), update_time = now()
                       WHERE collection_id = $1 AND id = $2 RETURNING *""",
                    collection_id, job_id, feeder, total_bytes,
                )  # fmt: skip
                return _job(row)
            return job

    async def commit_import_batch(
        self,
        job: ImportJobRow,
        documents: Sequence[NewDocument],
        committed_bytes: int,
        lines: int,
        failed: list[dict[str, Any]],
    ) -> tuple[list[DocumentRow], str]:
        """Upsert a batch and advance the job in one transaction; returns the job's state."""
        async with self._pool.acquire() as connection, connection.transaction():
            state = await connection.fetchval(
                "SELECT state FROM import_jobs WHERE collection_id = $1 AND id = $2 FOR UPDATE",
                job.collection_id, job.id,
            )  # fmt: skip
            if state != "RUNNING":  # cancelled meanwhile: this batch is not committed
                return [], str(state)
            stored = await upsert_in(connection, job.collection_id, documents)
            await connection.execute(
                """UPDATE import_jobs SET committed_bytes = $3,
                       committed_lines = committed_lines + $4,
                       upserted_documents = upserted_documents + $5,
                       truncated_documents = truncated_documents + $6,
                       failed_lines = failed_lines + $7,
                       line_errors = (line_errors || $8::jsonb),
                       update_time = now()
                   WHERE collection_id = $1 AND id = $2""",
                job.collection_id, job.id, committed_bytes, lines, len(stored),
                sum(d.text_truncated for d in documents), len(failed), json.dumps(failed),
            )  # fmt: skip
            # Keep the first 100 line errors: enough to fix a file, bounded in size.
            await connection.execute(
                """UPDATE import_jobs SET line_errors = (
                       SELECT coalesce(jsonb_agg(e), '[]') FROM (
                           SELECT e FROM jsonb_array_elements(line_errors) e LIMIT 100) s)
                   WHERE collection_id = $1 AND id = $2
                     AND jsonb_array_length(line_errors) > 100""",
                job.collection_id, job.id,
            )  # fmt: skip
            return stored, "RUNNING"

    async def finish_import_job(
        self, collection_id: str, job_id: str, state: str, error: str = ""
    ) -> ImportJobRow:
        async with self._pool.acquire() as connection, connection.transaction():
            row = await connection.fetchrow(
                """UPDATE import_jobs SET state = $3, error_message = $4, feeder = NULL,
                       update_time = now(),
                       end_time = CASE WHEN $3 IN ('SUCCEEDED', 'FAILED') THEN now() END
                   WHERE collection_id = $1 AND id = $2 RETURNING *""",
                collection_id, job_id, state, error,
            )  # fmt: skip
            job = _job(row)
            if state in ("SUCCEEDED", "FAILED"):
                name = f"collections/{collection_id}/importJobs/{job_id}"
                await outbox.emit(
                    connection,
                    topic="search.import_finished",
                    key=name,
                    payload={
                        "import_job": name,
                        "state": state,
                        "upserted_documents": row["upserted_documents"],
                        "failed_lines": row["failed_lines"],
                        "error": error,
                    },
                )
        return job

    async def cancel_import_job(self, collection_id: str, job_id: str) -> ImportJobRow | None:
        row = await self._pool.fetchrow(
            """UPDATE import_jobs SET state = 'CANCELLED', feeder = NULL, update_time = now()
               WHERE collection_id = $1 AND id = $2 AND state IN ('RUNNING', 'INTERRUPTED')
               RETURNING *""",
            collection_id, job_id,
        )  # fmt: skip
        if row is None:
            return await self.import_job(collection_id, job_id)
        return _job(row)

    async def interrupt_orphaned_jobs(self) -> int:
        """Jobs left RUNNING by a process that died can be resumed."""
        result: str = await self._pool.execute(
            "UPDATE import_jobs SET state = 'INTERRUPTED', feeder = NULL WHERE state = 'RUNNING'"
        )
        return int(result.split()[-1])


async def upsert_in(
    connection: asyncpg.Connection, collection_id: str, documents: Sequence[NewDocument]
) -> list[DocumentRow]:
    rows = await connection.fetch(
        """INSERT INTO documents
               (collection_id, id, text, metadata, owner, text_truncated, embedding)
           SELECT $1, d.id, d.text, d.metadata::jsonb, d.owner, d.text_truncated, d.embedding
           FROM unnest($2::text[], $3::text[], $4::text[], $5::text[], $6::boolean[], $7::bytea[])
               AS d (id, text, metadata, owner, text_truncated, embedding)
           ON CONFLICT (collection_id, id) DO UPDATE SET
               text = excluded.text, metadata = excluded.metadata, owner = excluded.owner,
               text_truncated = excluded.text_truncated, embedding = excluded.embedding,
               update_time = now()
           RETURNING *""",
        collection_id,
        [d.id for d in documents],
        [d.text for d in documents],
        [json.dumps(d.metadata) for d in documents],
        [d.owner for d in documents],
        [d.text_truncated for d in documents],
        [np.asarray(d.embedding, dtype="<f4").tobytes() for d in documents],
    )
    return [_document(row) for row in rows]


def _matrix(ids: list[int], blobs: list[bytes], dimension: int) -> tuple[np.ndarray, Vectors]:
    vectors = np.frombuffer(b"".join(blobs), dtype="<f4").reshape(len(ids), dimension)
    return np.asarray(ids, dtype=np.int64), vectors.astype(np.float32)
