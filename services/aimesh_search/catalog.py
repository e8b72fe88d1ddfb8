"""Collections, documents and search: the search service's domain.

Writes go to PostgreSQL first, then to the collection's FAISS index, under a
per-collection lock so an upsert and a delete of the same document cannot
reorder. Searches take no lock: a hit whose row was deleted meanwhile is
dropped when results are read back from the database, so a deleted document
is never returned.
"""

from __future__ import annotations

import asyncio
import collections
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from aimesh_runtime.errors import (
    AlreadyExists,
    FailedPrecondition,
    FieldViolation,
    InvalidArgument,
    NotFound,
)
from aimesh_runtime.ownership import Owner
from aimesh_runtime.pages import (
    bad_page_token,
    cut_page,
    decode_page_token,
    encode_page_token,
    page_size,
)
from aimesh_runtime.resilience import FirstLoad
from aimesh_search import filters
from aimesh_search.batcher import BatcherMetrics, EncoderBatcher
from aimesh_search.cache import QueryCache
from aimesh_search.encoder import EncoderInfo
from aimesh_search.index import VectorIndex
from aimesh_search.settings import SearchSettings
from aimesh_search.store import (
    CollectionRow,
    Conflict,
    DocumentRow,
    NewDocument,
    SearchStore,
)

log = logging.getLogger(__name__)
FIRST_LOAD_WAIT_S = 30.0
OVERFETCH = 8  # extra hits read so rows deleted mid-search still leave top_k


@dataclass(frozen=True)
class DocumentInput:
    id: str
    text: str
    metadata: dict[str, Any]
    owner: str


@dataclass(frozen=True)
class Hit:
    document: DocumentRow
    score: float


@dataclass(frozen=True)
class Query:
    text: str
    top_k: int
    conditions: tuple[filters.Condition, ...]  # all must hold; none: no filter
    min_score: float | None


@dataclass(frozen=True)
class SearchAnswer:
    hits: list[Hit]
    query_truncated: bool  # the query text was cut to the model's input limit


def decode_after(token: str) -> str:
    """The id a list page starts after ("" for the first page)."""
    after = decode_page_token(token) or ""
    if not isinstance(after, str):
        raise bad_page_token()
    return after


