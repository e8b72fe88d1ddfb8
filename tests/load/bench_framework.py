"""scripts/bench framework: what the shared runtime costs.

qps_ratio     QPS of an authenticated GetUser through the whole server pipeline
              as a service runs it by default (trace context, request id,
              metrics, JWT check, scopes, rate limit, protovalidate, error
              model) divided by QPS of the same handler on a bare grpc.aio
              server. One client (h2load, one connection, 100 streams in
              flight), rounds alternating in the same run. A third server
              records every span too (as with AIMESH_OTLP_ENDPOINT set and
              sampling at 1.0, exporting to a sink); its ratio is printed above
              the JSON line.
cold_start_s  From launching the platform (embedded PostgreSQL already
              initialised, as after install) until all five services answer
              SERVING.
rss_mb        Total resident memory of the five service processes once SERVING.

The last line printed is one JSON object with those keys.
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
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import grpc
import psutil
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter, SpanExportResult
from opentelemetry.trace import Tracer
from prometheus_client import CollectorRegistry

from aimesh.user.v1 import user_service_pb2 as pb
from aimesh.user.v1 import user_service_pb2_grpc
from aimesh_cli import local
from aimesh_runtime.auth import TokenVerifier, policies_for
from aimesh_runtime.metrics import RpcMetrics
from aimesh_runtime.pipeline import ServerPipeline
from aimesh_runtime.ratelimit import RateLimiter
from aimesh_runtime.server import PipelinedServer
from aimesh_runtime.telemetry import tracer_provider

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from tests.tokens import claims, jwks, signed

SERVICE = pb.DESCRIPTOR.services_by_name["UserService"]
METHOD = "/aimesh.user.v1.UserService/GetUser"
USER = pb.User(name="users/bench", email="bench@example.com", display_name="Bench")


class CountingUsers(user_service_pb2_grpc.UserServiceServicer):
    def __init__(self) -> None:
        self.calls = 0

    async def GetUser(
        self, request: pb.GetUserRequest, context: grpc.aio.ServicerContext
    ) -> pb.GetUserResponse:
        self.calls += 1
        return pb.GetUserResponse(user=USER)


class DiscardSpans(SpanExporter):
    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        return SpanExportResult.SUCCESS


def recording_tracer() -> Tracer:
    provider = TracerProvider()
    provider.add_span_processor(BatchSpanProcessor(DiscardSpans()))
    return provider.get_tracer("bench")


def full_pipeline(registry: CollectorRegistry, tracer: Tracer | None = None) -> ServerPipeline:
    verifier = TokenVerifier(jwks, issuer="aimesh-user", audience="aimesh", max_lifetime_s=3600)
    return ServerPipeline(
        policies=policies_for([SERVICE]),
        metrics=RpcMetrics(registry),
        # The default: no AIMESH_OTLP_ENDPOINT, so the runtime's no-op provider.
        tracer=tracer or tracer_provider("bench", "", 1.0).get_tracer("bench"),
        verifier=verifier,
        api_keys=None,
        # The limiter runs on every call; its limit is raised so it never refuses here.
        limiter=RateLimiter(rate=1e9, burst=10**9),
    )


async def h2load(port: int, token: str, seconds: float, body: Path) -> tuple[float, int]:
    command = [
        "h2load", "--duration", str(int(seconds)), "--warm-up-time", "1",
        "-c", "1", "-m", "100", "-t", "1",
        "-H", "content-type: application/grpc", "-H", "te: trailers",
        "-H", f"authorization: Bearer {token}",
        "-d", str(body), f"http://127.0.0.1:{port}{METHOD}",
    ]  # fmt: skip
    process = await asyncio.create_subprocess_exec(
        *command, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT
    )
    output = (await process.communicate())[0].decode()
    qps = re.search(r"finished in [\d.]+s, ([\d.]+) req/s", output)
    done = re.search(r"requests: \d+ total, \d+ started, \d+ done, (\d+) succeeded", output)
    if qps is None or done is None:
        raise RuntimeError(f"h2load output not understood:\n{output}")
    return float(qps.group(1)), int(done.group(1))


PIPELINES = {
    "bare": lambda registry: None,
    "full": lambda registry: full_pipeline(registry),
    "traced": lambda registry: full_pipeline(registry, recording_tracer()),
}


async def serve(mode: str) -> None:
    """One server per process, as in production: grpc's poller threads would
    otherwise share one interpreter and slow each other."""
    registry = CollectorRegistry()
    pipeline = PIPELINES[mode](registry)
    handler = CountingUsers()
    server = grpc.aio.server()
    # As AimeshServer does: the pipeline is put in front of each handler as it is registered.
    target = PipelinedServer(server, pipeline) if pipeline else server
    user_service_pb2_grpc.add_UserServiceServicer_to_server(handler, target)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    print(json.dumps({"port": port, "token": signed(claims(scope="user.read"))}), flush=True)
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)
    await server.stop(0)
    errors = sum(
        sample.value
        for metric in registry.collect()
        for sample in metric.samples
        if sample.name == "aimesh_rpc_server_requests_total" and sample.labels["grpc_code"] != "OK"
    )
    print(json.dumps({"handled": handler.calls, "errors": errors}), flush=True)


async def measure_qps(rounds: int, seconds: int) -> dict[str, Any]:
    if shutil.which("h2load") is None:
        raise SystemExit("scripts/bench framework needs h2load (Debian package nghttp2-client)")
    servers: dict[str, tuple[asyncio.subprocess.Process, dict[str, Any]]] = {}
    for mode in PIPELINES:
        process = await asyncio.create_subprocess_exec(
            sys.executable, __file__, "--serve", mode,
            stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
        )  # fmt: skip
        assert process.stdout is not None
        servers[mode] = (process, json.loads(await process.stdout.readline()))
    payload = pb.GetUserRequest(name="users/bench").SerializeToString()
    results: dict[str, list[float]] = {mode: [] for mode in PIPELINES}
    succeeded: dict[str, int] = dict.fromkeys(PIPELINES, 0)
    # Server CPU per call: steadier than QPS on a small shared machine, printed beside it.
    cpu_us: dict[str, float] = dict.fromkeys(PIPELINES, 0.0)
    calls: dict[str, int] = dict.fromkeys(PIPELINES, 0)
    with tempfile.NamedTemporaryFile(suffix=".grpc") as body:
        body.write(struct.pack(">?I", False, len(payload)) + payload)
        body.flush()
        modes = list(PIPELINES)
        for number in range(rounds):
            # Rotate the order each round so drift in the machine's speed cancels out.
            shift = number % len(modes)
            for mode in modes[shift:] + modes[:shift]:
                process, info = servers[mode]
                cpu = psutil.Process(process.pid)
                used_before, served_before = sum(cpu.cpu_times()[:2]), succeeded[mode]
                qps, done = await h2load(info["port"], info["token"], seconds, Path(body.name))
                results[mode].append(qps)
                succeeded[mode] += done
                cpu_us[mode] += (sum(cpu.cpu_times()[:2]) - used_before) * 1e6
                calls[mode] += succeeded[mode] - served_before
            print(
                f"  round {number + 1}: "
                + ", ".join(f"{mode} {results[mode][-1]:.0f}" for mode in modes)
                + f" req/s; full/bare {results['full'][-1] / results['bare'][-1]:.3f}",
                flush=True,
            )
    for mode, (process, _) in servers.items():
        assert process.stdin is not None and process.stdout is not None
        process.stdin.write(b"stop\n")
        await process.stdin.drain()
        report = json.loads(await process.stdout.readline())
        await process.wait()
        # h2load counts HTTP 200s, and gRPC errors hide in trailers: check the handler ran.
        if report["errors"] or report["handled"] < succeeded[mode]:
            raise RuntimeError(f"{mode}: {succeeded[mode]} replies, server says {report}")
    # Each round compares servers measured moments apart; the median of those
    # paired ratios resists the machine's drift better than a ratio of medians.
    paired = {
        mode: sorted(f / b for f, b in zip(results[mode], results["bare"], strict=True))
        for mode in ("full", "traced")
    }
    return {
        **{f"{mode}_qps": statistics.median(values) for mode, values in results.items()},
        "qps_ratio": statistics.median(paired["full"]),
        "qps_ratio_range": (paired["full"][0], paired["full"][-1]),
        "qps_ratio_traced": statistics.median(paired["traced"]),
        "cpu_us_per_call": {mode: cpu_us[mode] / max(calls[mode], 1) for mode in PIPELINES},
    }


async def measure_platform() -> dict[str, Any]:
    os.environ["AIMESH_PORT_OFFSET"] = str(local.free_port_offset(4000))
    folder = Path(tempfile.mkdtemp(prefix="aimesh-bench-"))
    stored = local.load_secrets(folder)
    with local.database_server(folder) as admin_url:  # initdb: part of install, not timed
        await local.provision(admin_url, stored["role_passwords"])
    launched = time.monotonic()
    with local.database_server(folder) as admin_url:
        urls = await local.provision(admin_url, stored["role_passwords"])
        db_ready_s = time.monotonic() - launched
        env = local.service_environment(urls, stored, os.environ)
        processes = local.spawn(local.SERVICES, env, folder / "logs")
        try:
            await local.wait_serving(processes)
            cold_start_s = time.monotonic() - launched
            await asyncio.sleep(1.0)
            rss = {
                p.name: psutil.Process(p.process.pid).memory_info().rss / 2**20 for p in processes
            }
        finally:
            local.stop(processes)
    shutil.rmtree(folder, ignore_errors=True)
    for name, mb in rss.items():
        print(f"  rss {name:9} {mb:7.1f} MB")
    print(f"  database up and provisioned after {db_ready_s:.2f} s")
    return {"cold_start_s": cold_start_s, "rss_mb": sum(rss.values()), "db_ready_s": db_ready_s}


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=9, help="rounds of bare, full, traced")
    parser.add_argument("--seconds", type=int, default=3, help="seconds of load per server")
    parser.add_argument("--serve", choices=sorted(PIPELINES), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        await serve(args.serve)
        return
    print(f"interceptor overhead: {args.rounds} rounds of {args.seconds:.0f} s, 100 in flight")
    qps = await measure_qps(args.rounds, args.seconds)
    print(
        f"  median bare {qps['bare_qps']:.1f}, full {qps['full_qps']:.1f}, "
        f"traced {qps['traced_qps']:.1f} req/s"
    )
    cpu = qps["cpu_us_per_call"]
    print("  server CPU per call: " + ", ".join(f"{m} {us:.0f} us" for m, us in cpu.items()))
    low, high = qps["qps_ratio_range"]
    print(
        f"  qps_ratio {qps['qps_ratio']:.3f} (median of paired rounds; {low:.3f} to {high:.3f}),"
        f" with every span recorded {qps['qps_ratio_traced']:.3f}"
    )
    print("platform: cold start and memory of five processes")
    platform = await measure_platform()
    print(f"  all five SERVING {platform['cold_start_s']:.2f} s after launch")
    print(
        json.dumps(
            {
                "bench": "framework",
                "qps_ratio": round(qps["qps_ratio"], 3),
                "cold_start_s": round(platform["cold_start_s"], 2),
                "rss_mb": round(platform["rss_mb"], 1),
            }
        )
    )


if __name__ == "__main__":
    asyncio.run(main())
