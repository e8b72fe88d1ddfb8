"""scripts/bench notify_isolation: does a receiver that hangs hold up the others?

Processes as in bench_notify (the service without a worker, one `python -m
aimesh_notify.worker --concurrency 64`, the embedded PostgreSQL, this process).
One subscription's receiver accepts connections and never answers (webhook
timeout 2 s); BENCH_HANGING (500) events are published to it, then, half a
second later, 20 to a subscription whose receiver answers at once. Measured:
seconds from publishing those 20 until the healthy receiver accepted all of
them. Each round runs twice on a fresh database, once with the worker pausing
subscriptions whose receivers stop answering (the default,
AIMESH_NOTIFY_PAUSE_AFTER_FAILURES=5) and once without (0), alternating.

The last line is one JSON object: healthy_s_paused and healthy_s_unpaused
(medians over BENCH_ROUNDS rounds, default 2) and isolation, their ratio
(unpaused / paused: how many times sooner the healthy receiver is served).
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
os.environ.setdefault("BENCH_WORKER_CONCURRENCY", "64")

import asyncpg
import grpc
from google.protobuf import duration_pb2

from aimesh.notify.v1 import notify_service_pb2 as pb
from aimesh.notify.v1 import notify_service_pb2_grpc
from tests.fakes.webhook_receiver import WebhookReceiver
from tests.load import bench_notify

HANGING = int(os.environ.get("BENCH_HANGING", "500"))
HEALTHY = 20
ROUNDS = int(os.environ.get("BENCH_ROUNDS", "2"))
PAUSE_SETTING = "AIMESH_NOTIFY_PAUSE_AFTER_FAILURES"


class SilentReceiver:
    """Accepts connections and never answers."""

    def __init__(self) -> None:
        self._held: list[asyncio.StreamWriter] = []
        self._server: asyncio.Server | None = None
        self.port = 0

    async def start(self) -> SilentReceiver:
        self._server = await asyncio.start_server(self._hold, "127.0.0.1", 0, backlog=1024)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def _hold(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._held.append(writer)
        await reader.read()

    def stop(self) -> None:
        for writer in self._held:
            writer.close()
        if self._server is not None:
            self._server.close()


def batch(topic: str, prefix: str, count: int) -> pb.PublishBatchRequest:
    return pb.PublishBatchRequest(
        requests=[
            pb.PublishRequest(topic=topic, idempotency_key=f"{prefix}{n}", payload=b"{}")
            for n in range(count)
        ]
    )


async def one_round(admin_url: str, name: str, pause_after: str) -> float:
    """Seconds until the healthy receiver has all its deliveries."""
    connection = await asyncpg.connect(admin_url)
    await connection.execute(f"CREATE DATABASE {name}")
    await connection.close()
    database_url = admin_url.replace("/postgres?", f"/{name}?")
    os.environ[PAUSE_SETTING] = pause_after  # the worker inherits it
    server, info = await bench_notify.spawn("--serve", database_url)
    worker = await bench_notify.start_worker(database_url)
    silent = await SilentReceiver().start()
    receiver = await WebhookReceiver(keep=False).start()
    metadata = (("authorization", f"Bearer {info['token']}"),)
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{info['port']}") as channel:
            stub = notify_service_pb2_grpc.NotifyServiceStub(channel)
            await stub.CreateSubscription(
                pb.CreateSubscriptionRequest(
                    subscription=pb.Subscription(
                        topics=["stuck.*"],
                        webhook=pb.WebhookChannel(
                            url=f"http://127.0.0.1:{silent.port}/hook",
                            timeout=duration_pb2.Duration(seconds=2),
                        ),
                    )
                ),
                metadata=metadata,
            )
            await bench_notify.subscribe_receiver(stub, metadata, receiver, "healthy.*", "/ok")
            await asyncio.sleep(1.0)  # the worker is listening
            await stub.PublishBatch(batch("stuck.event", "s", HANGING), metadata=metadata)
            await asyncio.sleep(0.5)
            started = time.perf_counter()
            await stub.PublishBatch(batch("healthy.event", "h", HEALTHY), metadata=metadata)
            await receiver.wait_for(lambda: len(receiver.accepted) >= HEALTHY, timeout_s=300)
            return time.perf_counter() - started
    finally:
        await receiver.stop()
        silent.stop()
        await bench_notify.finish(server)
        worker.terminate()
        await worker.wait()


async def main() -> None:
    import pgserver

    folder = Path(tempfile.mkdtemp(prefix="aimesh-bench-isolation-"))
    os.chmod(folder, 0o755)  # pgserver runs PostgreSQL as its own user when root
    pg = pgserver.get_server(folder, cleanup_mode="stop")
    os.environ["AIMESH_NOTIFY_SECRET_ENCRYPTION_KEY"] = base64.urlsafe_b64encode(
        os.urandom(32)
    ).decode()
    paused: list[float] = []
    unpaused: list[float] = []
    try:
        admin = pg.get_uri("postgres")
        for n in range(ROUNDS):
            for label, setting, into in (("paused", "5", paused), ("unpaused", "0", unpaused)):
                seconds = await one_round(admin, f"isolation_{n}_{label}", setting)
                into.append(seconds)
                print(
                    f"  round {n + 1}, {label}: {HEALTHY} healthy deliveries behind {HANGING} "
                    f"to a receiver that never answers: {seconds:.2f} s",
                    flush=True,
                )
    finally:
        pg.cleanup()
    paused_s, unpaused_s = statistics.median(paused), statistics.median(unpaused)
    print(
        json.dumps(
            {
                "bench": "notify_isolation",
                "healthy_s_paused": round(paused_s, 3),
                "healthy_s_unpaused": round(unpaused_s, 3),
                "isolation": round(unpaused_s / paused_s, 2),
            }
        )
    )


if __name__ == "__main__":
    asyncio.run(main())
