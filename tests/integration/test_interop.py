"""gRPC interop cases on every service, over real servers and channels.

Parametrised over the five services. Each is probed with a cheap read of its
own contract (a List or Get method with a valid request and an admin token).
recommend and notify may still answer UNIMPLEMENTED for that read while they
are built; the cases below hold either way, since they are about the transport
and the shared pipeline: an UNIMPLEMENTED answer counts as the handler's answer.
"""

from __future__ import annotations

import asyncio
import importlib
import os
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.protobuf.message import Message
from grpc_status import rpc_status

from aimesh.chat.v1 import chat_service_pb2
from aimesh.notify.v1 import notify_service_pb2
from aimesh.recommend.v1 import recommend_service_pb2
from aimesh.search.v1 import search_service_pb2
from aimesh.user.v1 import user_service_pb2, user_service_pb2_grpc
from aimesh_runtime.errors import NotFound
from aimesh_runtime.server import Mount, ServiceContext, ServiceSpec
from tests.conftest import Running, admin_token, bearer, start_server
from tests.tokens import claims, jwks, signed


@dataclass(frozen=True)
class Probe:
    service: str  # the ServiceSpec name
    module: str
    method: str  # full method name
    request: Message
    response: type[Message]


PROBES = {
    "user": Probe(
        "user",
        "aimesh_user.server",
        "/aimesh.user.v1.UserService/GetUser",
        user_service_pb2.GetUserRequest(name="users/me"),
        user_service_pb2.GetUserResponse,
    ),
    "search": Probe(
        "search",
        "aimesh_search.server",
        "/aimesh.search.v1.SearchService/ListCollections",
        search_service_pb2.ListCollectionsRequest(),
        search_service_pb2.ListCollectionsResponse,
    ),
    "chat": Probe(
        "chat",
        "aimesh_chat.server",
        "/aimesh.chat.v1.ChatService/ListConversations",
        chat_service_pb2.ListConversationsRequest(),
        chat_service_pb2.ListConversationsResponse,
    ),
    "recommend": Probe(
        "recommend",
        "aimesh_recommend.server",
        "/aimesh.recommend.v1.RecommendService/ListItems",
        recommend_service_pb2.ListItemsRequest(),
        recommend_service_pb2.ListItemsResponse,
    ),
    "notify": Probe(
        "notify",
        "aimesh_notify.server",
        "/aimesh.notify.v1.NotifyService/ListSubscriptions",
        notify_service_pb2.ListSubscriptionsRequest(),
        notify_service_pb2.ListSubscriptionsResponse,
    ),
}
# A handler's own answer: success, or UNIMPLEMENTED from a service still being built.
ANSWERED = (grpc.StatusCode.OK, grpc.StatusCode.UNIMPLEMENTED)


@dataclass
class Target:
    probe: Probe
    running: Running
    channel: grpc.aio.Channel
    metadata: tuple[tuple[str, str], ...]

    def call(self) -> Any:
        method = self.channel.unary_unary(
            self.probe.method,
            request_serializer=type(self.probe.request).SerializeToString,
            response_deserializer=self.probe.response.FromString,
        )
        return method

    async def code(self, **kwargs: Any) -> grpc.StatusCode:
        kwargs.setdefault("metadata", self.metadata)
        kwargs.setdefault("timeout", 10)
        try:
            await self.call()(self.probe.request, **kwargs)
        except grpc.aio.AioRpcError as error:
            return error.code()
        return grpc.StatusCode.OK


@pytest.fixture(scope="module")
async def token(users: Any) -> str:
    return await admin_token(users)


@pytest.fixture(scope="module", params=list(PROBES))
async def target(
    request: pytest.FixtureRequest, user_server: Running, new_database: Any, token: str
) -> AsyncIterator[Target]:
    probe = PROBES[request.param]
    if probe.service == "user":
        running, started = user_server, False
    else:
        spec = importlib.import_module(probe.module).SPEC
        env = {
            "AIMESH_JWKS_URL": f"http://127.0.0.1:{user_server.http_port}/.well-known/jwks.json",
            "AIMESH_USER_ADDRESS": user_server.address,
            # chat's search is never reached by these cases
            "AIMESH_SEARCH_ADDRESS": "127.0.0.1:9",
        }
        running, started = await start_server([spec], new_database, extra_env=env), True
    channel = running.channel()
    yield Target(probe, running, channel, bearer(token))
    await channel.close()
    if started:
        await running.server.stop(0.5)


async def test_the_probe_is_answered(target: Target) -> None:
    assert await target.code() in ANSWERED


async def test_an_unknown_method_is_unimplemented(target: Target) -> None:
    package = target.probe.method.rsplit("/", 1)[0]
    unknown = target.channel.unary_unary(f"{package}/NoSuchMethod")
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await unknown(b"", metadata=target.metadata, timeout=5)
    assert caught.value.code() == grpc.StatusCode.UNIMPLEMENTED
    unknown_service = target.channel.unary_unary("/aimesh.nothing.v1.Nothing/Get")
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await unknown_service(b"", metadata=target.metadata, timeout=5)
    assert caught.value.code() == grpc.StatusCode.UNIMPLEMENTED


