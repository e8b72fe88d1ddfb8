"""Runtime channel timeouts last as long as configured.

grpcio applies a service config's "timeout" about 1.5 s early (grpc/grpc#34547,
#40633): with it there, a 1 s timeout failed every call at once with
DEADLINE_EXCEEDED, and a 5 s timeout cut a 4 s call. `connect` now sets the
method's timeout per call instead; these calls go over a real channel.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

import grpc
import pytest

from aimesh.user.v1 import user_service_pb2 as pb
from aimesh.user.v1 import user_service_pb2_grpc
from aimesh_runtime.client import connect

SERVICE = pb.DESCRIPTOR.services_by_name["UserService"]


class Slow(user_service_pb2_grpc.UserServiceServicer):
    """GetUser answers after the number of seconds in the request's name."""

    async def GetUser(
        self, request: pb.GetUserRequest, context: grpc.aio.ServicerContext
    ) -> pb.GetUserResponse:
        await asyncio.sleep(float(request.name.removeprefix("users/")))
        return pb.GetUserResponse(user=pb.User(name=request.name))


@pytest.fixture
async def address() -> AsyncIterator[str]:
    server = grpc.aio.server()
    user_service_pb2_grpc.add_UserServiceServicer_to_server(Slow(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    yield f"127.0.0.1:{port}"
    await server.stop(0)


async def test_a_1s_timeout_lets_a_fast_call_answer(address: str) -> None:
    async with connect(address, SERVICE, default_timeout_s=1.0) as channel:
        stub = user_service_pb2_grpc.UserServiceStub(channel)
        for _ in range(3):
            reply = await stub.GetUser(pb.GetUserRequest(name="users/0.05"))
            assert reply.user.name == "users/0.05"


async def test_a_timeout_ends_the_call_when_configured_not_before(address: str) -> None:
    async with connect(address, SERVICE, timeouts={"GetUser": 1.0}) as channel:
        stub = user_service_pb2_grpc.UserServiceStub(channel)
        started = time.monotonic()
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await stub.GetUser(pb.GetUserRequest(name="users/5"))
        took = time.monotonic() - started
    assert caught.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert 0.95 <= took < 1.5, took


async def test_a_5s_timeout_outlives_a_4s_call(address: str) -> None:
    async with connect(address, SERVICE, default_timeout_s=5.0) as channel:
        reply = await user_service_pb2_grpc.UserServiceStub(channel).GetUser(
            pb.GetUserRequest(name="users/4")
        )
    assert reply.user.name == "users/4"


async def test_an_explicit_timeout_still_wins(address: str) -> None:
    async with connect(address, SERVICE, default_timeout_s=5.0) as channel:
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await user_service_pb2_grpc.UserServiceStub(channel).GetUser(
                pb.GetUserRequest(name="users/2"), timeout=0.3
            )
    assert caught.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
