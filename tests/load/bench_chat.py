"""scripts/bench chat: what the chat service adds to a streamed answer.

ttfc_overhead_ms_p50/p99  Time to first text chunk through the chat service
                          (gRPC StreamChat, full pipeline: JWT, scopes, rate
                          limit, validation, conversation and budget checks,
                          the turn stored, the anthropic SDK to the model)
                          minus time to first chunk of a direct anthropic SDK
                          stream from the same fake Messages API, measured in
                          alternating pairs in the same run.
streams_per_s             Whole answers (20 chunks each) completed per second
                          with 32 streams in flight, with zero errors allowed.

The fake Messages API and the chat server each run in their own process, as
they would in production; PostgreSQL is the embedded one. No search call is
made (no collection): this measures the service's own overhead.
The last line printed is one JSON object with those keys.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
_runtime = Path(tempfile.gettempdir()) / f"aimesh-runtime-{os.getuid()}"
_runtime.mkdir(mode=0o700, exist_ok=True)
os.environ.setdefault("XDG_RUNTIME_DIR", str(_runtime))

import anthropic  # noqa: E402
import asyncpg  # noqa: E402
import grpc  # noqa: E402

from aimesh.chat.v1 import chat_service_pb2 as pb  # noqa: E402
from aimesh.chat.v1 import chat_service_pb2_grpc  # noqa: E402
from tests.fakes.anthropic_server import FakeAnthropic, Scenario  # noqa: E402
from tests.tokens import claims, jwks, signed  # noqa: E402

MODEL = "claude-sonnet-4-6"
PAIRS = 200
CONCURRENCY = 32
THROUGHPUT_S = 5.0
CHUNKS = [f"w{i} " for i in range(20)]
TTFC: dict[str, list[float]] = {"direct": [], "aimesh": []}  # ms, for --plot


async def serve_fake() -> None:
    fake = await FakeAnthropic().start()
    fake.reset(Scenario(chunks=CHUNKS))
    print(json.dumps({"port": fake.port}), flush=True)
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)
    await fake.stop()


async def serve_chat(database_url: str, fake_url: str) -> None:
    from aimesh_chat.server import SPEC
    from aimesh_runtime.config import RuntimeConfig, load
    from aimesh_runtime.server import AimeshServer, Mount, ServiceContext

    async def mount(context: ServiceContext) -> Mount:
        mounted = await SPEC.mount(context)
        mounted.jwks = jwks  # trust the bench's signing key, no user service needed
        return mounted

    environ = {
        "AIMESH_CHAT_DATABASE_URL": database_url,
        "ANTHROPIC_API_KEY": "sk-bench",
        "AIMESH_CHAT_ANTHROPIC_BASE_URL": fake_url,
        "AIMESH_CHAT_MODEL": MODEL,
        "AIMESH_CHAT_DAILY_TOKEN_BUDGET": str(10**12),
        "AIMESH_RATE_LIMIT_RPS": "100000",
        "AIMESH_RATE_LIMIT_BURST": "100000",
        "AIMESH_LOG_LEVEL": "WARNING",
    }
    config = load(RuntimeConfig, environ, grpc_port=0, http_port=0)
    server = AimeshServer([dataclasses.replace(SPEC, mount=mount)], config, environ)
    await server.start()
    # tests.tokens draws its key per process: the token is made where it is trusted.
    token = signed(claims(scope="chat.use", sub="bench"))
    print(json.dumps({"port": server.grpc_port, "token": token}), flush=True)
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)
    await server.stop(1.0)


async def spawn(*args: str) -> tuple[asyncio.subprocess.Process, dict[str, Any]]:
    process = await asyncio.create_subprocess_exec(
        sys.executable, __file__, *args,
        stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
    )  # fmt: skip
    assert process.stdout is not None
    return process, json.loads(await process.stdout.readline())


async def finish(process: asyncio.subprocess.Process) -> None:
    assert process.stdin is not None
    process.stdin.write(b"stop\n")
    await process.stdin.drain()
    await process.wait()


async def direct_ttfc(client: anthropic.AsyncAnthropic) -> float:
    started = time.perf_counter()
    stream = await client.messages.create(
        model=MODEL,
        max_tokens=1024,
        system="bench",
        messages=[{"role": "user", "content": "hello"}],
        stream=True,
    )
    first = 0.0
    async with stream:
        async for event in stream:
            if event.type == "content_block_delta" and not first:
                first = time.perf_counter() - started
    return first


async def service_stream(stub: Any, metadata: Any, conversation: str) -> tuple[float, bool]:
    """Time to first text delta, and whether the answer finished cleanly."""
    started = time.perf_counter()
    first = 0.0
    clean = False
    request = pb.StreamChatRequest(conversation=conversation, message="hello")
    async for event in stub.StreamChat(request, metadata=metadata):
        kind = event.WhichOneof("event")
        if kind == "text_delta" and not first:
            first = time.perf_counter() - started
        elif kind == "finish":
            clean = event.finish.stop_reason == pb.STOP_REASON_END_TURN and not event.finish.partial
    return first, clean


async def main(plot: bool) -> None:
    import pgserver

    folder = Path(tempfile.mkdtemp(prefix="aimesh-bench-chat-"))
    pg = pgserver.get_server(folder, cleanup_mode="stop")
    try:
        admin = pg.get_uri("postgres")
        connection = await asyncpg.connect(admin)
        await connection.execute("CREATE DATABASE bench_chat")
        await connection.close()
        fake, fake_info = await spawn("--fake")
        fake_url = f"http://127.0.0.1:{fake_info['port']}"
        chat, chat_info = await spawn(
            "--serve", admin.replace("/postgres?", "/bench_chat?"), fake_url
        )
        try:
            result = await measure(fake_url, f"127.0.0.1:{chat_info['port']}", chat_info["token"])
        finally:
            await finish(chat)
            await finish(fake)
    finally:
        pg.cleanup()
    if plot:
        from tests.load import plotting

        path = plotting.ttfc_figure(TTFC, plotting.PLOTS_DIR / "chat-ttfc.png")
        print(f"  wrote {path.relative_to(Path(__file__).resolve().parents[2])}")
    print(json.dumps(result))


async def measure(fake_url: str, chat_address: str, token: str) -> dict[str, Any]:
    metadata = (("authorization", f"Bearer {token}"),)
    client = anthropic.AsyncAnthropic(api_key="sk-bench", base_url=fake_url, max_retries=0)
    async with grpc.aio.insecure_channel(chat_address) as channel:
        stub = chat_service_pb2_grpc.ChatServiceStub(channel)
        conversations = []
        for _ in range(CONCURRENCY):
            created = await stub.CreateConversation(
                pb.CreateConversationRequest(conversation=pb.Conversation()), metadata=metadata
            )
            conversations.append(created.conversation.name)
        for _ in range(20):  # warm both paths: connections, caches, prepared statements
            await direct_ttfc(client)
            await service_stream(stub, metadata, conversations[0])
        overheads = []
        for number in range(PAIRS):
            # Alternate which goes first so drift in the machine's speed cancels out.
            if number % 2:
                direct = await direct_ttfc(client)
                served, clean = await service_stream(stub, metadata, conversations[number % 8])
            else:
                served, clean = await service_stream(stub, metadata, conversations[number % 8])
                direct = await direct_ttfc(client)
            if not clean:
                raise RuntimeError("a stream did not finish cleanly")
            overheads.append((served - direct) * 1000)
            TTFC["direct"].append(direct * 1000)
            TTFC["aimesh"].append(served * 1000)
        overheads.sort()
        print(
            f"  ttfc overhead over {PAIRS} pairs: p50 {statistics.median(overheads):.2f} ms, "
            f"p99 {overheads[int(0.99 * (len(overheads) - 1))]:.2f} ms",
            flush=True,
        )
        completed = 0
        errors = 0
        stop_at = time.perf_counter() + THROUGHPUT_S

        async def worker(conversation: str) -> None:
            nonlocal completed, errors
            while time.perf_counter() < stop_at:
                try:
                    _, clean = await service_stream(stub, metadata, conversation)
                except grpc.aio.AioRpcError:
                    clean = False
                completed += clean
                errors += not clean

        started = time.perf_counter()
        await asyncio.gather(*(worker(c) for c in conversations))
        elapsed = time.perf_counter() - started
    await client.close()
    if errors:
        raise RuntimeError(f"{errors} streams failed at {CONCURRENCY} in flight")
    print(f"  {completed} streams in {elapsed:.1f} s at {CONCURRENCY} in flight", flush=True)
    return {
        "bench": "chat",
        "ttfc_overhead_ms_p50": round(statistics.median(overheads), 3),
        "ttfc_overhead_ms_p99": round(overheads[int(0.99 * (len(overheads) - 1))], 3),
        "streams_per_s": round(completed / elapsed, 1),
    }


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--fake", action="store_true")
    parser.add_argument("--serve", nargs=2, metavar=("DATABASE_URL", "FAKE_URL"))
    parser.add_argument("--plot", action="store_true", help="write PNGs into tests/load/plots")
    args = parser.parse_args()
    if args.fake:
        asyncio.run(serve_fake())
    elif args.serve:
        asyncio.run(serve_chat(*args.serve))
    else:
        asyncio.run(main(args.plot))