async def test_a_1ms_deadline_is_deadline_exceeded(target: Target) -> None:
    # Twenty at once: a cheap read served from cache can finish inside 1 ms on an
    # idle loop (and then rightly succeeds); queued behind each other most cannot.
    codes = await asyncio.gather(*(target.code(timeout=0.001) for _ in range(20)))
    assert set(codes) <= {grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.OK}, codes
    assert codes.count(grpc.StatusCode.DEADLINE_EXCEEDED) >= 15, codes
    assert await target.code() in ANSWERED  # and the server is none the worse


async def test_a_cancel_right_after_start_is_cancelled(target: Target) -> None:
    for _ in range(5):
        call = target.call()(target.probe.request, metadata=target.metadata, timeout=10)
        await asyncio.sleep(0)
        call.cancel()
        with pytest.raises(asyncio.CancelledError):
            await call
        assert await call.code() == grpc.StatusCode.CANCELLED
    assert await target.code() in ANSWERED


async def test_binary_metadata_is_accepted_and_ignored(target: Target) -> None:
    blob = bytes(range(256)) + os.urandom(64)
    plain = await target.code()
    with_bin = await target.code(metadata=(*target.metadata, ("x-aimesh-blob-bin", blob)))
    assert with_bin == plain


async def test_cancelling_100_in_flight_calls_leaves_pools_at_baseline(target: Target) -> None:
    pools = [running.pool for running in target.running.server._running]
    await target.code()  # warm: connections opened, handlers cached

    def in_use() -> int:
        return sum(pool.get_size() - pool.get_idle_size() for pool in pools)

    baseline_tasks = len(asyncio.all_tasks())
    baseline_in_use = in_use()
    calls = [
        target.call()(target.probe.request, metadata=target.metadata, timeout=10)
        for _ in range(100)
    ]
    await asyncio.sleep(0.02)  # some reach their handlers, some are still queued
    for call in calls:
        call.cancel()
    cancelled_at = time.monotonic()
    while time.monotonic() - cancelled_at < 1.0:
        if len(asyncio.all_tasks()) <= baseline_tasks and in_use() <= baseline_in_use:
            break
        await asyncio.sleep(0.02)
    leftover = [t.get_name() for t in asyncio.all_tasks()][baseline_tasks:]
    assert len(asyncio.all_tasks()) <= baseline_tasks, leftover
    assert in_use() <= baseline_in_use
    assert await target.code() in ANSWERED


# -- the shared pipeline, once: services never echo request text into statuses
# (by design), so a unicode message and -bin round trip are shown on a servicer
# of our own behind the same pipeline every service runs.

UNICODE = "documento «Ünïcødé ✓» não encontrado — 文档未找到 🚀"


class Echo(user_service_pb2_grpc.UserServiceServicer):
    """Echoes a -bin header into a -bin trailer; users/unicode fails with UNICODE."""

    async def GetUser(
        self, request: user_service_pb2.GetUserRequest, context: grpc.aio.ServicerContext
    ) -> user_service_pb2.GetUserResponse:
        received = dict(context.invocation_metadata() or ())
        context.set_trailing_metadata((("x-aimesh-echo-bin", received["x-aimesh-blob-bin"]),))
        if request.name == "users/unicode":
            raise NotFound(UNICODE)
        return user_service_pb2.GetUserResponse(user=user_service_pb2.User(name=request.name))


async def _echo_mount(context: ServiceContext) -> Mount:
    return Mount(
        servicers=[(user_service_pb2_grpc.add_UserServiceServicer_to_server, Echo())], jwks=jwks
    )


async def test_unicode_messages_and_binary_metadata_cross_the_pipeline_intact(
    new_database: Any, tmp_path: Path
) -> None:
    spec = ServiceSpec(
        name="user",
        services=(user_service_pb2.DESCRIPTOR.services_by_name["UserService"],),
        migrations=tmp_path,
        mount=_echo_mount,
    )
    running = await start_server([spec], new_database)
    blob = bytes(range(256))
    admin = signed(claims(scope="user.read user.admin"))  # GetUser on made-up users
    metadata = (("authorization", f"Bearer {admin}"), ("x-aimesh-blob-bin", blob))
    try:
        async with running.channel() as channel:
            stub = user_service_pb2_grpc.UserServiceStub(channel)
            call = stub.GetUser(user_service_pb2.GetUserRequest(name="users/a"), metadata=metadata)
            await call
            trailers = dict(await call.trailing_metadata() or ())
            assert trailers["x-aimesh-echo-bin"] == blob
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await stub.GetUser(
                    user_service_pb2.GetUserRequest(name="users/unicode"), metadata=metadata
                )
            assert caught.value.code() == grpc.StatusCode.NOT_FOUND
            assert caught.value.details() == UNICODE
            status = rpc_status.from_call(caught.value)
            assert status is not None and status.message == UNICODE
    finally:
        await running.server.stop(0.5)
