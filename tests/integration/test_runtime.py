"""The shared runtime on a live server: health, drain, limits, errors, metrics, config."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import subprocess
import sys
import time
import urllib.request
from collections.abc import AsyncIterator, Mapping
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import grpc
import pytest
from google.rpc import error_details_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_status import rpc_status

from aimesh.user.v1 import user_service_pb2 as pb
from aimesh.user.v1 import user_service_pb2_grpc
from aimesh_runtime.server import Mount, ServiceContext, ServiceSpec
from aimesh_runtime.telemetry import JsonFormatter
from tests.conftest import ROOT, Running, start_server
from tests.tokens import claims, jwks, signed

SERVICE = pb.DESCRIPTOR.services_by_name["UserService"]
ADMIN_READ = "user.read user.admin"


class SlowUsers(user_service_pb2_grpc.UserServiceServicer):
    """GetUser sleeps when asked for users/slow and crashes for users/crash."""

    # Slow calls that reached the handler, so a test can stop the server while they run.
    slow_entered = 0

    async def GetUser(
        self, request: pb.GetUserRequest, context: grpc.aio.ServicerContext
    ) -> pb.GetUserResponse:
        if request.name == "users/slow":
            SlowUsers.slow_entered += 1
            await asyncio.sleep(0.5)
        if request.name == "users/crash":
            raise RuntimeError("bug in a handler")
        return pb.GetUserResponse(user=pb.User(name=request.name))


def add_unruled_method(handler: object, server: grpc.aio.Server) -> None:
    """A method outside every contract, so no access rule names it."""

    async def peek(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        return b"secret"

    method = grpc.unary_unary_rpc_method_handler(peek)
    server.add_generic_rpc_handlers(
        (grpc.method_handlers_generic_handler("x.v1.Hidden", {"Peek": method}),)
    )


async def mount(context: ServiceContext) -> Mount:
    return Mount(
        servicers=[
            (user_service_pb2_grpc.add_UserServiceServicer_to_server, SlowUsers()),
            (add_unruled_method, None),
        ],
        jwks=jwks,
    )


def spec(tmp: Path) -> ServiceSpec:
    return ServiceSpec(name="user", services=(SERVICE,), migrations=tmp, mount=mount)


def token_metadata() -> tuple[tuple[str, str]]:
    """Signed per use: a token made at import could expire before a long run gets here."""
    # An admin's: the tests call GetUser on made-up users (users/slow, users/crash).
    return (("authorization", f"Bearer {signed(claims(scope=ADMIN_READ))}"),)


class PgProxy:
    """TCP in front of the embedded PostgreSQL's unix socket, which a test can cut."""

    def __init__(self, socket_path: str) -> None:
        self._socket_path = socket_path
        self._server: asyncio.Server | None = None
        self._writers: list[asyncio.StreamWriter] = []
        self.port = 0

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", self.port)
        self.port = self._server.sockets[0].getsockname()[1]

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_unix_connection(self._socket_path)
        self._writers += [writer, up_writer]

        async def pipe(source: asyncio.StreamReader, sink: asyncio.StreamWriter) -> None:
            try:
                while data := await source.read(65536):
                    sink.write(data)
                    await sink.drain()
            except (ConnectionError, OSError):
                pass
            finally:
                sink.close()

        await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer))

    async def cut(self) -> None:
        assert self._server is not None
        self._server.close()
        for writer in self._writers:
            writer.close()
        self._writers.clear()

    async def stop(self) -> None:
        await self.cut()


@pytest.fixture
async def slow_server(new_database: Any, tmp_path: Path) -> AsyncIterator[Running]:
    running = await start_server(
        [spec(tmp_path)], new_database, rate_limit_rps=5.0, rate_limit_burst=3
    )
    yield running
    await running.server.stop(0.5)


async def test_handler_crash_is_internal_with_request_id_not_unknown(slow_server: Running) -> None:
    async with slow_server.channel() as channel:
        stub = user_service_pb2_grpc.UserServiceStub(channel)
        call = stub.GetUser(pb.GetUserRequest(name="users/crash"), metadata=token_metadata())
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await call
    assert caught.value.code() == grpc.StatusCode.INTERNAL
    assert "bug in a handler" not in (caught.value.details() or "")
    assert "request id" in (caught.value.details() or "")


