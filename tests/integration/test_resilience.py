"""Resilience as behaviour: retries, throttling, deadline propagation, health on a
stopped database, and SIGTERM under load. (Breaker states, drain in-process and
health behind a cut connection are in tests/unit/test_resilience.py and
tests/integration/test_runtime.py.)"""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from aimesh.user.v1 import user_service_pb2 as pb
from aimesh.user.v1 import user_service_pb2_grpc
from aimesh_runtime.client import connect
from aimesh_runtime.server import Mount, ServiceContext, ServiceSpec
from tests.conftest import ADMIN_EMAIL, ADMIN_PASSWORD, ROOT, kek, start_server
from tests.tokens import claims, jwks, signed

SERVICE = pb.DESCRIPTOR.services_by_name["UserService"]


class Scripted(user_service_pb2_grpc.UserServiceServicer):
    """GetUser answers the scripted codes in turn, then OK; counts attempts."""

    def __init__(self) -> None:
        self.script: list[grpc.StatusCode] = []
        self.attempts = 0
        self.always: grpc.StatusCode | None = None

    async def GetUser(
        self, request: pb.GetUserRequest, context: grpc.aio.ServicerContext
    ) -> pb.GetUserResponse:
        self.attempts += 1
        code = self.always or (self.script.pop(0) if self.script else None)
        if code is not None:
            await context.abort(code, f"scripted {code.name}")
        return pb.GetUserResponse(user=pb.User(name=request.name))


@pytest.fixture
async def scripted() -> AsyncIterator[tuple[Scripted, str]]:
    servicer = Scripted()
    server = grpc.aio.server()
    user_service_pb2_grpc.add_UserServiceServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    yield servicer, f"127.0.0.1:{port}"
    await server.stop(0)


async def test_three_unavailables_take_exactly_four_attempts(
    scripted: tuple[Scripted, str],
) -> None:
    servicer, address = scripted
    servicer.script = [grpc.StatusCode.UNAVAILABLE] * 3
    async with connect(address, SERVICE) as channel:
        reply = await user_service_pb2_grpc.UserServiceStub(channel).GetUser(
            pb.GetUserRequest(name="users/a")
        )
    assert reply.user.name == "users/a"
    assert servicer.attempts == 4  # maxAttempts 4: the original and three retries


async def test_invalid_argument_is_attempted_once(scripted: tuple[Scripted, str]) -> None:
    servicer, address = scripted
    servicer.script = [grpc.StatusCode.INVALID_ARGUMENT]
    async with connect(address, SERVICE) as channel:
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await user_service_pb2_grpc.UserServiceStub(channel).GetUser(
                pb.GetUserRequest(name="users/a")
            )
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert servicer.attempts == 1


async def test_retry_throttling_bounds_attempts_against_a_dead_backend(
    scripted: tuple[Scripted, str],
) -> None:
    servicer, address = scripted
    servicer.always = grpc.StatusCode.UNAVAILABLE
    calls = 200
    async with connect(address, SERVICE) as channel:
        stub = user_service_pb2_grpc.UserServiceStub(channel)
        for _ in range(calls):
            with pytest.raises(grpc.aio.AioRpcError):
                await stub.GetUser(pb.GetUserRequest(name="users/a"))
    assert servicer.attempts / calls <= 1.2, servicer.attempts


# -- deadline propagation through three hops of the real runtime


class Hop(user_service_pb2_grpc.UserServiceServicer):
    """Calls the next hop through a runtime channel, or stalls as the leaf."""

    def __init__(self, name: str, ended: dict[str, float]) -> None:
        self.name = name
        self.ended = ended
        self.next: str | None = None

    async def GetUser(
        self, request: pb.GetUserRequest, context: grpc.aio.ServicerContext
    ) -> pb.GetUserResponse:
        try:
            if self.next is None:
                await asyncio.sleep(60)  # the stalled leaf
            async with connect(self.next, SERVICE, default_timeout_s=30) as channel:
                return await user_service_pb2_grpc.UserServiceStub(channel).GetUser(request)
        finally:
            self.ended[self.name] = time.monotonic()


def hop_spec(hop: Hop, migrations: Path) -> ServiceSpec:
    async def mount(context: ServiceContext) -> Mount:
        return Mount(
            servicers=[(user_service_pb2_grpc.add_UserServiceServicer_to_server, hop)], jwks=jwks
        )

    return ServiceSpec(name="user", services=(SERVICE,), migrations=migrations, mount=mount)


