"""A runtime channel finds a restarted backend soon after it is back.

gRPC waits longer and longer between connection attempts to a backend that
is down (1 s, then 1.6x each time, up to 120 s): after a 10 s outage, the next
attempt can come 6 s after the backend is back, and a circuit breaker's
half-open trial in between fails on the channel alone. `connect(...,
max_reconnect_backoff_s=)` caps the wait (scripts/bench chaos: recovery took
9.8 s, 4.3 s of it after recommend was SERVING).
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import time

import grpc

from aimesh.user.v1 import user_service_pb2 as pb
from aimesh.user.v1 import user_service_pb2_grpc
from aimesh_runtime.client import connect

SERVICE = pb.DESCRIPTOR.services_by_name["UserService"]


class Echo(user_service_pb2_grpc.UserServiceServicer):
    async def GetUser(
        self, request: pb.GetUserRequest, context: grpc.aio.ServicerContext
    ) -> pb.GetUserResponse:
        return pb.GetUserResponse(user=pb.User(name=request.name))


async def serve(port: int) -> grpc.aio.Server:
    server = grpc.aio.server()
    user_service_pb2_grpc.add_UserServiceServicer_to_server(Echo(), server)  # type: ignore[abstract]
    server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    return server


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


async def test_a_capped_backoff_reconnects_within_a_second_of_a_restart() -> None:
    port = free_port()
    server = await serve(port)
    async with connect(
        f"127.0.0.1:{port}", SERVICE, default_timeout_s=0.5, max_reconnect_backoff_s=0.5
    ) as channel:
        stub = user_service_pb2_grpc.UserServiceStub(channel)
        await stub.GetUser(pb.GetUserRequest(name="users/a"))
        await server.stop(0)
        down_until = time.monotonic() + 10  # long enough for gRPC's default to reach 6 s
        while time.monotonic() < down_until:  # callers keep calling while it is down
            with contextlib.suppress(grpc.aio.AioRpcError):
                await stub.GetUser(pb.GetUserRequest(name="users/a"))
            await asyncio.sleep(0.1)
        server = await serve(port)
        back = time.monotonic()
        try:
            while True:
                try:
                    await stub.GetUser(pb.GetUserRequest(name="users/a"))
                    break
                except grpc.aio.AioRpcError:
                    assert time.monotonic() - back < 1.5, "not reconnected 1.5 s after"
                    await asyncio.sleep(0.05)
        finally:
            await server.stop(0)
