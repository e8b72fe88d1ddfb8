"""Fake peers on one real gRPC port: notify's Publish (deduplicating by
idempotency key, as the real one does) and the four PurgeUserData methods of
the user-deletion saga, over per-user record counts."""

from __future__ import annotations

import asyncio
import json
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import grpc
import jwt

from aimesh.chat.v1 import chat_service_pb2, chat_service_pb2_grpc
from aimesh.notify.v1 import notify_service_pb2, notify_service_pb2_grpc
from aimesh.recommend.v1 import recommend_service_pb2, recommend_service_pb2_grpc
from aimesh.search.v1 import search_service_pb2, search_service_pb2_grpc


@dataclass
class Published:
    key: str
    topic: str
    payload: dict[str, Any]
    metadata: dict[str, str]


@dataclass
class Peers:
    """State shared by the fake servicers; tests steer and read it."""

    published: list[Published] = field(default_factory=list)  # every call, repeats included
    first: dict[str, Published] = field(default_factory=dict)  # the deduplicated deliveries
    # service -> user name -> records held
    data: dict[str, dict[str, int]] = field(default_factory=dict)
    # (service, user, deleted) for every PurgeUserData call
    purges: list[tuple[str, str, int]] = field(default_factory=list)
    purge_scopes: list[set[str]] = field(default_factory=list)
    # Publish call number (1-based) that hangs until released; 0 for none.
    hang_publish_at: int = 0
    # Service whose next purge deletes, then hangs (a crash after the work).
    hang_purge: str = ""
    refuse_purge: dict[str, grpc.StatusCode] = field(default_factory=dict)
    refuse_topic: dict[str, grpc.StatusCode] = field(default_factory=dict)
    hung: asyncio.Event = field(default_factory=asyncio.Event)
    release: asyncio.Event = field(default_factory=asyncio.Event)

    def deliveries(self) -> Counter[str]:
        return Counter(p.key for p in self.published)

    async def publish(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        metadata = {k: str(v) for k, v in context.invocation_metadata() or ()}
        code = self.refuse_topic.get(request.topic)
        if code is not None:
            await context.abort(code, f"refused {request.topic}")
        self.published.append(
            Published(request.idempotency_key, request.topic, json.loads(request.payload), metadata)
        )
        if len(self.published) == self.hang_publish_at:
            self.hung.set()
            await self.release.wait()
        duplicate = request.idempotency_key in self.first
        if not duplicate:
            self.first[request.idempotency_key] = self.published[-1]
        return notify_service_pb2.PublishResponse(
            event=notify_service_pb2.Event(id=request.idempotency_key, topic=request.topic),
            duplicate=duplicate,
        )

    async def purge(self, service: str, user: str, context: grpc.aio.ServicerContext) -> int:
        metadata = dict(context.invocation_metadata() or ())
        token = str(metadata.get("authorization", "")).removeprefix("Bearer ")
        claims = jwt.decode(token, options={"verify_signature": False})
        self.purge_scopes.append(set(claims["scope"].split()))
        code = self.refuse_purge.get(service)
        if code is not None:
            await context.abort(code, f"{service} refuses")
        deleted = self.data.get(service, {}).pop(user, 0)
        self.purges.append((service, user, deleted))
        if self.hang_purge == service:
            self.hang_purge = ""
            self.hung.set()
            await asyncio.Event().wait()  # until the caller goes away
        return deleted


class _Notify(notify_service_pb2_grpc.NotifyServiceServicer):
    def __init__(self, peers: Peers) -> None:
        self.peers = peers

    async def Publish(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        return await self.peers.publish(request, context)

    async def PurgeUserData(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        deleted = await self.peers.purge("notify", request.user, context)
        return notify_service_pb2.PurgeUserDataResponse(deleted_subscriptions=deleted)


class _Chat(chat_service_pb2_grpc.ChatServiceServicer):
    def __init__(self, peers: Peers) -> None:
        self.peers = peers

    async def PurgeUserData(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        deleted = await self.peers.purge("chat", request.user, context)
        return chat_service_pb2.PurgeUserDataResponse(deleted_conversations=deleted)


class _Recommend(recommend_service_pb2_grpc.RecommendServiceServicer):
    def __init__(self, peers: Peers) -> None:
        self.peers = peers

    async def PurgeUserData(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        deleted = await self.peers.purge("recommend", request.user, context)
        return recommend_service_pb2.PurgeUserDataResponse(deleted_interactions=deleted)


class _Search(search_service_pb2_grpc.SearchServiceServicer):
    def __init__(self, peers: Peers) -> None:
        self.peers = peers

    async def PurgeUserData(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        deleted = await self.peers.purge("search", request.user, context)
        return search_service_pb2.PurgeUserDataResponse(deleted_documents=deleted)


class FakePeers:
    def __init__(self) -> None:
        self.state = Peers()
        self.address = ""
        self._server: grpc.aio.Server | None = None

    async def start(self) -> FakePeers:
        server = grpc.aio.server()
        notify_service_pb2_grpc.add_NotifyServiceServicer_to_server(_Notify(self.state), server)
        chat_service_pb2_grpc.add_ChatServiceServicer_to_server(_Chat(self.state), server)
        recommend_service_pb2_grpc.add_RecommendServiceServicer_to_server(
            _Recommend(self.state), server
        )
        search_service_pb2_grpc.add_SearchServiceServicer_to_server(_Search(self.state), server)
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        self._server, self.address = server, f"127.0.0.1:{port}"
        return self

    async def stop(self) -> None:
        if self._server is not None:
            await self._server.stop(0)