async def test_rate_limit_answers_resource_exhausted_with_retry_info(slow_server: Running) -> None:
    async with slow_server.channel() as channel:
        stub = user_service_pb2_grpc.UserServiceStub(channel)
        codes = []
        error: grpc.aio.AioRpcError | None = None
        for _ in range(6):
            try:
                await stub.GetUser(pb.GetUserRequest(name="users/a"), metadata=token_metadata())
                codes.append(grpc.StatusCode.OK)
            except grpc.aio.AioRpcError as failure:
                codes.append(failure.code())
                error = failure
    assert codes[:3] == [grpc.StatusCode.OK] * 3
    assert grpc.StatusCode.RESOURCE_EXHAUSTED in codes[3:]
    assert error is not None
    status = rpc_status.from_call(error)
    assert status is not None
    retry = [d for d in status.details if d.Is(error_details_pb2.RetryInfo.DESCRIPTOR)]
    assert retry, "RESOURCE_EXHAUSTED carries RetryInfo"
    info = error_details_pb2.RetryInfo()
    retry[0].Unpack(info)
    assert 0 < info.retry_delay.ToTimedelta().total_seconds() <= 1.0


async def test_graceful_drain_finishes_in_flight_calls(new_database: Any, tmp_path: Path) -> None:
    running = await start_server([spec(tmp_path)], new_database)
    async with running.channel() as channel:
        stub = user_service_pb2_grpc.UserServiceStub(channel)
        health = health_pb2_grpc.HealthStub(channel)
        entered_before = SlowUsers.slow_entered
        in_flight = [
            asyncio.ensure_future(
                stub.GetUser(pb.GetUserRequest(name="users/slow"), metadata=token_metadata())
            )
            for _ in range(10)
        ]
        # Stop only once all ten are in the handler: under load they may take a while
        # to get past authentication, and a call not yet accepted is not in flight.
        async with asyncio.timeout(30):
            while SlowUsers.slow_entered < entered_before + 10:
                await asyncio.sleep(0.01)
        stopping = asyncio.ensure_future(running.server.stop(5.0))
        await asyncio.sleep(0.05)
        replies = await asyncio.gather(*in_flight)
        assert [r.user.name for r in replies] == ["users/slow"] * 10
        await stopping
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await health.Check(health_pb2.HealthCheckRequest(), timeout=1)
        assert caught.value.code() == grpc.StatusCode.UNAVAILABLE


async def test_health_follows_the_database(
    pg_admin_url: str, new_database: Any, tmp_path: Path
) -> None:
    query = parse_qs(urlsplit(pg_admin_url).query)
    proxy = PgProxy(os.path.join(query["host"][0], ".s.PGSQL.5432"))
    await proxy.start()
    database = urlsplit(await new_database("health")).path
    url = f"postgresql://postgres@127.0.0.1:{proxy.port}{database}"
    running = await start_server(
        [spec(tmp_path)],
        new_database,
        extra_env={"AIMESH_USER_DATABASE_URL": url},
        health_probe_s=0.2,
    )
    try:
        async with running.channel() as channel:
            health = health_pb2_grpc.HealthStub(channel)
            watch = health.Watch(health_pb2.HealthCheckRequest(service=""))
            first = await watch.read()
            assert first.status == health_pb2.HealthCheckResponse.SERVING
            cut_at = time.monotonic()
            await proxy.cut()
            changed = await asyncio.wait_for(watch.read(), timeout=5)
            assert changed.status == health_pb2.HealthCheckResponse.NOT_SERVING
            assert time.monotonic() - cut_at < 2.0
            await proxy.start()  # the same port again
            back = await asyncio.wait_for(watch.read(), timeout=10)
            assert back.status == health_pb2.HealthCheckResponse.SERVING
            watch.cancel()
    finally:
        await running.server.stop(0.5)
        await proxy.stop()


async def test_metrics_are_scraped_per_method(slow_server: Running) -> None:
    async with slow_server.channel() as channel:
        stub = user_service_pb2_grpc.UserServiceStub(channel)
        await stub.GetUser(pb.GetUserRequest(name="users/a"), metadata=token_metadata())
    url = f"http://127.0.0.1:{slow_server.http_port}/metrics"
    text = await asyncio.to_thread(lambda: urllib.request.urlopen(url, timeout=5).read().decode())
    assert (
        'aimesh_rpc_server_requests_total{grpc_code="OK",grpc_method="GetUser",'
        'grpc_service="aimesh.user.v1.UserService"} 1.0'
    ) in text
    assert 'aimesh_rpc_server_duration_seconds_bucket{grpc_method="GetUser"' in text
    assert "aimesh_rpc_server_in_flight" in text