class Catalog:
    def __init__(
        self,
        store: SearchStore,
        encoder: EncoderInfo,
        batcher: EncoderBatcher,
        cache: QueryCache,
        settings: SearchSettings,
        metrics: BatcherMetrics,
    ) -> None:
        self._metrics = metrics
        self._store = store
        self._encoder = encoder
        self._batcher = batcher
        self._cache = cache
        self._settings = settings
        self._indexes: dict[str, VectorIndex] = {}
        # Rows of the collections indexed here. Their model and dimension never
        # change, so a search checks them without a database round trip.
        self._served: dict[str, CollectionRow] = {}
        self._write_locks: collections.defaultdict[str, asyncio.Lock] = collections.defaultdict(
            asyncio.Lock
        )
        self._first_load = FirstLoad(
            "the search indexes are still loading; retry shortly", FIRST_LOAD_WAIT_S
        )

    @property
    def encoder(self) -> EncoderInfo:
        return self._encoder

    def _new_index(self, dimension: int) -> VectorIndex:
        return VectorIndex(
            dimension,
            ann_threshold=self._settings.ann_threshold,
            ef_search=self._settings.ann_ef_search,
            use_gpu=self._settings.faiss_gpu,
            search_threads=self._settings.faiss_threads,
        )

    async def load(self) -> None:
        """Rebuild every index from the stored vectors; health waits for this."""
        for row in await self._store.all_collections():
            index = self._new_index(row.dimension)
            batches = [b async for b in self._store.stream_embeddings(row.id, row.dimension)]
            ids = np.concatenate([b[0] for b in batches]) if batches else np.zeros(0, np.int64)
            vectors = (
                np.vstack([b[1] for b in batches])
                if batches
                else np.zeros((0, row.dimension), np.float32)
            )
            await asyncio.get_running_loop().run_in_executor(None, index.load, ids, vectors)
            self._indexes[row.id] = index
            self._served[row.id] = row
            log.info("loaded collection %s: %d vectors", row.id, index.size)
        self._first_load.set()

    @property
    def loaded(self) -> bool:
        return self._first_load.done

    def close(self) -> None:
        for index in self._indexes.values():
            index.close()

    # collections

    async def _collection(self, collection_id: str) -> CollectionRow:
        row = await self._store.collection(collection_id)
        if row is None:
            name = f"collections/{collection_id}"
            raise NotFound(f"{name} does not exist", metadata={"name": name})
        return row

    def _check_served(self, row: CollectionRow) -> None:
        if row.embedding_model != self._encoder.name or row.dimension != self._encoder.dimension:
            raise FailedPrecondition(
                f"collections/{row.id} uses {row.embedding_model} ({row.dimension} dimensions); "
                f"this service serves {self._encoder.name} ({self._encoder.dimension})",
                reason="MODEL_MISMATCH",
            )

    async def create_collection(
        self,
        collection_id: str,
        display_name: str,
        model: str,
        dimension: int,
        owner: str,
        visibility: str = "PRIVATE",
    ) -> CollectionRow:
        model = model or self._encoder.name
        if model != self._encoder.name:
            raise FailedPrecondition(
                f"model {model} is not served here; this service serves {self._encoder.name}",
                reason="MODEL_NOT_SERVED",
            )
        dimension = dimension or self._encoder.dimension
        if dimension != self._encoder.dimension:
            raise FailedPrecondition(
                f"{model} makes {self._encoder.dimension}-dimensional vectors, not {dimension}",
                reason="DIMENSION_MISMATCH",
            )
        try:
            row = await self._store.insert_collection(
                collection_id,
                display_name,
                model,
                dimension,
                self._encoder.max_tokens,
                owner,
                visibility,
            )
        except Conflict:
            raise AlreadyExists(f"collections/{collection_id} already exists") from None
        self._indexes[collection_id] = self._new_index(dimension)
        self._served[collection_id] = row
        return row

    async def owner_of(self, name: str) -> Owner | None:
        """Who owns the collection that `name` ("collections/{id}/...") lies in.

        Read from the store on every call, not from this replica's cache: another
        replica may have deleted the collection and someone else recreated it.
        """
        collection_id = name.removeprefix("collections/").split("/", 1)[0]
        found = await self._store.collection_owner(collection_id)
        if found is None:
            return None
        owner, visibility = found
        return Owner(owner.removeprefix("users/"), shared=visibility == "ORGANISATION")

    async def update_collection(
        self, collection_id: str, display_name: str | None, visibility: str | None
    ) -> CollectionRow:
        if not await self._store.update_collection(collection_id, display_name, visibility):
            name = f"collections/{collection_id}"
            raise NotFound(f"{name} does not exist", metadata={"name": name})
        return await self._collection(collection_id)

    async def get_collection(self, collection_id: str) -> CollectionRow:
        return await self._collection(collection_id)

    async def list_collections(
        self, size: int, token: str, visible_to: str | None = None
    ) -> tuple[list[CollectionRow], str]:
        limit = page_size(size)
        rows = await self._store.collections(decode_after(token), limit + 1, visible_to)
        return cut_page(rows, limit, lambda row: encode_page_token(row.id))

    async def delete_collection(self, collection_id: str) -> None:
        async with self._write_locks[collection_id]:
            if not await self._store.delete_collection(collection_id):
                name = f"collections/{collection_id}"
                raise NotFound(f"{name} does not exist", metadata={"name": name})
            index = self._forget(collection_id)
        if index is not None:
            index.close()

    def _forget(self, collection_id: str) -> VectorIndex | None:
        self._served.pop(collection_id, None)
        return self._indexes.pop(collection_id, None)

    def is_approximate(self, collection_id: str) -> bool:
        index = self._indexes.get(collection_id)
        return index is not None and index.approximate

    async def index_of(self, collection_id: str) -> VectorIndex:
        await self._first_load.wait()  # rather than fail on a collection not yet read
        index = self._indexes.get(collection_id)
        if index is None:  # created by another replica since we loaded
            raise FailedPrecondition(
                f"collections/{collection_id} is not loaded on this replica yet; retry",
                reason="INDEX_NOT_LOADED",
            )
        return index

    # documents

    async def upsert(
        self, collection_id: str, documents: Sequence[DocumentInput]
    ) -> list[DocumentRow]:
        counts = collections.Counter(d.id for d in documents)
        duplicates = sorted(doc_id for doc_id, count in counts.items() if count > 1)
        if duplicates:
            raise InvalidArgument(
                f"document ids repeat within the batch: {', '.join(duplicates)}",
                [FieldViolation("documents", f"duplicate id {d}") for d in duplicates],
                reason="DUPLICATE_IDS",
            )
        row = await self._collection(collection_id)
        self._check_served(row)
        encoded = await self._batcher.encode_bulk([d.text for d in documents])
        return await self.store_encoded(
            collection_id, documents, encoded.vectors, encoded.truncated
        )

    async def store_encoded(
        self,
        collection_id: str,
        documents: Sequence[DocumentInput],
        vectors: np.ndarray,
        truncated: Sequence[bool],
        *,
        commit: Any = None,
    ) -> list[DocumentRow]:
        """Write embedded documents to the database, then to the index."""
        new = [
            NewDocument(d.id, d.text, d.metadata, d.owner, truncated[i], vectors[i])
            for i, d in enumerate(documents)
        ]
        async with self._write_locks[collection_id]:
            stored: list[DocumentRow] = await (
                commit(new) if commit else self._store.upsert_documents(collection_id, new)
            )
            if stored:
                by_id = {d.id: i for i, d in enumerate(documents)}
                order = [by_id[row.id] for row in stored]
                await (await self.index_of(collection_id)).upsert(
                    [row.vector_id for row in stored], vectors[order]
                )
        return stored

    async def get_document(self, collection_id: str, document_id: str) -> DocumentRow:
        await self._collection(collection_id)
        row = await self._store.document(collection_id, document_id)
        if row is None:
            name = f"collections/{collection_id}/documents/{document_id}"
            raise NotFound(f"{name} does not exist", metadata={"name": name})
        return row

    async def list_documents(
        self, collection_id: str, size: int, token: str
    ) -> tuple[list[DocumentRow], str]:
        await self._collection(collection_id)
        limit = page_size(size)
        rows = await self._store.documents(collection_id, decode_after(token), limit + 1)
        return cut_page(rows, limit, lambda row: encode_page_token(row.id))

    async def delete_document(self, collection_id: str, document_id: str) -> None:
        await self._collection(collection_id)
        async with self._write_locks[collection_id]:
            vector_id = await self._store.delete_document(collection_id, document_id)
            if vector_id is None:
                name = f"collections/{collection_id}/documents/{document_id}"
                raise NotFound(f"{name} does not exist", metadata={"name": name})
            await (await self.index_of(collection_id)).remove([vector_id])

    async def purge_owner(self, owner: str) -> int:
        removed = await self._store.delete_owned(owner)
        for collection_id, vector_ids in removed.items():
            index = self._indexes.get(collection_id)
            if index is not None:
                async with self._write_locks[collection_id]:
                    await index.remove(vector_ids)
        return sum(len(ids) for ids in removed.values())

    # search

    async def embed_queries(self, texts: Sequence[str]) -> tuple[np.ndarray, list[bool]]:
        """Query vectors, from the cache where possible; misses are batched."""
        model = self._encoder.name
        cached = [self._cache.get(model, text) for text in texts]
        missing = [i for i, hit in enumerate(cached) if hit is None]
        self._metrics.cache.labels("hit").inc(len(texts) - len(missing))
        self._metrics.cache.labels("miss").inc(len(missing))
        if missing:
            encoded = await self._batcher.encode([texts[i] for i in missing])
            for position, i in enumerate(missing):
                vector, truncated = encoded.vectors[position], encoded.truncated[position]
                self._cache.put(model, texts[i], vector, truncated)
                cached[i] = (vector, truncated)
        vectors = np.stack([hit[0] for hit in cached if hit is not None])
        return vectors, [hit[1] for hit in cached if hit is not None]

    async def search(self, collection_id: str, queries: Sequence[Query]) -> list[SearchAnswer]:
        for query in queries:
            for condition in query.conditions:
                if (
                    isinstance(condition, filters.Range)
                    and condition.min is not None
                    and condition.max is not None
                    and condition.min > condition.max
                ):
                    raise InvalidArgument.field(
                        "filter.conditions.range",
                        f"min {condition.min} exceeds max {condition.max}",
                    )
        row = self._served.get(collection_id) or await self._collection(collection_id)
        self._check_served(row)
        index = await self.index_of(collection_id)
        vectors, truncated = await self.embed_queries([q.text for q in queries])
        found = []
        for position, query in enumerate(queries):
            allowed = None
            if query.conditions:
                where, args = filters.to_sql(query.conditions, first_param=2)
                allowed = await self._store.matching_vector_ids(collection_id, where, args)
            scores, ids = await index.search(
                vectors[position : position + 1], query.top_k + OVERFETCH, allowed
            )
            found.append((scores[0], ids[0]))
        # One read for every query's hits; it also sees a collection deleted by
        # another replica since this one loaded it.
        wanted = sorted({int(i) for _, ids in found for i in ids if i >= 0})
        rows = await self._store.documents_by_vector_ids(collection_id, wanted)
        if rows is None:
            self._forget(collection_id)  # not closed: concurrent searches may still use it
            name = f"collections/{collection_id}"
            raise NotFound(f"{name} does not exist", metadata={"name": name})
        answers = []
        for position, (query, (scores, ids)) in enumerate(zip(queries, found, strict=True)):
            hits = []
            for score, vector_id in zip(scores, ids, strict=True):
                document = rows.get(int(vector_id))
                if document is None:  # deleted while we searched, or padding
                    continue
                if query.min_score is not None and score < query.min_score:
                    break
                hits.append(Hit(document, float(score)))
                if len(hits) == query.top_k:
                    break
            answers.append(SearchAnswer(hits, truncated[position]))
        return answers
