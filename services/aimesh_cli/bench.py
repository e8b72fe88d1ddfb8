"""`aimesh bench`: an asyncio load generator for any aimesh RPC.

Two modes:
- open loop (`--rate R`): calls are started on a fixed schedule, R a second,
  whatever the server does. Latency is measured from each call's *intended*
  start time, so a stalled server shows up as the queueing delay its users
  would see instead of being hidden (coordinated omission).
- closed loop (`--concurrency C`): C callers each start the next call when the
  previous one ends; latency is from the actual send.

Each `--call` is `SERVICE/METHOD[*WEIGHT][=JSON]`; calls are drawn by weight.
Latencies go into HDR-style log-linear histograms (32 sub-buckets per power of
two, about 3% resolution from 1 µs to hours). The JSON report has totals, codes,
percentiles per method and a per-second timeline; `--png` plots the timeline's
percentiles (matplotlib, from the dev extra, imported only then).
"""

from __future__ import annotations

import argparse
import asyncio
import importlib
import json
import math
import random
import sys
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
from google.protobuf import json_format
from google.protobuf.descriptor import MethodDescriptor
from google.protobuf.message import Message
from google.protobuf.message_factory import GetMessageClass

CONTRACTS = ("user", "search", "recommend", "chat", "notify")
SUB_BUCKETS = 32  # per power of two: 2^(1/32) ≈ 2.2% relative resolution


class Histogram:
    """Log-linear latency histogram in microseconds, mergeable, O(1) record."""

    def __init__(self) -> None:
        self.counts: Counter[int] = Counter()
        self.total = 0
        self.max_us = 0.0
        self.sum_us = 0.0

    @staticmethod
    def index(us: float) -> int:
        return 0 if us < 1 else int(math.log2(us) * SUB_BUCKETS) + 1

    @staticmethod
    def upper(index: int) -> float:
        return 1.0 if index == 0 else 2 ** (index / SUB_BUCKETS)

    def record(self, seconds: float) -> None:
        us = max(seconds, 0.0) * 1e6
        self.counts[self.index(us)] += 1
        self.total += 1
        self.sum_us += us
        self.max_us = max(self.max_us, us)

    def merge(self, other: Histogram) -> None:
        self.counts.update(other.counts)
        self.total += other.total
        self.sum_us += other.sum_us
        self.max_us = max(self.max_us, other.max_us)

    def percentile_ms(self, p: float) -> float:
        """The bucket upper bound at percentile p (0-100), capped at the max seen."""
        if not self.total:
            return 0.0
        rank = max(1, math.ceil(self.total * p / 100))
        seen = 0
        for index in sorted(self.counts):
            seen += self.counts[index]
            if seen >= rank:
                return round(min(self.upper(index), self.max_us) / 1000, 3)
        return round(self.max_us / 1000, 3)

    def summary(self) -> dict[str, float]:
        return {
            "p50": self.percentile_ms(50),
            "p90": self.percentile_ms(90),
            "p99": self.percentile_ms(99),
            "p999": self.percentile_ms(99.9),
            "max": round(self.max_us / 1000, 3),
            "mean": round(self.sum_us / self.total / 1000, 3) if self.total else 0.0,
        }


@dataclass
class Call:
    path: str
    weight: float
    request: bytes
    server_streaming: bool
    latency: Histogram = field(default_factory=Histogram)
    codes: Counter[str] = field(default_factory=Counter)


def find_method(full_name: str) -> MethodDescriptor:
    service_name, _, method_name = full_name.lstrip("/").partition("/")
    for contract in CONTRACTS:
        module = importlib.import_module(f"aimesh.{contract}.v1.{contract}_service_pb2")
        for service in module.DESCRIPTOR.services_by_name.values():
            if service.full_name == service_name and method_name in service.methods_by_name:
                return service.methods_by_name[method_name]  # type: ignore[no-any-return]
    raise ValueError(f"no method {full_name} in the aimesh contracts")


def parse_call(spec: str) -> Call:
    """SERVICE/METHOD[*WEIGHT][=JSON] -> a Call with its request serialized once."""
    head, _, body = spec.partition("=")
    name, _, weight = head.partition("*")
    method = find_method(name.strip())
    if method.client_streaming:
        raise ValueError(f"{name}: client-streaming methods are not supported")
    request: Message = GetMessageClass(method.input_type)()
    if body.strip():
        json_format.Parse(body, request)
    return Call(
        path=f"/{method.containing_service.full_name}/{method.name}",
        weight=float(weight) if weight else 1.0,
        request=request.SerializeToString(),
        server_streaming=method.server_streaming,
    )


def _identity(data: bytes) -> bytes:
    return data


