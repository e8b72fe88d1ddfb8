"""The webhook job on procrastinate 3.10, as a team would write it instead of notify.

Run with .aimesh/peers/procrastinate/bin/python (procrastinate, psycopg and
httpx only; nothing of aimesh is importable there):
  migrate URL                     apply procrastinate's schema
  worker URL CONCURRENCY          one worker process, CONCURRENCY jobs at a time
  defer URL RECEIVER COUNT PREFIX defer COUNT jobs, 100 a call, 4 calls in flight;
                                  prints "ready", waits for a line on stdin, then
                                  prints the seconds it took as JSON

The task signs each request as notify does (HMAC-SHA256 "v1=" over
"{timestamp}.{body}" and "v2=" over timestamp, delivery id, event id and topic,
a line each, then the body) with the secret in BENCH_PEER_SECRET, and fails on
any answer but 2xx so that procrastinate retries it: at least once, as notify.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import os
import sys
import time

import httpx
import procrastinate

BATCH = 100
IN_FLIGHT = 4


def make_app(url: str) -> procrastinate.App:
    # psycopg_pool's default of 4 connections starves a worker that runs many
    # jobs at once: size the pool as its users are told to.
    size = int(os.environ.get("BENCH_PEER_POOL_SIZE", "16"))
    return procrastinate.App(
        connector=procrastinate.PsycopgConnector(conninfo=url, min_size=size, max_size=size)
    )


def headers_for(
    secret: bytes, delivery: str, event: str, topic: str, body: bytes
) -> dict[str, str]:
    timestamp = str(int(time.time()))
    v1 = hmac.new(secret, timestamp.encode() + b"." + body, hashlib.sha256).hexdigest()
    signed = "\n".join([timestamp, delivery, event, topic]).encode() + b"\n" + body
    v2 = hmac.new(secret, signed, hashlib.sha256).hexdigest()
    return {
        "content-type": "application/json",
        "aimesh-delivery": delivery,
        "aimesh-event-id": event,
        "aimesh-topic": topic,
        "aimesh-timestamp": timestamp,
        "aimesh-signature": f"v1={v1},v2={v2}",
    }


def register(app: procrastinate.App) -> procrastinate.tasks.Task:
    secret = os.environ.get("BENCH_PEER_SECRET", "").encode()
    client: list[httpx.AsyncClient] = []

    @app.task(name="deliver", retry=procrastinate.RetryStrategy(max_attempts=10, wait=1))
    async def deliver(url: str, delivery: str, event: str, topic: str, payload: str) -> None:
        if not client:  # one keep-alive pool per worker process
            client.append(httpx.AsyncClient(timeout=5, limits=httpx.Limits(max_connections=256)))
        body = payload.encode()
        answer = await client[0].post(
            url, content=body, headers=headers_for(secret, delivery, event, topic, body)
        )
        answer.raise_for_status()

    return deliver


async def migrate(url: str) -> None:
    app = make_app(url)
    async with app.open_async():
        await app.schema_manager.apply_schema_async()


async def worker(url: str, concurrency: int) -> None:
    app = make_app(url)
    register(app)
    async with app.open_async():
        await app.run_worker_async(concurrency=concurrency, install_signal_handlers=True)


async def defer(url: str, receiver: str, count: int, prefix: str) -> None:
    app = make_app(url)
    deliver = register(app)
    async with app.open_async():
        print("ready", flush=True)
        await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)
        starts = iter(range(0, count, BATCH))

        async def producer() -> None:
            for start in starts:
                await deliver.batch_defer_async(
                    *(
                        {
                            "url": receiver,
                            "delivery": f"{prefix}:{n}",
                            "event": f"{prefix}:{n}",
                            "topic": "bench.job.done",
                            "payload": json.dumps({"job": n}),
                        }
                        for n in range(start, min(start + BATCH, count))
                    )
                )

        started = time.perf_counter()
        await asyncio.gather(*(producer() for _ in range(IN_FLIGHT)))
        print(json.dumps({"deferred_s": time.perf_counter() - started}), flush=True)


if __name__ == "__main__":
    command, database_url, *rest = sys.argv[1:]
    if command == "migrate":
        asyncio.run(migrate(database_url))
    elif command == "worker":
        asyncio.run(worker(database_url, int(rest[0])))
    elif command == "defer":
        asyncio.run(defer(database_url, rest[0], int(rest[1]), rest[2]))
    else:
        raise SystemExit(f"unknown command {command}")
