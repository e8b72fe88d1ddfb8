"""scripts/bench edge: what the Envoy edge costs in front of the services.

qps_ratio       QPS of an authenticated GetUser through the edge divided by QPS of
                the same call straight to the user service. One client, 16 calls
                in flight on one HTTP/2 connection, rounds alternating in one run.
added_p50_ms    p50 latency of one call at a time through the edge, minus direct.
rest_qps_ratio  QPS of the same call as REST/JSON through the edge (GET
                /v1/users/me, HTTP/1.1, 16 connections) divided by the direct
                gRPC QPS.

The client is h2load (Debian package nghttp2-client) where it is installed: its
own cost per call is small, so the ratios are the edge's and the service's, not a
Python client's. Without it the bench falls back to a Python client (grpc.aio,
httpx), whose cost shares the cores too; the JSON line names the client. Each
round also prints CPU time per call of the Envoy process and of the user service
(direct and through the edge): steadier than QPS on a busy machine.

The platform is `aimesh up` (five services, the edge on one worker thread, embedded
PostgreSQL) on shifted ports; the last line printed is one JSON object.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import shutil
import statistics
import struct
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import grpc
import httpx
import psutil

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from aimesh.user.v1 import user_service_pb2 as pb
from aimesh.user.v1 import user_service_pb2_grpc
from aimesh_cli.local import free_port_offset
from tests.integration.test_local_platform import start_up, stop_up

IN_FLIGHT = 16
GET_USER = "/aimesh.user.v1.UserService/GetUser"
REST_GET_USER = "/v1/users/me"
MODES = ("direct", "edge", "rest")
Call = Callable[[], Awaitable[None]]


class H2load:
    """The three modes and the one-at-a-time latency, measured by h2load."""

    name = "h2load"
    warm_up_s = 1.0

    def __init__(self, offset: int, token: str, folder: Path) -> None:
        payload = pb.GetUserRequest(name="users/me").SerializeToString()
        self.body = folder / "get_user.grpc"
        self.body.write_bytes(struct.pack(">?I", False, len(payload)) + payload)
        self.log = folder / "h2load.log"
        self.auth = f"authorization: Bearer {token}"
        self.urls = {
            "direct": f"http://127.0.0.1:{50051 + offset}{GET_USER}",
            "edge": f"http://127.0.0.1:{8080 + offset}{GET_USER}",
            "rest": f"http://127.0.0.1:{8080 + offset}{REST_GET_USER}",
        }

    def _command(self, mode: str) -> list[str]:
        if mode == "rest":
            return ["h2load", "--h1", "-c", str(IN_FLIGHT), "-m", "1", "-H", self.auth]
        return [
            "h2load", "-c", "1", "-H", "content-type: application/grpc", "-H", "te: trailers",
            "-H", self.auth, "-d", str(self.body),
        ]  # fmt: skip

    async def _run(self, command: list[str]) -> str:
        process = await asyncio.create_subprocess_exec(
            *command, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT
        )
        output = (await process.communicate())[0].decode()
        # h2load counts HTTP 2xx; a gRPC error would hide in trailers, so each mode's
        # call is checked once with a real client before the rounds (check_calls).
        done = re.search(r"requests: (\d+) total, \d+ started, (\d+) done, (\d+) succeeded", output)
        if done is None or int(done.group(3)) != int(done.group(2)) or int(done.group(3)) == 0:
            raise RuntimeError(f"h2load failed:\n{output}")
        return output

    async def qps(self, mode: str, seconds: float) -> tuple[float, int]:
        output = await self._run(
            [
                *self._command(mode),
                *("--warm-up-time", str(int(self.warm_up_s)), "--duration", str(int(seconds))),
                *("-m", str(IN_FLIGHT)) * (mode != "rest"),
                self.urls[mode],
            ]
        )
        found = re.search(r"finished in [\d.]+s, ([\d.]+) req/s", output)
        succeeded = re.search(r"(\d+) succeeded", output)
        assert found is not None and succeeded is not None
        return float(found.group(1)), int(succeeded.group(1))

    async def p50_ms(self, mode: str, count: int) -> float:
        # One connection, one call at a time; --log-file has each call's time in µs.
        await self._run([*self._command(mode), "-n", "20", "-m", "1", self.urls[mode]])
        self.log.unlink(missing_ok=True)
        await self._run(
            [*self._command(mode), "-n", str(count), "-m", "1", "--log-file", str(self.log),
             self.urls[mode]]
        )  # fmt: skip
        micros = [int(line.split("\t")[2]) for line in self.log.read_text().splitlines()]
        return statistics.median(micros) / 1000


class PythonClient:
    """The fallback: grpc.aio (one channel) and httpx (16 connections)."""

    name = "python"
    warm_up_s = 0.5

    def __init__(self, offset: int, token: str) -> None:
        self.metadata = (("authorization", f"Bearer {token}"),)
        self.request = pb.GetUserRequest(name="users/me")
        self.channels = {
            "direct": grpc.aio.insecure_channel(f"127.0.0.1:{50051 + offset}"),
            "edge": grpc.aio.insecure_channel(f"127.0.0.1:{8080 + offset}"),
        }
        self.stubs = {m: user_service_pb2_grpc.UserServiceStub(c) for m, c in self.channels.items()}
        limits = httpx.Limits(max_connections=IN_FLIGHT, max_keepalive_connections=IN_FLIGHT)
        self.rest = httpx.AsyncClient(
            base_url=f"http://127.0.0.1:{8080 + offset}",
            headers={"authorization": f"Bearer {token}"},
            limits=limits,
        )

    def call(self, mode: str) -> Call:
        async def grpc_call() -> None:
            await self.stubs[mode].GetUser(self.request, metadata=self.metadata, timeout=10)

        async def rest_call() -> None:
            (await self.rest.get(REST_GET_USER)).raise_for_status()

        return rest_call if mode == "rest" else grpc_call

    async def qps(self, mode: str, seconds: float) -> tuple[float, int]:
        """Calls per second with IN_FLIGHT callers for `seconds` (after a short warm-up)."""
        call, done, measuring = self.call(mode), 0, False
        end = time.monotonic() + self.warm_up_s + seconds

        async def caller() -> None:
            nonlocal done
            while time.monotonic() < end:
                await call()
                done += measuring

        async def clock() -> float:
            nonlocal measuring
            await asyncio.sleep(self.warm_up_s)
            measuring, started = True, time.monotonic()
            await asyncio.sleep(seconds)
            return time.monotonic() - started

        elapsed, *_ = await asyncio.gather(clock(), *(caller() for _ in range(IN_FLIGHT)))
        return done / elapsed, done

    async def p50_ms(self, mode: str, count: int) -> float:
        call = self.call(mode)
        for _ in range(20):
            await call()
        samples = []
        for _ in range(count):
            started = time.perf_counter()
            await call()
            samples.append(time.perf_counter() - started)
        return statistics.median(samples) * 1000

    async def close(self) -> None:
        for channel in self.channels.values():
            await channel.close()
        await self.rest.aclose()


async def check_calls(offset: int, token: str) -> None:
    """Each mode's call succeeds, with its real status (h2load sees only HTTP codes)."""
    client = PythonClient(offset, token)
    try:
        for mode in MODES:
            await client.call(mode)()
    finally:
        await client.close()