class Run:
    def __init__(
        self, calls: Sequence[Call], channels: Sequence[grpc.aio.Channel], args: Any
    ) -> None:
        self.calls = list(calls)
        self.weights = [c.weight for c in calls]
        self.channels = list(channels)
        token = (("authorization", f"Bearer {args.token}"),) if args.token else ()
        self.metadata = (*args.metadata, *token)
        self.timeout = args.timeout
        self.random = random.Random(args.seed)
        self.started = 0.0
        self.recording_from = 0.0
        self.windows: dict[int, Histogram] = {}
        self.window_errors: Counter[int] = Counter()
        self.in_flight = 0
        self.max_in_flight = args.max_in_flight
        self.skipped = 0
        self._next_channel = 0

    def _stub(self, call: Call) -> Any:
        channel = self.channels[self._next_channel % len(self.channels)]
        self._next_channel += 1
        kind = channel.unary_stream if call.server_streaming else channel.unary_unary
        return kind(call.path, request_serializer=_identity, response_deserializer=_identity)

    async def one(self, call: Call, intended: float) -> None:
        self.in_flight += 1
        code = "OK"
        try:
            rpc = self._stub(call)(call.request, metadata=self.metadata, timeout=self.timeout)
            if call.server_streaming:
                async for _ in rpc:
                    pass
            else:
                await rpc
        except grpc.aio.AioRpcError as error:
            code = error.code().name
        finally:
            self.in_flight -= 1
        done = time.monotonic()
        if intended < self.recording_from:
            return  # warm-up
        elapsed = done - intended
        call.latency.record(elapsed)
        call.codes[code] += 1
        second = int(done - self.recording_from)
        self.windows.setdefault(second, Histogram()).record(elapsed)
        if code != "OK":
            self.window_errors[second] += 1

    def pick(self) -> Call:
        return self.random.choices(self.calls, self.weights)[0]

    async def open_loop(self, rate: float, duration_s: float, warmup_s: float) -> None:
        tasks: set[asyncio.Task[None]] = set()
        self.started = time.monotonic()
        self.recording_from = self.started + warmup_s
        total = int(rate * (warmup_s + duration_s))
        for i in range(total):
            intended = self.started + i / rate
            delay = intended - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            if self.in_flight >= self.max_in_flight:
                self.skipped += 1  # the server is far behind; counted, not hidden
                continue
            task = asyncio.create_task(self.one(self.pick(), intended))
            tasks.add(task)
            task.add_done_callback(tasks.discard)
        if tasks:
            await asyncio.gather(*tasks)

    async def closed_loop(self, concurrency: int, duration_s: float, warmup_s: float) -> None:
        self.started = time.monotonic()
        self.recording_from = self.started + warmup_s
        end = self.recording_from + duration_s

        async def caller() -> None:
            while time.monotonic() < end:
                await self.one(self.pick(), time.monotonic())

        await asyncio.gather(*(caller() for _ in range(concurrency)))

    def report(self, args: Any, wall_s: float) -> dict[str, Any]:
        overall = Histogram()
        codes: Counter[str] = Counter()
        per_method = {}
        for call in self.calls:
            overall.merge(call.latency)
            codes.update(call.codes)
            per_method[call.path.lstrip("/")] = {
                "calls": call.latency.total,
                "codes": dict(call.codes),
                "latency_ms": call.latency.summary(),
            }
        timeline = [
            {
                "second": second,
                "calls": hist.total,
                "errors": self.window_errors.get(second, 0),
                "p50_ms": hist.percentile_ms(50),
                "p90_ms": hist.percentile_ms(90),
                "p99_ms": hist.percentile_ms(99),
                "max_ms": round(hist.max_us / 1000, 3),
            }
            for second, hist in sorted(self.windows.items())
        ]
        calls = overall.total
        return {
            "bench": "aimesh",
            "target": args.target,
            "mode": "open" if args.rate else "closed",
            "rate": args.rate,
            "concurrency": args.concurrency,
            "connections": args.connections,
            "duration_s": args.duration,
            "calls": calls,
            "ok": codes.get("OK", 0),
            "codes": dict(codes),
            "skipped_over_max_in_flight": self.skipped,
            "achieved_rps": round(calls / wall_s, 1) if wall_s > 0 else 0.0,
            "latency_ms": overall.summary(),
            "per_method": per_method,
            "timeline": timeline,
        }


