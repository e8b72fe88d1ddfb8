"""Grounding: the top passages from the search service, within a share of the deadline.

Search is another service: it is called through its generated stub, with a
timeout cut from the caller's remaining deadline, behind a circuit breaker.
Whatever goes wrong with it (down, slow, not built yet) becomes "no
grounding" plus a reason, never a failed chat, except an unknown collection,
which is the caller's mistake and answers NOT_FOUND.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field

import grpc

from aimesh.search.v1 import search_service_pb2, search_service_pb2_grpc
from aimesh_chat.prompting import Passage
from aimesh_runtime.context import downstream_timeout_s
from aimesh_runtime.errors import NotFound
from aimesh_runtime.resilience import BreakerOpen, CircuitBreaker

log = logging.getLogger(__name__)
DEFAULT_TOP_K = 5
MAX_QUERY_CHARS = 8192  # SearchRequest.query's limit


@dataclass(frozen=True)
class Retrieval:
    passages: Sequence[Passage] = field(default_factory=tuple)
    # Why grounding was asked for and is missing; None when it worked or was not asked.
    unavailable: str | None = None


class SearchRetriever:
    def __init__(
        self,
        channel: grpc.aio.Channel,
        breaker: CircuitBreaker,
        *,
        timeout_s: float,
        deadline_share: float,
    ) -> None:
        self._stub = search_service_pb2_grpc.SearchServiceStub(channel)
        self._breaker = breaker
        self._timeout_s = timeout_s
        self._share = deadline_share

    def budget_s(self) -> float:
        """Search's share of the caller's remaining deadline, capped."""
        return downstream_timeout_s(self._timeout_s, self._share)

    async def retrieve(self, collection: str, query: str, top_k: int) -> Retrieval:
        if not collection:
            return Retrieval()
        request = search_service_pb2.SearchRequest(
            parent=collection, query=query[:MAX_QUERY_CHARS], top_k=top_k or DEFAULT_TOP_K
        )
        timeout = self.budget_s()
        try:
            response = await self._breaker.call(lambda: self._stub.Search(request, timeout=timeout))
        except BreakerOpen:
            return Retrieval(unavailable="search is unavailable (circuit open)")
        except grpc.aio.AioRpcError as error:
            code = error.code()
            if code is grpc.StatusCode.NOT_FOUND:
                raise NotFound(
                    f"{collection} does not exist",
                    reason="COLLECTION_NOT_FOUND",
                    metadata={"collection": collection},
                ) from None
            log.warning("search failed: %s %s", code.name, error.details())
            if code is grpc.StatusCode.DEADLINE_EXCEEDED:
                why = f"search did not answer within {timeout:.2f} s"
            else:
                why = f"search is unavailable ({code.name})"
            return Retrieval(unavailable=why)
        passages = [Passage(r.document, r.text, r.score) for r in response.results]
        return Retrieval(passages=passages)
