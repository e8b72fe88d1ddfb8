"""scripts/bench edge: what the Envoy edge costs in front of the services.

qps_ratio       QPS of an authenticated GetUser through the edge divided by QPS of
                the same call straight to the user service. One client (one gRPC
                channel, 16 calls in flight), rounds alternating in one run.
added_p50_ms    p50 latency of one call at a time through the edge, minus direct.
rest_qps_ratio  QPS of the same call as REST/JSON through the edge (GET
                /v1/users/me, one HTTP/1.1 client, 16 connections) divided by the
                direct gRPC QPS.

The platform is `aimesh up` (five services, the edge on one worker thread, embedded
PostgreSQL) on shifted ports. The client is Python and shares the machine's cores,
so ratios include client costs; the last line printed is one JSON object.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import grpc
import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from aimesh.user.v1 import user_service_pb2 as pb
from aimesh.user.v1 import user_service_pb2_grpc
from aimesh_cli.local import free_port_offset
from tests.integration.test_local_platform import start_up, stop_up

IN_FLIGHT = 16


async def closed_loop(call: Callable[[], Awaitable[None]], seconds: float) -> float:
    """Calls per second with IN_FLIGHT callers for `seconds` (after a short warm-up)."""
    done = 0
    measuring = False
    end = time.monotonic() + 0.5 + seconds

    async def caller() -> None:
        nonlocal done
        while time.monotonic() < end:
            await call()
            if measuring:
                done += 1

    async def clock() -> float:
        nonlocal measuring
        await asyncio.sleep(0.5)
        measuring, started = True, time.monotonic()
        await asyncio.sleep(seconds)
        return time.monotonic() - started

    elapsed, *_ = await asyncio.gather(clock(), *(caller() for _ in range(IN_FLIGHT)))
    return done / elapsed


async def p50_ms(call: Callable[[], Awaitable[None]], count: int) -> float:
    for _ in range(20):
        await call()
    samples = []
    for _ in range(count):
        started = time.perf_counter()
        await call()
        samples.append(time.perf_counter() - started)
    return statistics.median(samples) * 1000


async def measure(offset: int, token: str, rounds: int, seconds: float) -> dict[str, object]:
    metadata = (("authorization", f"Bearer {token}"),)
    request = pb.GetUserRequest(name="users/me")
    direct = grpc.aio.insecure_channel(f"127.0.0.1:{50051 + offset}")
    through = grpc.aio.insecure_channel(f"127.0.0.1:{8080 + offset}")
    stubs = {
        "direct": user_service_pb2_grpc.UserServiceStub(direct),
        "edge": user_service_pb2_grpc.UserServiceStub(through),
    }
    limits = httpx.Limits(max_connections=IN_FLIGHT, max_keepalive_connections=IN_FLIGHT)
    rest = httpx.AsyncClient(
        base_url=f"http://127.0.0.1:{8080 + offset}",
        headers={"authorization": f"Bearer {token}"},
        limits=limits,
    )

    def grpc_call(mode: str) -> Callable[[], Awaitable[None]]:
        async def call() -> None:
            await stubs[mode].GetUser(request, metadata=metadata, timeout=10)

        return call

    async def rest_call() -> None:
        response = await rest.get("/v1/users/me")
        response.raise_for_status()

    calls = {"direct": grpc_call("direct"), "edge": grpc_call("edge"), "rest": rest_call}
    qps: dict[str, list[float]] = {mode: [] for mode in calls}
    p50: dict[str, list[float]] = {"direct": [], "edge": []}
    modes = list(calls)
    try:
        for number in range(rounds):
            shift = number % len(modes)  # rotate the order so the machine's drift cancels
            for mode in modes[shift:] + modes[:shift]:
                qps[mode].append(await closed_loop(calls[mode], seconds))
                if mode in p50:
                    p50[mode].append(await p50_ms(calls[mode], 300))
            print(
                f"  round {number + 1}: "
                + ", ".join(f"{mode} {qps[mode][-1]:.0f}" for mode in modes)
                + f" req/s; p50 direct {p50['direct'][-1]:.3f} ms, edge {p50['edge'][-1]:.3f} ms",
                flush=True,
            )
    finally:
        await direct.close()
        await through.close()
        await rest.aclose()

    def paired(mode: str) -> float:
        return statistics.median(m / d for m, d in zip(qps[mode], qps["direct"], strict=True))

    added = statistics.median(e - d for e, d in zip(p50["edge"], p50["direct"], strict=True))
    return {
        "bench": "edge",
        "qps_ratio": round(paired("edge"), 3),
        "added_p50_ms": round(added, 3),
        "rest_qps_ratio": round(paired("rest"), 3),
        "qps": {mode: round(statistics.median(values)) for mode, values in qps.items()},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--seconds", type=float, default=5.0)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as state:
        offset = free_port_offset(start=5000)
        env = {k: v for k, v in os.environ.items() if not k.startswith("AIMESH_")}
        # The bench measures the edge, not the services' per-principal limit.
        env.update(
            AIMESH_STATE_DIR=state,
            AIMESH_PORT_OFFSET=str(offset),
            AIMESH_RATE_LIMIT_RPS="1000000",
            AIMESH_RATE_LIMIT_BURST="1000000",
        )
        process, banner = start_up(env)
        try:
            token = next(
                line.split("TOKEN=", 1)[1].strip()
                for line in banner.splitlines()
                if "export TOKEN=" in line
            )
            print(
                f"edge overhead: {args.rounds} rounds of {args.seconds:.0f} s,"
                f" {IN_FLIGHT} in flight"
            )
            result = asyncio.run(measure(offset, token, args.rounds, args.seconds))
        finally:
            stop_up(process)
    qps = result.pop("qps")
    print(f"  median req/s: {qps}")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