def listener(port: int) -> psutil.Process | None:
    for connection in psutil.net_connections("tcp"):
        if connection.status == psutil.CONN_LISTEN and connection.laddr.port == port:
            return psutil.Process(connection.pid) if connection.pid else None
    return None


def cpu_s(process: psutil.Process | None) -> float:
    if process is None:
        return 0.0
    used = process.cpu_times()
    return float(used.user + used.system)


async def measure(
    client: H2load | PythonClient, offset: int, rounds: int, seconds: float, p50_calls: int
) -> dict[str, object]:
    user, envoy = listener(50051 + offset), listener(8080 + offset)
    qps: dict[str, list[float]] = {mode: [] for mode in MODES}
    p50: dict[str, list[float]] = {"direct": [], "edge": []}
    # CPU µs per call: the user service in each mode, and Envoy through the edge.
    user_us: dict[str, list[float]] = {mode: [] for mode in MODES}
    envoy_us: dict[str, list[float]] = {"edge": [], "rest": []}
    for number in range(rounds):
        shift = number % len(MODES)  # rotate the order so the machine's drift cancels
        for mode in MODES[shift:] + MODES[:shift]:
            before = cpu_s(user), cpu_s(envoy)
            rate, calls = await client.qps(mode, seconds)
            after = cpu_s(user), cpu_s(envoy)
            qps[mode].append(rate)
            # The CPU clock ran over the warm-up too, whose calls are not counted.
            counted = calls * (seconds + client.warm_up_s) / seconds
            user_us[mode].append((after[0] - before[0]) * 1e6 / counted)
            if mode in envoy_us:
                envoy_us[mode].append((after[1] - before[1]) * 1e6 / counted)
            if mode in p50:
                p50[mode].append(await client.p50_ms(mode, p50_calls))
        print(
            f"  round {number + 1} (load {os.getloadavg()[0]:.1f}): "
            + ", ".join(f"{mode} {qps[mode][-1]:.0f}" for mode in MODES)
            + f" req/s (edge/direct {qps['edge'][-1] / qps['direct'][-1]:.3f});"
            + f" p50 direct {p50['direct'][-1]:.3f} ms, edge {p50['edge'][-1]:.3f} ms;"
            + f" CPU µs/call: envoy {envoy_us['edge'][-1]:.0f} (REST {envoy_us['rest'][-1]:.0f}),"
            + f" user service direct {user_us['direct'][-1]:.0f},"
            + f" via edge {user_us['edge'][-1]:.0f}",
            flush=True,
        )

    def paired(mode: str) -> float:
        return statistics.median(m / d for m, d in zip(qps[mode], qps["direct"], strict=True))

    added = statistics.median(e - d for e, d in zip(p50["edge"], p50["direct"], strict=True))
    median = {mode: round(statistics.median(values)) for mode, values in qps.items()}
    print(
        f"  median req/s: {median}; median CPU µs/call: envoy"
        f" {statistics.median(envoy_us['edge']):.0f}"
        f" (REST {statistics.median(envoy_us['rest']):.0f}),"
        f" user service direct {statistics.median(user_us['direct']):.0f},"
        f" via edge {statistics.median(user_us['edge']):.0f}"
    )
    return {
        "bench": "edge",
        "qps_ratio": round(paired("edge"), 3),
        "added_p50_ms": round(added, 3),
        "rest_qps_ratio": round(paired("rest"), 3),
        "client": client.name,
    }