async def test_a_500ms_budget_ends_every_hop_within_550ms(
    new_database: Any, tmp_path: Path
) -> None:
    ended: dict[str, float] = {}
    hops = [Hop(name, ended) for name in ("edge", "middle", "leaf")]
    servers = [await start_server([hop_spec(h, tmp_path)], new_database) for h in hops]
    try:
        hops[0].next, hops[1].next = servers[1].address, servers[2].address
        # An admin's: GetUser on a made-up user passes the ownership rule.
        token = (("authorization", f"Bearer {signed(claims(scope='user.read user.admin'))}"),)
        async with servers[0].channel() as channel:
            stub = user_service_pb2_grpc.UserServiceStub(channel)
            started = time.monotonic()
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await stub.GetUser(pb.GetUserRequest(name="users/a"), metadata=token, timeout=0.5)
            client_ended = time.monotonic()
        assert caught.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        deadline = started + 0.55
        for _ in range(50):  # handlers finish their cancellation on their own loop turns
            if len(ended) == 3:
                break
            await asyncio.sleep(0.01)
        assert client_ended <= deadline
        assert set(ended) == {"edge", "middle", "leaf"}
        late = {name: round(at - started, 3) for name, at in ended.items() if at > deadline}
        assert not late, late
    finally:
        for running in servers:
            await running.server.stop(0)


# -- health over Watch when the service's own PostgreSQL stops


async def test_health_is_not_serving_within_2s_of_its_database_stopping(
    new_database: Any, tmp_path: Path
) -> None:
    import pgserver

    from aimesh_user.server import SPEC as USER

    database = pgserver.get_server(tmp_path / "pg", cleanup_mode="stop")
    stopped = False
    try:
        url = database.get_uri("postgres")
        running = await start_server(
            [USER],
            new_database,
            extra_env={"AIMESH_USER_DATABASE_URL": url},
            health_probe_s=0.2,
        )
        try:
            async with running.channel() as channel:
                watch = health_pb2_grpc.HealthStub(channel).Watch(
                    health_pb2.HealthCheckRequest(service="aimesh.user.v1.UserService")
                )
                assert (await watch.read()).status == health_pb2.HealthCheckResponse.SERVING
                await asyncio.to_thread(database.cleanup)  # pg_ctl stop
                stopped = True
                stopped_at = time.monotonic()
                changed = await asyncio.wait_for(watch.read(), timeout=5)
                seen_after = time.monotonic() - stopped_at
                watch.cancel()
            assert changed.status == health_pb2.HealthCheckResponse.NOT_SERVING
            assert seen_after < 2.0, seen_after
        finally:
            await running.server.stop(0.2)
    finally:
        if not stopped:
            database.cleanup()


# -- SIGTERM to a real service process under load


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


async def test_sigterm_under_load_fails_no_in_flight_call(new_database: Any) -> None:
    port, http_port = free_port(), free_port()
    env = {
        **os.environ,
        "AIMESH_USER_DATABASE_URL": await new_database("user"),
        "AIMESH_USER_KEY_ENCRYPTION_KEY": kek(),
        "AIMESH_USER_BOOTSTRAP_ADMIN_EMAIL": ADMIN_EMAIL,
        "AIMESH_USER_BOOTSTRAP_ADMIN_PASSWORD": ADMIN_PASSWORD,
        "AIMESH_GRPC_PORT": str(port),
        "AIMESH_HTTP_PORT": str(http_port),
        "AIMESH_DRAIN_SECONDS": "10",
        "AIMESH_RATE_LIMIT_ANONYMOUS_RPS": "100000",
        "AIMESH_RATE_LIMIT_ANONYMOUS_BURST": "100000",
    }
    process = subprocess.Popen(
        [sys.executable, "-m", "aimesh_user"],
        env=env,
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            await asyncio.wait_for(channel.channel_ready(), timeout=30)
            health = health_pb2_grpc.HealthStub(channel)
            while (
                await health.Check(health_pb2.HealthCheckRequest(), timeout=5)
            ).status != health_pb2.HealthCheckResponse.SERVING:
                await asyncio.sleep(0.1)
            stub = user_service_pb2_grpc.UserServiceStub(channel)
            signalled_at: float | None = None
            # (sent at, code) of every call; Login hashes a password, so calls overlap.
            results: list[tuple[float, grpc.StatusCode]] = []

            async def worker() -> None:
                while signalled_at is None or time.monotonic() - signalled_at < 0.5:
                    sent = time.monotonic()
                    try:
                        await stub.Login(
                            pb.LoginRequest(email=ADMIN_EMAIL, password=ADMIN_PASSWORD),
                            timeout=20,
                        )
                        results.append((sent, grpc.StatusCode.OK))
                    except grpc.aio.AioRpcError as error:
                        results.append((sent, error.code()))
                        if signalled_at is not None:
                            return

            workers = [asyncio.create_task(worker()) for _ in range(16)]
            await asyncio.sleep(1.5)
            signalled_at = time.monotonic()
            process.send_signal(signal.SIGTERM)
            await asyncio.gather(*workers)
        exit_code = await asyncio.to_thread(process.wait, 30)
    finally:
        if process.poll() is None:
            process.kill()
    before = [code for sent, code in results if sent < signalled_at]
    after = [code for sent, code in results if sent >= signalled_at]
    assert len(before) >= 16
    assert set(before) == {grpc.StatusCode.OK}, before  # everything in flight finished
    assert set(after) <= {grpc.StatusCode.OK, grpc.StatusCode.UNAVAILABLE}, after
    assert exit_code == 0
