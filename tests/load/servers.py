"""Server processes for the benchmarks: start one, wait for SERVING, read a
batch-size histogram's mean from its /metrics."""

from __future__ import annotations

import asyncio
import re
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

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
