"""Item text through the search service: embedding it, and finding content neighbours.

Search is another service: it is called through its generated stub, with a
timeout cut from the caller's remaining deadline, behind a circuit breaker, and
with the caller's credentials (the pipeline forwards them). Search embeds item
texts as documents of one collection; a search with an item's text returns the
items closest in content, which answers for items the model has not seen
(cold start). When search is down or slow, items are stored without content
features (Item.content_embedded stays false) and content answers are empty with
a reason: never a failed recommend call.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

import grpc

from aimesh.search.v1 import search_service_pb2 as search_pb
from aimesh.search.v1 import search_service_pb2_grpc
from aimesh_runtime.context import downstream_timeout_s
from aimesh_runtime.resilience import BreakerOpen, CircuitBreaker

log = logging.getLogger(__name__)
MAX_QUERY_CHARS = 8192
UPSERT_BATCH = 256  # UpsertDocumentsRequest's limit


@dataclass(frozen=True)
class Neighbours:
    items: list[tuple[str, float]]
    # Why content could not answer: "breaker" or "unavailable"; None when it did.
    unavailable: str | None = None


class ContentIndex:
    def __init__(
        self,
        channel: grpc.aio.Channel,
        breaker: CircuitBreaker,
        collection: str,
        *,
        timeout_s: float,
        deadline_share: float = 0.5,
    ) -> None:
        self._stub = search_service_pb2_grpc.SearchServiceStub(channel)
        self.breaker = breaker
        self._collection = collection
        self._parent = f"collections/{collection}"
        self._timeout_s = timeout_s
        self._share = deadline_share
        self._collection_ready = False

    def budget_s(self) -> float:
        return downstream_timeout_s(self._timeout_s, self._share)

    async def embed(self, items: Sequence[tuple[str, str]]) -> set[str]:
        """Send (item id, text) pairs to search; returns the ids it embedded."""
        items = [(item, text) for item, text in items if text.strip()]
        if not items:
            return set()
        try:
            await self.breaker.call(self._ensure_collection)
            for start in range(0, len(items), UPSERT_BATCH):
                chunk = items[start : start + UPSERT_BATCH]
                request = search_pb.UpsertDocumentsRequest(
                    parent=self._parent,
                    documents=[
                        search_pb.Document(name=f"{self._parent}/documents/{item}", text=text)
                        for item, text in chunk
                    ],
                )
                await self._upsert(request)
        except BreakerOpen:
            log.info("search breaker open: %d items wait for content features", len(items))
            return set()
        except grpc.aio.AioRpcError as error:
            log.warning("search could not embed items: %s %s", error.code().name, error.details())
            return set()
        return {item for item, _ in items}

    async def _upsert(self, request: search_pb.UpsertDocumentsRequest) -> None:
        timeout = self.budget_s()
        await self.breaker.call(lambda: self._stub.UpsertDocuments(request, timeout=timeout))

    async def _ensure_collection(self) -> None:
        if self._collection_ready:
            return
        try:
            await self._stub.CreateCollection(
                search_pb.CreateCollectionRequest(
                    collection_id=self._collection,
                    # Members' SimilarItems search it with their own credentials.
                    collection=search_pb.Collection(
                        display_name="recommend items",
                        visibility=search_pb.VISIBILITY_ORGANISATION,
                    ),
                ),
                timeout=self.budget_s(),
            )
        except grpc.aio.AioRpcError as error:
            if error.code() != grpc.StatusCode.ALREADY_EXISTS:
                raise
        self._collection_ready = True

    async def forget(self, item: str) -> None:
        """Remove a deleted item from search, best effort."""
        try:
            await self.breaker.call(
                lambda: self._stub.DeleteDocument(
                    search_pb.DeleteDocumentRequest(name=f"{self._parent}/documents/{item}"),
                    timeout=self.budget_s(),
                )
            )
        except (BreakerOpen, grpc.aio.AioRpcError) as error:
            log.info("could not remove %s from search: %s", item, error)

    async def neighbours(self, text: str, k: int) -> Neighbours:
        """Items whose text is closest to `text`, best first."""
        if not text.strip():
            return Neighbours([], "unavailable")
        request = search_pb.SearchRequest(
            parent=self._parent, query=text[:MAX_QUERY_CHARS], top_k=min(k, 100)
        )
        timeout = self.budget_s()
        try:
            response = await self.breaker.call(lambda: self._stub.Search(request, timeout=timeout))
        except BreakerOpen:
            return Neighbours([], "breaker")
        except grpc.aio.AioRpcError as error:
            log.warning("search failed: %s %s", error.code().name, error.details())
            return Neighbours([], "unavailable")
        prefix = f"{self._parent}/documents/"
        return Neighbours([(r.document.removeprefix(prefix), r.score) for r in response.results])
