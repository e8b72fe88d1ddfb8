"""scripts/bench recommend: the recommend service's batching, efficiency, model and A/B test.

Side by side in one run (two recommend servers over the same database, one
with the micro-batcher on and one with it off, alternating rounds of load from
one client with 64 Recommend calls in flight, the result cache off so every
call is scored against the whole catalogue):
  batch_qps_ratio      QPS with batching on ÷ off.
  feed_efficiency      service QPS (on) ÷ in-process batched torch scoring QPS
                       (matmul, masks, top-100) at the mean batch size the
                       service formed (read from its /metrics), the in-process
                       figure measured in every round too, medians of both.
  loop_cpu_us_per_call, scoring_cpu_us_per_call
                       where the "on" server's CPU goes, per call, median of
                       rounds (from /proc): its event loop thread, and scoring
                       (the lane thread plus, with AIMESH_RECOMMEND_SCORING_PROCESS,
                       the scoring process).
For scale it also prints what a bare Python gRPC server answers from the same
client (tests/load/floor_server.py), with no work per call.
The served model is registered straight into the service's registry with
random weights: scoring costs the same whatever the weights are, and training
on a catalogue this large would dominate the run.
Then, offline:
  hr10_vs_popularity   HR@10 of the trained model ÷ popularity's, on held-out
                       interactions of synthetic users and items with planted groups.
  aa_false_positive_rate, power
                       the A/B test's rate of "significant" under A/A and under a
                       planted 5% lift, by simulation at the sample size it reports
                       (base conversion rate 10%).
The last line is one JSON object with those keys.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from aimesh.recommend.v1 import recommend_service_pb2 as pb  # noqa: E402
from aimesh.recommend.v1 import recommend_service_pb2_grpc  # noqa: E402
from aimesh_cli import local  # noqa: E402
from aimesh_recommend import evaluation, stats  # noqa: E402
from aimesh_recommend import model as mf  # noqa: E402
from aimesh_recommend.scoring import MAX_K, ScoreRequest, ServingModel  # noqa: E402
from aimesh_recommend.training import evaluate  # noqa: E402
from tests.load.servers import (  # noqa: E402
    histogram_buckets,
    mean_of_histogram,
    on_off_rounds,
    start_process,
    wait_serving,
)

IN_FLIGHT = 64
SEEN_PER_USER = 20
BASE_RATE = 0.10


def build_model(users: int, items: int, dimension: int) -> tuple[bytes, list[str], list[str]]:
    torch.manual_seed(0)
    model = mf.MatrixFactorization(users, items, dimension)
    return (
        mf.to_bytes(model),
        [f"users/b{n}" for n in range(users)],
        [f"i{n}" for n in range(items)],
    )


async def seed(url: str, blob: bytes, user_ids: list[str], item_ids: list[str]) -> None:
    """Catalogue, interactions and a READY v1, written as the service writes them."""
    from aimesh_recommend.server import SPEC
    from aimesh_runtime import db

    pool = await db.create_pool(url)
    try:
        await db.migrate(pool, SPEC.migrations)
        rng = np.random.default_rng(0)
        await pool.execute("INSERT INTO items (id, text) SELECT unnest($1::text[]), ''", item_ids)
        users = np.repeat(np.arange(len(user_ids)), SEEN_PER_USER)
        items = rng.integers(0, len(item_ids), len(users))
        await pool.execute(
            """INSERT INTO interactions (id, user_id, item_id, kind, weight, event_time)
               SELECT 'x' || n, u, i, 1, 1, now()
               FROM unnest($1::text[], $2::text[]) WITH ORDINALITY AS t(u, i, n)
               ON CONFLICT DO NOTHING""",
            [user_ids[u] for u in users],
            [item_ids[i] for i in items],
        )
        await pool.execute(
            """INSERT INTO model_versions (version, status, artifact, user_ids, item_ids,
                   training_job) VALUES ('v1', 'READY', $1, $2, $3, 'bench')""",
            blob, user_ids, item_ids,
        )  # fmt: skip
    finally:
        await pool.close()


async def load_round(
    port: int, token: str, user_ids: list[str], seconds: float
) -> tuple[float, list[float]]:
    latencies: list[float] = []
    metadata = (("authorization", f"Bearer {token}"),)
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = recommend_service_pb2_grpc.RecommendServiceStub(channel)
        stop_at = time.monotonic() + seconds
        position = [0]

        async def worker() -> None:
            while time.monotonic() < stop_at:
                user = user_ids[position[0] % len(user_ids)]
                position[0] += 1
                started = time.perf_counter()
                reply = await stub.Recommend(
                    pb.RecommendRequest(user=user, k=10), metadata=metadata, timeout=30
                )
                latencies.append(time.perf_counter() - started)
                if reply.fallback:
                    raise RuntimeError(f"fallback answered: {reply.fallback_reason}")

        started = time.monotonic()
        await asyncio.gather(*(worker() for _ in range(IN_FLIGHT)))
        elapsed = time.monotonic() - started
    return len(latencies) / elapsed, latencies


class InProcessScorer:
    """In-process scoring of `batch` users at a time, seen items masked: the
    ceiling. With the service's torch threads (AIMESH_RECOMMEND_TORCH_THREADS,
    default 1)."""

    def __init__(self, blob: bytes, user_ids: list[str], item_ids: list[str]) -> None:
        torch.set_num_threads(1)
        rng = np.random.default_rng(1)
        users = np.repeat(np.arange(len(user_ids)), SEEN_PER_USER)
        items = rng.integers(0, len(item_ids), len(users))
        self.serving = ServingModel(
            "v1",
            mf.from_bytes(blob),
            user_ids,
            item_ids,
            [(user_ids[u], item_ids[i]) for u, i in zip(users, items, strict=True)],
            torch.device("cpu"),
        )
        self._position = 0

    def qps(self, batch: int, seconds: float) -> float:
        serving = self.serving
        done, started = 0, time.perf_counter()
        while time.perf_counter() - started < seconds:
            rows = [(self._position + n) % len(serving.user_ids) for n in range(batch)]
            self._position += batch
            serving.score(
                [ScoreRequest(serving, r, tuple(serving.seen.get(r, ()))) for r in rows], MAX_K
            )
            done += batch
        return done / (time.perf_counter() - started)


def cpu_seconds(pid: int) -> dict[str, float]:
    """CPU time so far of the server `pid`: its main thread (the event loop),
    each other thread by id, and its child processes (a scoring process)."""
    tick = os.sysconf("SC_CLK_TCK")

    def used(stat: Path) -> tuple[int, float]:
        fields = stat.read_text().rsplit(")", 1)[1].split()
        return int(fields[1]), (int(fields[11]) + int(fields[12])) / tick  # ppid, utime + stime

    times: dict[str, float] = {}
    for task in Path(f"/proc/{pid}/task").iterdir():
        with contextlib.suppress(FileNotFoundError):
            times["loop" if task.name == str(pid) else task.name] = used(task / "stat")[1]
    children = 0.0
    for process in Path("/proc").glob("[0-9]*"):
        with contextlib.suppress(FileNotFoundError, ProcessLookupError):
            ppid, seconds = used(process / "stat")
            if ppid == pid:
                children += seconds
    times["children"] = children
    return times


def cpu_per_call(before: dict[str, float], after: dict[str, float], calls: int) -> dict[str, float]:
    """Microseconds of CPU per call: event loop, the busiest other thread (the
    scoring lane), the other threads together, and child processes."""
    delta = {name: after[name] - before.get(name, 0.0) for name in after}
    threads = sorted((v for k, v in delta.items() if k not in ("loop", "children")), reverse=True)
    per_call = 1e6 / max(calls, 1)
    return {
        "loop": delta["loop"] * per_call,
        "lane": (threads[0] if threads else 0.0) * per_call,
        "threads": sum(threads[1:]) * per_call,
        "child": delta["children"] * per_call,
    }


async def grpc_floor_qps(port: int, seconds: float) -> float:
    """Health checks, 64 in flight, from this client to a bare gRPC server
    (tests/load/floor_server.py): what Python gRPC alone costs per call here."""
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    done = 0
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        stop_at = time.monotonic() + seconds

        async def worker() -> None:
            nonlocal done
            while time.monotonic() < stop_at:
                await stub.Check(health_pb2.HealthCheckRequest(), timeout=30)
                done += 1

        started = time.monotonic()
        await asyncio.gather(*(worker() for _ in range(IN_FLIGHT)))
        return done / (time.monotonic() - started)


async def measure_serving(args: argparse.Namespace) -> dict[str, Any]:
    os.environ["AIMESH_PORT_OFFSET"] = str(local.free_port_offset(6000))
    folder = Path(tempfile.mkdtemp(prefix="aimesh-bench-recommend-"))
    stored = local.load_secrets(folder)
    blob, user_ids, item_ids = build_model(args.users, args.items, args.dimension)
    with local.database_server(folder) as admin_url:
        urls = await local.provision(admin_url, stored["role_passwords"])
        env = local.service_environment(urls, stored, os.environ)
        env.pop("AIMESH_NOTIFY_ADDRESS", None)  # no notify here: no outbox relay noise
        env["AIMESH_RATE_LIMIT_RPS"] = "1000000"  # one principal drives all the load
        env["AIMESH_RATE_LIMIT_BURST"] = "1000000"
        env["AIMESH_RECOMMEND_CACHE_TTL_S"] = "0"  # every call scored
        env["AIMESH_RECOMMEND_DEVICE"] = "cpu"
        await seed(urls["recommend"], blob, user_ids, item_ids)
        user_port = local.grpc_port("user")
        ports = {"on": local.grpc_port("recommend"), "off": local.grpc_port("recommend") + 100}
        processes = [start_process("aimesh_user", env, user_port, folder / "user.log")]
        try:
            await wait_serving(user_port, processes[0])
            token = await local.login(
                f"127.0.0.1:{user_port}", stored["admin_email"], stored["admin_password"]
            )
            for mode, port in ports.items():
                mode_env = {**env, "AIMESH_RECOMMEND_BATCHING": "true" if mode == "on" else "false"}
                processes.append(
                    start_process("aimesh_recommend", mode_env, port, folder / f"{mode}.log")
                )
                await wait_serving(port, processes[-1])
            await load_round(ports["on"], token, user_ids, 1.0)  # warm up both
            await load_round(ports["off"], token, user_ids, 1.0)
            scorer = InProcessScorer(blob, user_ids, item_ids)
            batches: list[int] = []

            def raw_round() -> float:
                # at the batch the service has formed so far
                mean = mean_of_histogram(ports["on"] + 1000, "aimesh_recommend_batch_size")
                batches.append(max(1, round(mean)))
                return scorer.qps(batches[-1], args.seconds)

            on_pid = processes[1].pid
            cpu: list[dict[str, float]] = []

            async def measured_round(port: int) -> tuple[float, list[float]]:
                if port != ports["on"]:
                    return await load_round(port, token, user_ids, args.seconds)
                before = cpu_seconds(on_pid)
                qps, latencies = await load_round(port, token, user_ids, args.seconds)
                cpu.append(cpu_per_call(before, cpu_seconds(on_pid), len(latencies)))
                return qps, latencies

            summary = await on_off_rounds(ports, args.rounds, measured_round, raw_round)
            batch_buckets = histogram_buckets(ports["on"] + 1000, "aimesh_recommend_batch_size")
            floor_port = ports["on"] + 200
            processes.append(
                subprocess.Popen(
                    [sys.executable, str(ROOT / "tests/load/floor_server.py"), str(floor_port)]
                )
            )
            await wait_serving(floor_port, processes[-1])
            floor = await grpc_floor_qps(floor_port, args.seconds)
        finally:
            for process in processes:
                process.terminate()
                process.wait()
    on_qps, off_qps, raw = summary["on"][0], summary["off"][0], summary["raw"][0]
    cpu_median = {part: statistics.median(c[part] for c in cpu) for part in cpu[0]}
    print(
        "  server CPU per call, batching on (µs, medians of rounds): event loop"
        f" {cpu_median['loop']:.0f}, scoring lane thread {cpu_median['lane']:.0f},"
        f" other threads {cpu_median['threads']:.0f}, scoring process {cpu_median['child']:.0f}"
    )
    print(
        f"  in-process batched torch scoring at the service's mean batch"
        f" ({', '.join(map(str, batches))}): median {raw:.0f} q/s"
    )
    # For scale: one process serves both the calls and the scoring, and its
    # event loop and the scoring's Python share one GIL.
    print(
        f"  health checks from this client to a bare gRPC server"
        f" (no work per call): {floor:.0f} q/s"
    )
    return {
        "batch_qps_ratio": on_qps / off_qps,
        "feed_efficiency": on_qps / raw,
        "batches": batch_buckets,
        "cpu": cpu_median,
    }


def measure_model() -> float:
    split = evaluation.leave_last_out(evaluation.planted())
    started = time.perf_counter()
    model = mf.train(split.train, mf.TrainingOptions(epochs=20), torch.device("cpu"))
    metrics = evaluate(model, split, torch.device("cpu"))
    print(
        f"  planted groups: HR@10 {metrics['hr_at_10']:.4f} (popularity"
        f" {metrics['popularity_hr_at_10']:.4f}), NDCG@10 {metrics['ndcg_at_10']:.4f}"
        f" (popularity {metrics['popularity_ndcg_at_10']:.4f});"
        f" trained in {time.perf_counter() - started:.1f} s"
    )
    return metrics["hr_at_10"] / metrics["popularity_hr_at_10"]


def measure_test() -> tuple[float, float]:
    n = stats.required_exposures(BASE_RATE)
    false_positives = stats.simulate(BASE_RATE, 0.0, n, runs=100_000, seed=1)
    power = stats.simulate(BASE_RATE, stats.DETECTABLE_LIFT, n, runs=20_000, seed=2)
    print(
        f"  A/B test at base rate {BASE_RATE:.0%}, {n} exposures per variant:"
        f" A/A significant {false_positives:.4f} of 100,000 runs;"
        f" +5% lift detected {power:.4f} of 20,000"
    )
    return false_positives, power


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3, help="alternating on/off rounds")
    parser.add_argument("--seconds", type=float, default=5.0, help="seconds of load per round")
    parser.add_argument("--users", type=int, default=5_000)
    parser.add_argument("--items", type=int, default=100_000)
    parser.add_argument("--dimension", type=int, default=32)
    parser.add_argument("--plot", action="store_true", help="write PNGs into tests/load/plots")
    args = parser.parse_args()
    print(
        f"serving: {args.items} items x {args.dimension} dims, {args.users} users;"
        f" {args.rounds} rounds of {args.seconds:.0f} s, {IN_FLIGHT} in flight, cache off"
    )
    serving = await measure_serving(args)
    if args.plot:
        from tests.load import plotting

        path = plotting.batch_figure(
            serving["batches"],
            plotting.PLOTS_DIR / "recommend-batches.png",
            "recommend: batches the scoring micro-batcher formed",
        )
        print(f"  wrote {path.relative_to(ROOT)}")
    print("model and A/B test, offline")
    hr_ratio = measure_model()
    false_positives, power = measure_test()
    print(
        json.dumps(
            {
                "bench": "recommend",
                "feed_efficiency": round(serving["feed_efficiency"], 3),
                "batch_qps_ratio": round(serving["batch_qps_ratio"], 3),
                "hr10_vs_popularity": round(hr_ratio, 3),
                "aa_false_positive_rate": round(false_positives, 4),
                "power": round(power, 4),
                "loop_cpu_us_per_call": round(serving["cpu"]["loop"], 1),
                "scoring_cpu_us_per_call": round(
                    serving["cpu"]["lane"] + serving["cpu"]["child"], 1
                ),
            }
        )
    )


if __name__ == "__main__":
    asyncio.run(main())