def run_service(module: str, env: Mapping[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", module],
        env={"PATH": os.environ["PATH"], **env},
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
    )


@pytest.mark.parametrize(
    "env,variable",
    [
        (
            {
                "AIMESH_USER_DATABASE_URL": "postgresql://x/y",
                "AIMESH_USER_KEY_ENCRYPTION_KEY": "short",
            },
            "AIMESH_USER_KEY_ENCRYPTION_KEY",
        ),
        ({"AIMESH_USER_KEY_ENCRYPTION_KEY": "A" * 43}, "AIMESH_USER_DATABASE_URL"),
        (
            {"AIMESH_USER_DATABASE_URL": "mysql://x/y", "AIMESH_USER_KEY_ENCRYPTION_KEY": "A" * 43},
            "AIMESH_USER_DATABASE_URL",
        ),
        (
            {
                "AIMESH_USER_DATABASE_URL": "postgresql://x/y",
                "AIMESH_USER_KEY_ENCRYPTION_KEY": "A" * 43,
                "AIMESH_GRPC_PORT": "99999",
            },
            "AIMESH_GRPC_PORT",
        ),
        (
            {
                "AIMESH_USER_DATABASE_URL": "postgresql://x/y",
                "AIMESH_USER_KEY_ENCRYPTION_KEY": "A" * 43,
                "AIMESH_REFLECTION": "maybe",
            },
            "AIMESH_REFLECTION",
        ),
        (
            {
                "AIMESH_USER_DATABASE_URL": "postgresql://x/y",
                "AIMESH_USER_KEY_ENCRYPTION_KEY": "A" * 43,
                "AIMESH_ENV": "staging",
            },
            "AIMESH_ENV",
        ),
    ],
)
def test_malformed_config_exits_with_the_variable_named(env: dict[str, str], variable: str) -> None:
    result = run_service("aimesh_user", env)
    assert result.returncode == 2
    assert variable in result.stderr and "configuration error" in result.stderr
    assert "Traceback" not in result.stderr


def test_search_without_jwks_url_is_a_config_error() -> None:
    result = run_service(
        "aimesh_search", {"AIMESH_SEARCH_DATABASE_URL": "postgresql://127.0.0.1:1/x"}
    )
    # The database is unreachable too, but the config error is found first.
    assert result.returncode == 2, result.stderr
    assert "AIMESH_JWKS_URL" in result.stderr


async def test_log_lines_are_json_with_the_callers_trace_and_request_id(
    slow_server: Running,
) -> None:
    trace_id, parent_span = "4bf92f3577b34da6a3ce929d0e0e4736", "00f067aa0ba902b7"
    lines: list[str] = []

    class Capture(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            lines.append(JsonFormatter("user").format(record))

    capture = Capture()
    logging.getLogger("aimesh.rpc").addHandler(capture)
    try:
        async with slow_server.channel() as channel:
            stub = user_service_pb2_grpc.UserServiceStub(channel)
            with pytest.raises(grpc.aio.AioRpcError):
                await stub.GetUser(
                    pb.GetUserRequest(name="users/crash"),
                    metadata=(
                        *token_metadata(),
                        ("traceparent", f"00-{trace_id}-{parent_span}-01"),
                        ("x-request-id", "req-42"),
                    ),
                )
    finally:
        logging.getLogger("aimesh.rpc").removeHandler(capture)
    entries = [json.loads(line) for line in lines]
    failed = next(e for e in entries if e.get("grpc_code") == "INTERNAL")
    assert failed["trace_id"] == trace_id and len(failed["span_id"]) == 16
    assert failed["request_id"] == "req-42" and failed["level"] == "ERROR"
    assert failed["grpc_method"] == "/aimesh.user.v1.UserService/GetUser"


async def test_a_method_without_an_access_rule_is_denied_even_with_a_token(
    slow_server: Running,
) -> None:
    async with slow_server.channel() as channel:
        peek = channel.unary_unary("/x.v1.Hidden/Peek")
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await peek(b"", metadata=token_metadata())
    assert caught.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert "no access rule" in (caught.value.details() or "")


def test_a_started_process_freezes_what_startup_built_out_of_the_collectors_passes() -> None:
    # In a child: freezing is process-wide and would leak this test session's garbage.
    program = (
        "import gc, json\n"
        "import aimesh_runtime.server  # a server's startup: its imports\n"
        "from aimesh_runtime.collector import FIRST_GENERATION_THRESHOLD, settle_collector\n"
        "garbage = []; garbage.append(garbage); del garbage\n"
        "settle_collector()\n"
        "young = [[n] for n in range(50)]\n"
        "print(json.dumps([gc.get_freeze_count(), gc.get_threshold()[0],\n"
        "                  FIRST_GENERATION_THRESHOLD, len(gc.get_objects())]))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", program], capture_output=True, text=True, timeout=60, cwd=ROOT,
        env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)},
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    frozen, threshold, wanted, tracked = json.loads(done.stdout)
    assert frozen > 10_000  # the imports, frozen
    assert threshold == wanted > 700
    assert tracked < 1_000  # what the collector still scans: only what came after
