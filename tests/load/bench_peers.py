"""scripts/bench peers: aimesh beside what a team would pick instead, in one run.

Each peer is installed into its own virtual environment under .aimesh/peers/
(never a dependency of the project) and runs as its users would run it. aimesh
and the peer are measured in alternating rounds (which goes first alternates,
so drift in the machine's speed cancels out), from the same load client, with
the same queries, fakes and receiver.

notify_vs_procrastinate  signed webhook deliveries per second, at least once:
    aimesh: PublishBatch through the notify service (JWT, validation, events
    and deliveries stored) and one `aimesh_notify.worker` process (256 at a
    time); procrastinate 3.10: batch_defer_async of a task that signs the
    request as notify does and POSTs it with httpx, one worker process (256
    at a time, BENCH_PROCRASTINATE_CONCURRENCY; a pool of 16 connections).
    Both: --jobs jobs a round, 100 a call, 4 calls in flight, into
    one embedded PostgreSQL (a database each), delivered to one receiver that
    verifies every signature. Rate = jobs ÷ seconds from the first publish to
    the last delivery accepted. N = aimesh's median ÷ the peer's.
chat_overhead_vs_litellm  added time to first text chunk over a direct SDK
    stream from the fake Messages API: aimesh's chat service (gRPC StreamChat,
    full pipeline, the turn stored) and LiteLLM's proxy (/v1/messages, one
    uvicorn worker, a master key, no database), measured in rotating triples
    (direct, aimesh, LiteLLM). C = aimesh's p50 ÷ LiteLLM's p50. Streams per
    second at 32 in flight are printed for both.
search_vs_ray, recommend_vs_ray  calls per second with --in-flight (64)
    calls in flight, closed loop: aimesh's search (encoder micro-batcher, FAISS) and
    recommend (Torch scoring micro-batcher) services, against Ray Serve 2.60
    (gRPC ingress serving aimesh's own protos, `@serve.batch` at the service's
    batch size and wait, 2 replicas of one torch thread) running the same
    model code on the same documents or the same model weights. Ratio =
    aimesh's median ÷ Ray's; p99 of both printed beside.

A job whose peer cannot be installed or run here prints one line saying so,
and its key is null. The last line is one JSON object:
{"bench": "peers", "search_vs_ray", "recommend_vs_ray",
 "chat_overhead_vs_litellm", "notify_vs_procrastinate"}.
`--plot` writes PNGs into tests/load/plots/.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import hashlib
import json
import os
import secrets
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
import urllib.request
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
_runtime = Path(tempfile.gettempdir()) / f"aimesh-runtime-{os.getuid()}"
_runtime.mkdir(mode=0o700, exist_ok=True)
os.environ.setdefault("XDG_RUNTIME_DIR", str(_runtime))

import asyncpg  # noqa: E402
import grpc  # noqa: E402
import numpy as np  # noqa: E402

PEERS_DIR = ROOT / ".aimesh" / "peers"
PLOTS_DIR = ROOT / "tests" / "load" / "plots"
PEER_CODE = ROOT / "tests" / "load" / "peers"
# What each peer's venv holds: the peer as its users install it, and for Ray
# the project's model code and protos (the same model on both sides).
PEER_REQUIREMENTS: dict[str, list[str]] = {
    "procrastinate": ["procrastinate==3.10.*", "psycopg[binary]>=3.2", "httpx>=0.27"],
    "litellm": ["litellm[proxy]==1.108.*"],
    "ray": ["ray[serve]==2.60.*", "torch==2.13.0", "-e", "./protos", "-e", ".[search,recommend]"],
}


# Jobs one procrastinate worker runs at once; aimesh's worker runs 256.
PROCRASTINATE_CONCURRENCY = int(os.environ.get("BENCH_PROCRASTINATE_CONCURRENCY", "256"))


class PeerUnavailable(Exception):
    """The peer cannot be installed or run on this machine."""


def peer_python(name: str) -> Path:
    """The interpreter of peer `name`'s venv, made and installed when its
    requirements changed (a stamp file holds their hash)."""
    folder = PEERS_DIR / name
    python = folder / "bin" / "python"
    wanted = hashlib.sha256(json.dumps(PEER_REQUIREMENTS[name]).encode()).hexdigest()
    stamp = folder / ".bench-installed"
    if python.exists() and stamp.exists() and stamp.read_text() == wanted:
        return python
    print(f"  installing {name} into {folder.relative_to(ROOT)} (once)", flush=True)
    try:
        if not python.exists():
            subprocess.run([sys.executable, "-m", "venv", str(folder)], check=True)
        subprocess.run(
            [str(python), "-m", "pip", "install", "--quiet", *PEER_REQUIREMENTS[name]],
            cwd=ROOT,
            check=True,
        )
    except (subprocess.CalledProcessError, OSError) as error:
        raise PeerUnavailable(f"{name} did not install: {error}") from error
    stamp.write_text(wanted)
    return python


def percentile(values: list[float], p: float) -> float:
    return float(np.percentile(values, p)) if values else float("nan")


async def closed_loop(
    call: Callable[[], Awaitable[Any]], in_flight: int, seconds: float
) -> tuple[float, list[float]]:
    """`in_flight` callers, each calling again as soon as its call returns, for
    `seconds`; (calls per second, each call's latency in seconds)."""
    latencies: list[float] = []
    stop_at = time.monotonic() + seconds

    async def caller() -> None:
        while time.monotonic() < stop_at:
            started = time.perf_counter()
            await call()
            latencies.append(time.perf_counter() - started)

    started = time.monotonic()
    await asyncio.gather(*(caller() for _ in range(in_flight)))
    return len(latencies) / (time.monotonic() - started), latencies


async def alternate(
    sides: dict[str, Callable[[], Awaitable[dict[str, Any]]]], rounds: int, key: str, unit: str
) -> dict[str, list[dict[str, Any]]]:
    """`rounds` rounds of each side's round function, the first side first in
    even rounds and last in odd ones; every round's result, per side."""
    results: dict[str, list[dict[str, Any]]] = {name: [] for name in sides}
    names = list(sides)
    for number in range(rounds):
        for name in names if number % 2 == 0 else list(reversed(names)):
            results[name].append(await sides[name]())
        shown = ", ".join(f"{name} {results[name][-1][key]:.0f} {unit}" for name in names)
        print(f"  round {number + 1}: {shown}", flush=True)
    return results


async def stop_child(process: asyncio.subprocess.Process) -> None:
    if process.returncode is None:
        process.terminate()
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(20):
                await process.wait()
                return
        process.kill()
        await process.wait()


# --- notify vs procrastinate ---------------------------------------------------


async def job_notify(args: argparse.Namespace) -> dict[str, Any]:
    import pgserver

    from aimesh.notify.v1 import notify_service_pb2_grpc
    from tests.fakes.webhook_receiver import WebhookReceiver
    from tests.load import bench_notify

    python = peer_python("procrastinate")
    jobs = args.jobs
    folder = Path(tempfile.mkdtemp(prefix="aimesh-bench-peers-"))
    os.chmod(folder, 0o755)  # pgserver runs PostgreSQL as its own user when root
    pg = pgserver.get_server(folder, cleanup_mode="stop")
    children: list[asyncio.subprocess.Process] = []
    receiver = await WebhookReceiver(keep=False).start()
    try:
        admin = pg.get_uri("postgres")
        connection = await asyncpg.connect(admin)
        for name in ("bench_notify", "bench_procrastinate"):
            await connection.execute(f"CREATE DATABASE {name}")
        await connection.close()
        notify_url = admin.replace("/postgres?", "/bench_notify?")
        peer_url = admin.replace("/postgres?", "/bench_procrastinate?")
        os.environ["AIMESH_NOTIFY_SECRET_ENCRYPTION_KEY"] = base64.urlsafe_b64encode(
            os.urandom(32)
        ).decode()
        server, info = await bench_notify.spawn("--serve", notify_url)
        children.append(server)
        children.append(await bench_notify.start_worker(notify_url))
        app = str(PEER_CODE / "procrastinate_app.py")
        migrate = await asyncio.create_subprocess_exec(str(python), app, "migrate", peer_url)
        if await migrate.wait():
            raise PeerUnavailable("procrastinate's schema did not apply")
        peer_secret = secrets.token_urlsafe(32)
        peer_env = {**os.environ, "BENCH_PEER_SECRET": peer_secret}
        children.append(
            await asyncio.create_subprocess_exec(
                str(python),
                app,
                "worker",
                peer_url,
                str(PROCRASTINATE_CONCURRENCY),
                env=peer_env,
            )
        )
        receiver.secrets["/peer"] = [peer_secret]
        metadata = (("authorization", f"Bearer {info['token']}"),)
        channel = grpc.aio.insecure_channel(f"127.0.0.1:{info['port']}")
        stub = notify_service_pb2_grpc.NotifyServiceStub(channel)
        await bench_notify.subscribe_receiver(stub, metadata, receiver, "bench.*", "/hook")
        counter = iter(range(10**9))

        async def wait_delivered(count: int, started: float) -> dict[str, Any]:
            with contextlib.suppress(TimeoutError):  # counted as lost
                await receiver.wait_for(lambda: len(receiver.accepted) >= count, timeout_s=300)
            elapsed = time.perf_counter() - started
            await asyncio.sleep(0.5)  # a late duplicate shows up here
            result = {
                "jobs_per_s": len(receiver.accepted) / elapsed,
                "lost": count - len(receiver.accepted),
                "duplicates": receiver.duplicates,
            }
            receiver.deliveries.clear()
            receiver.accepted.clear()
            return result

        async def aimesh_round(count: int = jobs) -> dict[str, Any]:
            prefix = f"r{next(counter)}"
            started = time.perf_counter()
            await bench_notify.publish_jobs(stub, metadata, prefix, count, 100, 4)
            return await wait_delivered(count, started)

        async def peer_round(count: int = jobs) -> dict[str, Any]:
            producer = await asyncio.create_subprocess_exec(
                str(python),
                app,
                "defer",
                peer_url,
                receiver.url("/peer"),
                str(count),
                f"r{next(counter)}",
                stdin=asyncio.subprocess.PIPE,
                stdout=asyncio.subprocess.PIPE,
                env=peer_env,
            )
            assert producer.stdin is not None and producer.stdout is not None
            if (await producer.stdout.readline()).strip() != b"ready":
                raise PeerUnavailable("procrastinate's producer did not start")
            started = time.perf_counter()
            producer.stdin.write(b"go\n")
            await producer.stdin.drain()
            result = await wait_delivered(count, started)
            await producer.wait()
            return result

        # Warm up both: connections, prepared statements, the receiver's pool.
        await aimesh_round(400)
        await peer_round(400)
        results = await alternate(
            {"aimesh": aimesh_round, "procrastinate": peer_round},
            args.rounds,
            "jobs_per_s",
            "jobs/s",
        )
        await channel.close()
    finally:
        await receiver.stop()
        if children:
            await bench_notify.finish(children[0])
        for child in children[1:]:
            await stop_child(child)
        pg.cleanup()
    summary: dict[str, Any] = {"bench": "peers.notify", "jobs": jobs, "rounds": args.rounds}
    for side, rounds in results.items():
        summary[f"{side}_jobs_per_s"] = round(statistics.median(r["jobs_per_s"] for r in rounds), 1)
        summary[f"{side}_lost"] = sum(r["lost"] for r in rounds)
        summary[f"{side}_duplicates"] = sum(r["duplicates"] for r in rounds)
    summary["notify_vs_procrastinate"] = round(
        summary["aimesh_jobs_per_s"] / summary["procrastinate_jobs_per_s"], 2
    )
    PLOT_DATA["notify"] = {side: [r["jobs_per_s"] for r in rs] for side, rs in results.items()}
    return summary


# --- chat vs LiteLLM -----------------------------------------------------------


async def wait_http(url: str, process: asyncio.subprocess.Process, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        with contextlib.suppress(OSError):
            urllib.request.urlopen(url, timeout=2).read()
            return
        if process.returncode is not None or time.monotonic() > deadline:
            raise PeerUnavailable(f"{url} did not answer")
        await asyncio.sleep(0.5)


def free_port() -> int:
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


async def job_chat(args: argparse.Namespace) -> dict[str, Any]:
    import anthropic
    import pgserver

    from aimesh.chat.v1 import chat_service_pb2 as pb
    from aimesh.chat.v1 import chat_service_pb2_grpc
    from tests.load import bench_chat

    python = peer_python("litellm")
    folder = Path(tempfile.mkdtemp(prefix="aimesh-bench-peers-chat-"))
    os.chmod(folder, 0o755)
    pg = pgserver.get_server(folder / "pg", cleanup_mode="stop")
    children: list[asyncio.subprocess.Process] = []
    try:
        admin = pg.get_uri("postgres")
        connection = await asyncpg.connect(admin)
        await connection.execute("CREATE DATABASE bench_chat")
        await connection.close()
        fake, fake_info = await bench_chat.spawn("--fake")
        children.append(fake)
        fake_url = f"http://127.0.0.1:{fake_info['port']}"
        chat, chat_info = await bench_chat.spawn(
            "--serve", admin.replace("/postgres?", "/bench_chat?"), fake_url
        )
        children.append(chat)
        master_key = "sk-" + secrets.token_hex(16)
        config = folder / "litellm.yaml"
        config.write_text(
            json.dumps(  # JSON is YAML
                {
                    "model_list": [
                        {
                            "model_name": bench_chat.MODEL,
                            "litellm_params": {
                                "model": f"anthropic/{bench_chat.MODEL}",
                                "api_base": fake_url,
                                "api_key": "sk-bench",
                            },
                        }
                    ],
                    "general_settings": {"master_key": master_key},
                    "litellm_settings": {"telemetry": False},
                }
            )
        )
        port = free_port()
        with (folder / "litellm.log").open("wb") as log:
            children.append(
                await asyncio.create_subprocess_exec(
                    str(python.parent / "litellm"),
                    "--config",
                    str(config),
                    "--host",
                    "127.0.0.1",
                    "--port",
                    str(port),
                    "--num_workers",
                    "1",
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    env={
                        **os.environ,
                        "LITELLM_LOG": "ERROR",
                        "LITELLM_LOCAL_MODEL_COST_MAP": "True",
                    },
                )
            )
        try:
            await wait_http(f"http://127.0.0.1:{port}/health/liveliness", children[-1], 240)
        except PeerUnavailable:
            tail = (folder / "litellm.log").read_text(errors="replace")[-2000:]
            raise PeerUnavailable(f"LiteLLM's proxy did not start: {tail}") from None
        direct = anthropic.AsyncAnthropic(api_key="sk-bench", base_url=fake_url, max_retries=0)
        proxied = anthropic.AsyncAnthropic(
            api_key=master_key, base_url=f"http://127.0.0.1:{port}", max_retries=0
        )
        metadata = (("authorization", f"Bearer {chat_info['token']}"),)
        async with grpc.aio.insecure_channel(f"127.0.0.1:{chat_info['port']}") as channel:
            stub = chat_service_pb2_grpc.ChatServiceStub(channel)
            conversations = []
            for _ in range(args.in_flight_chat):
                created = await stub.CreateConversation(
                    pb.CreateConversationRequest(conversation=pb.Conversation()), metadata=metadata
                )
                conversations.append(created.conversation.name)

            async def sdk_stream(client: anthropic.AsyncAnthropic) -> float:
                first = await bench_chat.direct_ttfc(client)
                if not first:
                    raise RuntimeError("a stream sent no text")
                return first

            async def aimesh_stream(conversation: str) -> float:
                first, clean = await bench_chat.service_stream(stub, metadata, conversation)
                if not clean:
                    raise RuntimeError("an aimesh stream did not finish cleanly")
                return first

            for _ in range(20):  # warm all three paths
                await sdk_stream(direct)
                await aimesh_stream(conversations[0])
                await sdk_stream(proxied)
            ttfc: dict[str, list[float]] = {"direct": [], "aimesh": [], "litellm": []}
            paths: dict[str, Callable[[int], Awaitable[float]]] = {
                "direct": lambda n: sdk_stream(direct),
                "aimesh": lambda n: aimesh_stream(conversations[n % 8]),
                "litellm": lambda n: sdk_stream(proxied),
            }
            order = list(paths)
            for number in range(args.pairs):
                rotated = order[number % 3 :] + order[: number % 3]
                for name in rotated:
                    ttfc[name].append(await paths[name](number) * 1000)
            added = {
                side: [t - d for t, d in zip(ttfc[side], ttfc["direct"], strict=True)]
                for side in ("aimesh", "litellm")
            }

            async def throughput(side: str) -> dict[str, Any]:
                streams = iter(range(10**9))

                async def one() -> None:
                    n = next(streams)
                    if side == "aimesh":
                        await aimesh_stream(conversations[n % len(conversations)])
                    else:
                        await sdk_stream(proxied)

                rate, latencies = await closed_loop(one, args.in_flight_chat, args.seconds)
                return {"streams_per_s": rate, "latencies": latencies}

            rates = await alternate(
                {"aimesh": lambda: throughput("aimesh"), "litellm": lambda: throughput("litellm")},
                args.rounds,
                "streams_per_s",
                "streams/s",
            )
        await direct.close()
        await proxied.close()
    finally:
        for child in children[2:]:  # LiteLLM
            await stop_child(child)
        for child in reversed(children[:2]):  # the chat server, then the fake
            await bench_chat.finish(child)
        pg.cleanup()
    summary: dict[str, Any] = {"bench": "peers.chat", "triples": args.pairs}
    summary["direct_ttfc_ms_p50"] = round(statistics.median(ttfc["direct"]), 3)
    for side in ("aimesh", "litellm"):
        summary[f"{side}_added_ttfc_ms_p50"] = round(statistics.median(added[side]), 3)
        summary[f"{side}_added_ttfc_ms_p99"] = round(percentile(added[side], 99), 3)
        summary[f"{side}_streams_per_s"] = round(
            statistics.median(r["streams_per_s"] for r in rates[side]), 1
        )
    summary["chat_overhead_vs_litellm"] = round(
        summary["aimesh_added_ttfc_ms_p50"] / summary["litellm_added_ttfc_ms_p50"], 3
    )
    PLOT_DATA["chat"] = {"ttfc": ttfc, "added": added}
    return summary


# --- search and recommend vs Ray Serve -----------------------------------------


async def start_ray(job: str, data_file: Path, log: Path) -> tuple[asyncio.subprocess.Process, int]:
    """tests/load/peers/ray_app.py in Ray's venv; (its process, its gRPC port)."""
    python = peer_python("ray")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "RAY_USAGE_STATS_ENABLED": "0"}
    # Ray starts its workers (the replicas) at nice 15, which on a machine shared
    # with the load client would hand the client their CPU; aimesh's services
    # run at the bench's own nice, and so do Ray's replicas here.
    env["RAY_worker_niceness"] = "0"
    with log.open("wb") as out:
        process = await asyncio.create_subprocess_exec(
            str(python),
            str(PEER_CODE / "ray_app.py"),
            job,
            str(data_file),
            str(free_port()),
            str(free_port()),
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            stderr=out,
            env=env,
        )
    assert process.stdout is not None
    try:
        async with asyncio.timeout(900):
            line = await process.stdout.readline()
        return process, int(json.loads(line)["port"])
    except (TimeoutError, ValueError, KeyError):
        await stop_child(process)
        tail = log.read_text(errors="replace")[-1500:]
        raise PeerUnavailable(f"Ray Serve did not start: {tail}") from None


async def finish_ray(process: asyncio.subprocess.Process) -> None:
    assert process.stdin is not None
    with contextlib.suppress(ConnectionError):
        process.stdin.write(b"stop\n")
        await process.stdin.drain()
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(60):
            await process.wait()
    await stop_child(process)


async def side_by_side(
    calls: dict[str, Callable[[], Awaitable[Any]]], args: argparse.Namespace, job: str
) -> dict[str, Any]:
    """Warm-up, then alternating rounds at args.in_flight (the figures), then
    with --plot one shorter round per side at each level of CONCURRENCY_LEVELS."""
    for call in calls.values():
        await closed_loop(call, args.in_flight, min(2.0, args.seconds))
    latencies: dict[str, list[float]] = {side: [] for side in calls}

    def round_of(side: str) -> Callable[[], Awaitable[dict[str, Any]]]:
        async def run() -> dict[str, Any]:
            qps, taken = await closed_loop(calls[side], args.in_flight, args.seconds)
            latencies[side].extend(taken)
            return {"qps": qps}

        return run

    results = await alternate({side: round_of(side) for side in calls}, args.rounds, "qps", "q/s")
    summary: dict[str, Any] = {"in_flight": args.in_flight, "rounds": args.rounds}
    for side in calls:
        summary[f"{side}_qps"] = round(statistics.median(r["qps"] for r in results[side]), 1)
        summary[f"{side}_p99_ms"] = round(percentile(latencies[side], 99) * 1000, 1)
    sweep: dict[str, dict[int, tuple[float, float]]] = {side: {} for side in calls}
    if args.plot:
        for level in CONCURRENCY_LEVELS:
            for side in calls:
                qps, taken = await closed_loop(calls[side], level, max(2.0, args.seconds / 2))
                sweep[side][level] = (qps, percentile(taken, 99) * 1000)
            shown = ", ".join(f"{side} {sweep[side][level][0]:.0f} q/s" for side in calls)
            print(f"  {level} in flight: {shown}", flush=True)
    PLOT_DATA[job] = {"sweep": sweep}
    return summary


CONCURRENCY_LEVELS = (1, 8, 32, 64, 128)


async def aimesh_stack(folder: Path, service: str, env_extra: dict[str, str]) -> Any:
    """The user service and one aimesh `service` on the embedded PostgreSQL,
    as scripts/bench search and recommend start them; yields (urls, port, token)."""
    from aimesh_cli import local
    from tests.load.servers import start_process, wait_serving

    @contextlib.asynccontextmanager
    async def stack() -> Any:
        os.environ["AIMESH_PORT_OFFSET"] = str(local.free_port_offset(7000))
        stored = local.load_secrets(folder)
        with local.database_server(folder) as admin_url:
            urls = await local.provision(admin_url, stored["role_passwords"])
            env = local.service_environment(urls, stored, os.environ)
            env.pop("AIMESH_NOTIFY_ADDRESS", None)
            env["AIMESH_RATE_LIMIT_RPS"] = "1000000"  # one principal drives all the load
            env["AIMESH_RATE_LIMIT_BURST"] = "1000000"
            env.update(env_extra)
            user_port, port = local.grpc_port("user"), local.grpc_port(service)
            processes = [start_process("aimesh_user", env, user_port, folder / "user.log")]
            try:
                await wait_serving(user_port, processes[0])
                token = await local.login(
                    f"127.0.0.1:{user_port}", stored["admin_email"], stored["admin_password"]
                )

                async def start() -> None:
                    processes.append(
                        start_process(f"aimesh_{service}", env, port, folder / f"{service}.log")
                    )
                    await wait_serving(port, processes[-1])

                yield urls, port, token, start
            finally:
                for process in processes:
                    process.terminate()
                    process.wait()

    return stack()


async def job_search(args: argparse.Namespace) -> dict[str, Any]:
    from aimesh.search.v1 import search_service_pb2 as pb
    from aimesh.search.v1 import search_service_pb2_grpc
    from tests.load import bench_search
    from tests.load.corpus import passages

    peer_python("ray")
    corpus = passages(2000 + 100_000, max_chars=80)
    documents = [text[:100] for text in corpus[:2000]]
    pool = list(reversed([" ".join(text.split()[:6]) for text in corpus[2000:]]))
    folder = Path(tempfile.mkdtemp(prefix="aimesh-bench-peers-search-"))
    data_file = folder / "documents.json"
    data_file.write_text(json.dumps({"documents": documents}))
    async with await aimesh_stack(folder, "search", {}) as (_, port, token, start):
        await start()
        await bench_search.seed(port, token, documents)
        ray, ray_port = await start_ray("search", data_file, folder / "ray.log")
        try:
            auth = (("authorization", f"Bearer {token}"),)
            to_ray = (("application", "search"),)
            async with (
                grpc.aio.insecure_channel(f"127.0.0.1:{port}") as ours,
                grpc.aio.insecure_channel(f"127.0.0.1:{ray_port}") as theirs,
            ):
                stubs = {
                    "aimesh": (search_service_pb2_grpc.SearchServiceStub(ours), auth),
                    "ray": (search_service_pb2_grpc.SearchServiceStub(theirs), to_ray),
                }

                def call(side: str) -> Callable[[], Awaitable[None]]:
                    stub, metadata = stubs[side]

                    async def one() -> None:
                        # every query distinct, drawn from one pool: the cache never answers
                        request = pb.SearchRequest(
                            parent="collections/bench", query=pool.pop(), top_k=10
                        )
                        reply = await stub.Search(request, metadata=metadata, timeout=30)
                        if len(reply.results) != 10:
                            raise RuntimeError(f"{side} answered {len(reply.results)} results")

                    return one

                summary = await side_by_side(
                    {"aimesh": call("aimesh"), "ray": call("ray")}, args, "search"
                )
        finally:
            await finish_ray(ray)
        return against_ray("search", summary, port, "aimesh_search_encoder_batch_size")


def against_ray(job: str, summary: dict[str, Any], port: int, batch_metric: str) -> dict[str, Any]:
    """`job`'s JSON line: the side-by-side figures, aimesh's mean batch (from the
    service's metrics) and aimesh's throughput divided by Ray's."""
    from tests.load.servers import histogram_buckets, mean_of_histogram

    metrics_port = port + 1000
    PLOT_DATA[job]["batches"] = histogram_buckets(metrics_port, batch_metric)
    return {
        "bench": f"peers.{job}",
        **summary,
        "aimesh_mean_batch": round(mean_of_histogram(metrics_port, batch_metric), 1),
        f"{job}_vs_ray": round(summary["aimesh_qps"] / summary["ray_qps"], 3),
    }


async def job_recommend(args: argparse.Namespace) -> dict[str, Any]:
    import pickle

    from aimesh.recommend.v1 import recommend_service_pb2 as pb
    from aimesh.recommend.v1 import recommend_service_pb2_grpc
    from tests.load import bench_recommend

    peer_python("ray")
    blob, user_ids, item_ids = bench_recommend.build_model(5_000, 100_000, 32)
    # The interactions bench_recommend.seed writes: the same seen items on both sides.
    rng = np.random.default_rng(0)
    users = np.repeat(np.arange(len(user_ids)), bench_recommend.SEEN_PER_USER)
    items = rng.integers(0, len(item_ids), len(users))
    seen = [(user_ids[u], item_ids[i]) for u, i in zip(users, items, strict=True)]
    folder = Path(tempfile.mkdtemp(prefix="aimesh-bench-peers-recommend-"))
    data_file = folder / "model.pickle"
    data_file.write_bytes(
        pickle.dumps({"blob": blob, "user_ids": user_ids, "item_ids": item_ids, "seen": seen})
    )
    extra = {"AIMESH_RECOMMEND_CACHE_TTL_S": "0", "AIMESH_RECOMMEND_DEVICE": "cpu"}
    async with await aimesh_stack(folder, "recommend", extra) as (urls, port, token, start):
        await bench_recommend.seed(urls["recommend"], blob, user_ids, item_ids)
        await start()
        ray, ray_port = await start_ray("recommend", data_file, folder / "ray.log")
        try:
            auth = (("authorization", f"Bearer {token}"),)
            to_ray = (("application", "recommend"),)
            async with (
                grpc.aio.insecure_channel(f"127.0.0.1:{port}") as ours,
                grpc.aio.insecure_channel(f"127.0.0.1:{ray_port}") as theirs,
            ):
                stubs = {
                    "aimesh": (recommend_service_pb2_grpc.RecommendServiceStub(ours), auth),
                    "ray": (recommend_service_pb2_grpc.RecommendServiceStub(theirs), to_ray),
                }
                position = iter(range(10**12))

                def call(side: str) -> Callable[[], Awaitable[None]]:
                    stub, metadata = stubs[side]

                    async def one() -> None:
                        user = user_ids[next(position) % len(user_ids)]
                        request = pb.RecommendRequest(user=user, k=10)
                        reply = await stub.Recommend(request, metadata=metadata, timeout=30)
                        if reply.fallback or len(reply.items) != 10:
                            raise RuntimeError(f"{side} answered no model ranking")

                    return one

                summary = await side_by_side(
                    {"aimesh": call("aimesh"), "ray": call("ray")}, args, "recommend"
                )
        finally:
            await finish_ray(ray)
        return against_ray("recommend", summary, port, "aimesh_recommend_batch_size")


# --- the run -------------------------------------------------------------------

PLOT_DATA: dict[str, Any] = {}
FIGURE_ORDER = (
    "search_vs_ray",
    "recommend_vs_ray",
    "chat_overhead_vs_litellm",
    "notify_vs_procrastinate",
)
# Run in this order: the jobs most likely to run here first.
JOBS: dict[str, tuple[str, Callable[[argparse.Namespace], Awaitable[dict[str, Any]]]]] = {
    "notify": ("notify_vs_procrastinate", job_notify),
    "chat": ("chat_overhead_vs_litellm", job_chat),
    "search": ("search_vs_ray", job_search),
    "recommend": ("recommend_vs_ray", job_recommend),
}


def machine() -> str:
    model = "unknown CPU"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    return f"{os.cpu_count()} vCPU {model}, load average {os.getloadavg()[0]:.1f} at the end"


def markdown_table(summaries: dict[str, dict[str, Any]]) -> str:
    """The README's "How it compares" table, from this run's summaries."""
    rows = [
        f"`scripts/bench peers`, {time.strftime('%Y-%m-%d', time.gmtime())}, {machine()}:",
        "",
        "| job | peer | the peer | aimesh | aimesh ÷ peer |",
        "|---|---|---|---|---|",
    ]
    for name in ("search", "recommend"):
        if name in summaries:
            got = summaries[name]
            rows.append(
                f"| {name}, {got['in_flight']} in flight | Ray Serve 2.60 |"
                f" {got['ray_qps']:.0f} q/s, p99 {got['ray_p99_ms']:.0f} ms |"
                f" {got['aimesh_qps']:.0f} q/s, p99 {got['aimesh_p99_ms']:.0f} ms |"
                f" {got[f'{name}_vs_ray']:.2f}× throughput |"
            )
    if "chat" in summaries:
        got = summaries["chat"]
        rows.append(
            f"| chat relay, added time to first chunk (p50) | LiteLLM proxy 1.108 |"
            f" +{got['litellm_added_ttfc_ms_p50']:.1f} ms; {got['litellm_streams_per_s']:.0f}"
            f" streams/s | +{got['aimesh_added_ttfc_ms_p50']:.1f} ms;"
            f" {got['aimesh_streams_per_s']:.0f} streams/s |"
            f" {got['chat_overhead_vs_litellm']:.2f}× the added time |"
        )
    if "notify" in summaries:
        got = summaries["notify"]
        rows.append(
            f"| signed webhook deliveries, at least once | procrastinate 3.10 |"
            f" {got['procrastinate_jobs_per_s']:.0f}/s, {got['procrastinate_lost']} lost |"
            f" {got['aimesh_jobs_per_s']:.0f}/s, {got['aimesh_lost']} lost |"
            f" {got['notify_vs_procrastinate']:.1f}× throughput |"
        )
    return "\n".join(rows)


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs-only", default=",".join(JOBS), help="comma-separated jobs to run")
    parser.add_argument("--rounds", type=int, default=int(os.environ.get("BENCH_ROUNDS", "3")))
    parser.add_argument(
        "--seconds",
        type=float,
        default=float(os.environ.get("BENCH_SECONDS", "5")),
        help="seconds of load per round (search, recommend, chat throughput)",
    )
    parser.add_argument(
        "--jobs",
        type=int,
        default=int(os.environ.get("BENCH_NOTIFY_JOBS", "10000")),
        help="webhook jobs per notify round",
    )
    parser.add_argument(
        "--pairs",
        type=int,
        default=int(os.environ.get("BENCH_CHAT_TRIPLES", "150")),
        help="TTFC triples (direct, aimesh, LiteLLM)",
    )
    parser.add_argument("--in-flight-chat", type=int, default=32)
    parser.add_argument("--in-flight", type=int, default=64, help="search and recommend")
    parser.add_argument("--plot", action="store_true", help=f"write PNGs into {PLOTS_DIR}")
    args = parser.parse_args()
    wanted = [name for name in args.jobs_only.split(",") if name]
    figures: dict[str, Any] = {"bench": "peers"}
    figures.update(dict.fromkeys(FIGURE_ORDER))
    summaries: dict[str, dict[str, Any]] = {}
    for name in JOBS:
        key, job = JOBS[name]
        if name not in wanted:
            continue
        print(f"{name}:", flush=True)
        try:
            summary = await job(args)
        except PeerUnavailable as why:
            print(f"  {name}: the peer cannot run here ({str(why).splitlines()[0]})", flush=True)
            continue
        except Exception:
            traceback.print_exc()
            print(f"  {name}: failed; see the trace above", flush=True)
            continue
        print(json.dumps(summary), flush=True)
        figures[key] = summary[key]
        summaries[name] = summary
    table = markdown_table(summaries)
    print(table)
    if args.plot:
        from tests.load import plotting

        PLOTS_DIR.mkdir(parents=True, exist_ok=True)
        (PLOTS_DIR / "peers-table.md").write_text(table + "\n")

        for path in plotting.write_peers(PLOT_DATA, PLOTS_DIR):
            print(f"  wrote {path.relative_to(ROOT)}")
    print(json.dumps(figures))


if __name__ == "__main__":
    asyncio.run(main())
