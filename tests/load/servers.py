"""Server processes for the benchmarks: start one, wait for SERVING, read a
batch-size histogram's mean from its /metrics, load two of them side by side."""

from __future__ import annotations

import asyncio
import math
import re
import statistics
import subprocess
import sys
import time
import urllib.request
from collections.abc import Awaitable, Callable
from pathlib import Path

import numpy as np

from aimesh_cli import local


def start_process(
    module: str, env: dict[str, str], port: int, log: Path
) -> subprocess.Popen[bytes]:
    """`python -m module` on gRPC `port`, its HTTP side on port + 1000."""
    child = {**env, "AIMESH_GRPC_PORT": str(port), "AIMESH_HTTP_PORT": str(port + 1000)}
    with log.open("ab") as out:
        return subprocess.Popen(
            [sys.executable, "-m", module], env=child, stdout=out, stderr=subprocess.STDOUT
        )


async def wait_serving(port: int, process: subprocess.Popen[bytes], timeout_s: float = 180) -> None:
    deadline = time.monotonic() + timeout_s
    while await local.check_health(f"127.0.0.1:{port}", 1.0) != "SERVING":
        if process.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"server on {port} did not start")
        await asyncio.sleep(0.2)


def mean_of_histogram(http_port: int, name: str) -> float:
    """Mean of Prometheus histogram `name` on the server's /metrics."""
    url = f"http://127.0.0.1:{http_port}/metrics"
    text = urllib.request.urlopen(url, timeout=5).read().decode()
    values = {}
    for part in ("sum", "count"):
        found = re.search(rf"^{name}_{part} (\S+)", text, re.M)
        if found is None:
            raise RuntimeError(f"{name}_{part} is not in {url}")
        values[part] = float(found.group(1))
    return values["sum"] / values["count"]


def histogram_buckets(http_port: int, name: str) -> list[tuple[float, float]]:
    """(upper bound, cumulative count) of Prometheus histogram `name` on /metrics."""
    url = f"http://127.0.0.1:{http_port}/metrics"
    text = urllib.request.urlopen(url, timeout=5).read().decode()
    found = re.findall(rf'^{name}_bucket{{[^}}]*le="([^"]+)"[^}}]*}} (\S+)', text, re.M)
    return [(float(bound), float(count)) for bound, count in found]


async def on_off_rounds(
    ports: dict[str, int],
    rounds: int,
    load_round: Callable[[int], Awaitable[tuple[float, list[float]]]],
    raw_round: Callable[[], float] | None = None,
) -> dict[str, tuple[float, float]]:
    """Alternating rounds of `load_round(port)` against the "on" and "off"
    servers (which goes first alternates, so drift in the machine's speed
    cancels out); per mode, the median QPS and the p99 latency in seconds.
    With `raw_round`, each round also runs it (QPS of the in-process ceiling),
    summarised as "raw" with no latency."""
    results: dict[str, list[float]] = {"on": [], "off": []}
    latencies: dict[str, list[float]] = {"on": [], "off": []}
    raw: list[float] = []
    for number in range(rounds):
        for mode in ("on", "off") if number % 2 == 0 else ("off", "on"):
            qps, taken = await load_round(ports[mode])
            results[mode].append(qps)
            latencies[mode].extend(taken)
        on, off = results["on"][-1], results["off"][-1]
        line = f"  round {number + 1}: on {on:.0f} q/s, off {off:.0f} q/s"
        if raw_round is not None:
            raw.append(raw_round())
            line += f", in-process {raw[-1]:.0f} q/s"
        print(line, flush=True)
    summary = {
        mode: (statistics.median(results[mode]), float(np.percentile(latencies[mode], 99)))
        for mode in ("on", "off")
    }
    if raw:
        summary["raw"] = (statistics.median(raw), math.nan)
    print(
        f"  batching on {summary['on'][0]:.0f} q/s p99 {summary['on'][1] * 1000:.1f} ms;"
        f" off {summary['off'][0]:.0f} q/s p99 {summary['off'][1] * 1000:.1f} ms"
    )
    return summary
