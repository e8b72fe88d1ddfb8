"""Fault injection: the environment format, Istio's matching rules, and live calls."""

from __future__ import annotations

import random
import time
from collections.abc import AsyncIterator

import grpc
import pytest

from aimesh_runtime.config import ConfigError
from aimesh_runtime.faults import FaultConfig, FaultInjector, fault_interceptors, load_faults

SEARCH = "/aimesh.search.v1.SearchService/Search"


def test_environment_format() -> None:
    config = load_faults(
        {
            "AIMESH_FAULT_DELAY": "2s@10%",
            "AIMESH_FAULT_ABORT": "unavailable@12.5%",
            "AIMESH_FAULT_HEADER": "X-Aimesh-Chaos=on",
            "AIMESH_FAULT_METHODS": "/aimesh.search.v1., /aimesh.recommend.v1.",
        }
    )
    assert config == FaultConfig(
        delay_s=2.0,
        delay_percent=10.0,
        abort_code=grpc.StatusCode.UNAVAILABLE,
        abort_percent=12.5,
        header=("x-aimesh-chaos", "on"),
        methods=("/aimesh.search.v1.", "/aimesh.recommend.v1."),
    )
    assert load_faults({"AIMESH_FAULT_DELAY": "150ms"}).delay_s == pytest.approx(0.15)
    assert load_faults({"AIMESH_FAULT_DELAY": "150ms"}).delay_percent == 100.0
    assert fault_interceptors({}) == []
    assert fault_interceptors({"AIMESH_FAULT_ABORT": "INTERNAL@0%"}) == []


@pytest.mark.parametrize(
    "env,variable",
    [
        ({"AIMESH_FAULT_DELAY": "2 minutes"}, "AIMESH_FAULT_DELAY"),
        ({"AIMESH_FAULT_DELAY": "2s@150%"}, "AIMESH_FAULT_DELAY"),
        ({"AIMESH_FAULT_ABORT": "BROKEN@10%"}, "AIMESH_FAULT_ABORT"),
        ({"AIMESH_FAULT_ABORT": "OK"}, "AIMESH_FAULT_ABORT"),
        ({"AIMESH_FAULT_ABORT": "UNAVAILABLE@ten"}, "AIMESH_FAULT_ABORT"),
        ({"AIMESH_FAULT_HEADER": "x-aimesh-chaos"}, "AIMESH_FAULT_HEADER"),
    ],
)
def test_bad_values_name_their_variable(env: dict[str, str], variable: str) -> None:
    with pytest.raises(ConfigError, match=variable):
        load_faults(env)


def test_percentages_are_sampled_independently() -> None:
    injector = FaultInjector(
        FaultConfig(1.0, 10.0, grpc.StatusCode.UNAVAILABLE, 30.0), random.Random(7)
    )
    decisions = [injector.decide(SEARCH, {}) for _ in range(20_000)]
    delayed = sum(1 for delay, _ in decisions if delay) / len(decisions)
    aborted = sum(1 for _, abort in decisions if abort) / len(decisions)
    both = sum(1 for delay, abort in decisions if delay and abort) / len(decisions)
    assert delayed == pytest.approx(0.10, abs=0.01)
    assert aborted == pytest.approx(0.30, abs=0.015)
    assert both == pytest.approx(0.03, abs=0.006)  # independent, as Istio samples them


def test_header_and_method_matching() -> None:
    injector = FaultInjector(
        FaultConfig(
            abort_code=grpc.StatusCode.INTERNAL,
            abort_percent=100.0,
            header=("x-aimesh-chaos", "on"),
            methods=("/aimesh.search.v1.",),
        )
    )
    assert injector.decide(SEARCH, {"x-aimesh-chaos": "on"}) == (0.0, True)
    assert injector.decide(SEARCH, {"x-aimesh-chaos": "off"}) == (0.0, False)
    assert injector.decide(SEARCH, {}) == (0.0, False)
    assert injector.decide("/aimesh.user.v1.UserService/GetUser", {"x-aimesh-chaos": "on"}) == (
        0.0,
        False,
    )
    everything = FaultInjector(FaultConfig(abort_code=grpc.StatusCode.INTERNAL, abort_percent=100))
    assert everything.decide("/grpc.health.v1.Health/Check", {}) == (0.0, False)


async def echo(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
    return request


async def echo_stream(request: bytes, context: grpc.aio.ServicerContext) -> AsyncIterator[bytes]:
    for _ in range(3):
        yield request


async def serve(injector: FaultInjector) -> tuple[grpc.aio.Server, str]:
    server = grpc.aio.server(interceptors=[injector])
    server.add_generic_rpc_handlers(
        (
            grpc.method_handlers_generic_handler(
                "t.v1.Echo",
                {
                    "Echo": grpc.unary_unary_rpc_method_handler(echo),
                    "Stream": grpc.unary_stream_rpc_method_handler(echo_stream),
                },
            ),
        )
    )
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    return server, f"127.0.0.1:{port}"


async def test_live_abort_and_delay_by_header() -> None:
    config = load_faults(
        {
            "AIMESH_FAULT_DELAY": "300ms",
            "AIMESH_FAULT_ABORT": "UNAVAILABLE",
            "AIMESH_FAULT_HEADER": "x-aimesh-chaos=on",
        }
    )
    server, address = await serve(FaultInjector(config))
    try:
        async with grpc.aio.insecure_channel(address) as channel:
            unary = channel.unary_unary("/t.v1.Echo/Echo")
            stream = channel.unary_stream("/t.v1.Echo/Stream")
            assert await unary(b"x", timeout=5) == b"x"
            assert [m async for m in stream(b"y", timeout=5)] == [b"y"] * 3
            chaos = (("x-aimesh-chaos", "on"),)
            started = time.monotonic()
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await unary(b"x", metadata=chaos, timeout=5)
            assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
            assert "fault injected" in (caught.value.details() or "")
            assert time.monotonic() - started >= 0.3  # delayed first, then aborted
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                _ = [m async for m in stream(b"y", metadata=chaos, timeout=5)]
            assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
            # The caller's deadline still bounds an injected delay.
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await unary(b"x", metadata=chaos, timeout=0.05)
            assert caught.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    finally:
        await server.stop(0)
