"""A fake SearchService on a real gRPC port: canned results or a chosen failure."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

import grpc

from aimesh.search.v1 import search_service_pb2 as pb
from aimesh.search.v1 import search_service_pb2_grpc


@dataclass
class SearchScenario:
    # (document id, text) pairs, best first; names are collections/{c}/documents/{id}.
    documents: list[tuple[str, str]] = field(default_factory=list)
    fail: grpc.StatusCode | None = None  # answer this status instead
    delay_s: float = 0.0


class FakeSearch(search_service_pb2_grpc.SearchServiceServicer):
    def __init__(self) -> None:
        self.scenario = SearchScenario()
        self.requests: list[tuple[pb.SearchRequest, dict[str, str]]] = []
        self._server: grpc.aio.Server | None = None
        self.address = ""

    async def start(self) -> FakeSearch:
        server = grpc.aio.server()
        search_service_pb2_grpc.add_SearchServiceServicer_to_server(self, server)
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        self._server, self.address = server, f"127.0.0.1:{port}"
        return self

    async def stop(self) -> None:
        if self._server is not None:
            await self._server.stop(0)

    def reset(self, scenario: SearchScenario | None = None) -> None:
        self.scenario = scenario or SearchScenario()
        self.requests.clear()

    async def Search(
        self, request: pb.SearchRequest, context: grpc.aio.ServicerContext
    ) -> pb.SearchResponse:
        metadata = {k: v for k, v in context.invocation_metadata() or () if isinstance(v, str)}
        self.requests.append((request, metadata))
        scenario = self.scenario
        if scenario.delay_s:
            await asyncio.sleep(scenario.delay_s)
        if scenario.fail is not None:
            await context.abort(scenario.fail, f"fake search fails with {scenario.fail.name}")
        results = [
            pb.SearchResult(
                document=f"{request.parent}/documents/{doc_id}", score=1.0 - i / 100, text=text
            )
            for i, (doc_id, text) in enumerate(scenario.documents[: request.top_k])
        ]
        return pb.SearchResponse(results=results)