def pyplot() -> Any:
    """matplotlib's pyplot drawing to files only (the dev extra, imported only
    when a plot is asked for); scripts/bench's --plot draws with it too."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save(figure: Any, path: Path) -> None:
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    pyplot().close(figure)


def plot(report: dict[str, Any], path: Path) -> None:
    plt = pyplot()
    seconds = [w["second"] for w in report["timeline"]]
    figure, axis = plt.subplots(figsize=(9, 4.5))
    for key, label in (("p50_ms", "p50"), ("p90_ms", "p90"), ("p99_ms", "p99"), ("max_ms", "max")):
        axis.plot(seconds, [w[key] for w in report["timeline"]], label=label)
    axis.set_yscale("log")
    axis.set_xlabel("second of the run")
    axis.set_ylabel("latency (ms, from intended start)" if report["mode"] == "open" else "ms")
    mode = f"{report['rate']}/s open loop" if report["mode"] == "open" else "closed loop"
    axis.set_title(f"aimesh bench {report['target']}: {mode}")
    axis.grid(True, which="both", alpha=0.3)
    axis.legend()
    save(figure, path)


async def run(args: Any) -> dict[str, Any]:
    calls = [parse_call(spec) for spec in args.call]
    options = [("grpc.max_receive_message_length", 64 * 1024 * 1024)]
    # Separate channels only connect separately when their options differ.
    channels = [
        grpc.aio.insecure_channel(args.target, options=[*options, ("aimesh.bench.channel", i)])
        for i in range(args.connections)
    ]
    try:
        for channel in channels:
            await asyncio.wait_for(channel.channel_ready(), timeout=10)
        bench = Run(calls, channels, args)
        started = time.monotonic()
        if args.rate:
            await bench.open_loop(args.rate, args.duration, args.warmup)
        else:
            await bench.closed_loop(args.concurrency, args.duration, args.warmup)
        wall = time.monotonic() - started - args.warmup
        return bench.report(args, wall)
    finally:
        for channel in channels:
            await channel.close()


def _metadata(raw: str) -> tuple[str, str]:
    key, sep, value = raw.partition(":")
    if not sep:
        raise argparse.ArgumentTypeError("expected KEY:VALUE")
    return key.strip().lower(), value.strip()


def cmd_bench(args: argparse.Namespace) -> int:
    if bool(args.rate) == bool(args.concurrency):
        print("aimesh bench: give exactly one of --rate and --concurrency", file=sys.stderr)
        return 2
    try:
        report = asyncio.run(run(args))
    except (ValueError, json_format.ParseError) as error:
        print(f"aimesh bench: {error}", file=sys.stderr)
        return 2
    except (TimeoutError, grpc.aio.AioRpcError) as error:
        print(f"aimesh bench: cannot reach {args.target}: {error}", file=sys.stderr)
        return 1
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    if args.png:
        try:
            plot(report, Path(args.png))
        except ImportError:
            print("aimesh bench: --png needs matplotlib (the dev extra)", file=sys.stderr)
    latency = report["latency_ms"]
    print(
        f"{report['calls']} calls, {report['achieved_rps']}/s, ok {report['ok']}, "
        f"p50 {latency['p50']} ms, p99 {latency['p99']} ms, max {latency['max']} ms",
        file=sys.stderr,
    )
    summary = {k: v for k, v in report.items() if k not in ("timeline", "per_method")}
    print(json.dumps(summary))
    return 0


def add_parser(commands: Any) -> None:
    parser = commands.add_parser(
        "bench",
        help="load-test RPCs: constant rate (open loop) or fixed concurrency (closed loop)",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--target", default="127.0.0.1:50051", help="host:port of a service")
    parser.add_argument(
        "--call",
        action="append",
        required=True,
        help="SERVICE/METHOD[*WEIGHT][=JSON], repeatable: "
        '\'aimesh.user.v1.UserService/GetUser*3={"name": "users/me"}\'',
    )
    parser.add_argument("--rate", type=float, default=0.0, help="calls a second (open loop)")
    parser.add_argument("--concurrency", type=int, default=0, help="callers (closed loop)")
    parser.add_argument("--duration", type=float, default=10.0, help="seconds measured")
    parser.add_argument("--warmup", type=float, default=1.0, help="seconds not measured first")
    parser.add_argument("--connections", type=int, default=1, help="HTTP/2 connections")
    parser.add_argument("--timeout", type=float, default=10.0, help="deadline per call (s)")
    parser.add_argument("--token", default="", help="bearer token (see `aimesh token`)")
    parser.add_argument(
        "-H", "--metadata", type=_metadata, action="append", default=[], help="KEY:VALUE"
    )
    parser.add_argument("--max-in-flight", type=int, default=10_000)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--out", default="", help="write the full JSON report here")
    parser.add_argument("--png", default="", help="plot percentiles over time here")
    parser.set_defaults(run=cmd_bench)