async def run(offset: int, token: str, args: argparse.Namespace, folder: Path) -> dict[str, object]:
    await check_calls(offset, token)
    use_h2load = shutil.which("h2load") is not None and not args.python_client
    client = H2load(offset, token, folder) if use_h2load else PythonClient(offset, token)
    print(
        f"edge overhead: {args.rounds} rounds of {args.seconds:.0f} s per mode,"
        f" {IN_FLIGHT} in flight, client {client.name}"
        + ("" if use_h2load or args.python_client else " (h2load not installed)")
    )
    try:
        result = await measure(client, offset, args.rounds, args.seconds, args.p50_calls)
    finally:
        if isinstance(client, PythonClient):
            await client.close()
    stats = httpx.get(f"http://127.0.0.1:{9901 + offset}/stats", params={"filter": "rate_limited"})
    limited = sum(int(line.rsplit(" ", 1)[1]) for line in stats.text.splitlines() if line)
    if limited:
        raise RuntimeError(f"the edge rate-limited {limited} calls: the figures are not the edge's")
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--p50-calls", type=int, default=1000)
    parser.add_argument("--python-client", action="store_true", help="even where h2load is")
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
            # The edge's bucket too (its filter still runs); a refusal is a gRPC status
            # h2load would count as a success, so the bench also checks none happened.
            AIMESH_EDGE_RATE_LIMIT_TOKENS="1000000",
        )
        process, banner = start_up(env)
        try:
            token = next(
                line.split("TOKEN=", 1)[1].strip()
                for line in banner.splitlines()
                if "export TOKEN=" in line
            )
            result = asyncio.run(run(offset, token, args, Path(state)))
        finally:
            stop_up(process)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
