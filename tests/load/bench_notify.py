"""scripts/bench notify: end-to-end webhook deliveries per second.

Processes: the service (gRPC, full runtime pipeline: auth, validation,
metrics) with no worker of its own; one delivery worker, `python -m
aimesh_notify.worker --concurrency 256`, the supported way to run delivery
apart from the API; this process, which publishes and runs the webhook
receiver (a real HTTP/1.1 server on 127.0.0.1 that verifies every HMAC
signature and dedupes on the delivery id); the embedded PostgreSQL.

jobs_per_s    10,000 events published through the service with PublishBatch,
              100 events a call and 4 calls in flight, as a producer with
              many events (an outbox relay) would, each matched to one webhook
              subscription and delivered, signed, to the receiver; divided by
              the seconds from the first publish to the last delivery the
              receiver accepted. Before the measured run, a warm-up publishes
              2,000 events with Publish, one event a call, 64 in flight, and
              prints that rate (not part of the figures).
ratio_vs_raw  jobs_per_s / the rate of a raw asyncpg queue on the same
              database in the same run, enqueued the way the measured run
              publishes: 10,000 jobs inserted 100 per statement (one
              autocommitted INSERT ... SELECT unnest($1::bytea[])), 4
              statements in flight, while one consumer claims up to 100 due
              jobs at a time with FOR UPDATE SKIP LOCKED (leasing them 30 s)
              and acknowledges each claimed batch with one UPDATE; no gRPC,
              no HTTP, no signing. The same loop with one job per INSERT and
              64 in flight (the baseline of earlier runs) is printed too, with
              the ratio against it, for comparison only.
ratio_vs_store jobs_per_s / the store ceiling below: how close the whole
              service (gRPC, worker, signed HTTP) comes to its own SQL.
store ceiling (printed) notify's own queue SQL alone, on a fresh
              database of the same PostgreSQL, in the same run:
              EventStore.publish_batch (events and their deliveries, 100 per
              transaction, 4 in flight), the stream sequencer, and one
              consumer that claims 100 and completes them (the attempt rows
              included), as the worker does; no gRPC, no HTTP, no signing.
              Its ratio to the raw loop bounds what ratio_vs_raw can reach on
              this machine with this schema.
CPU per job   (printed, Linux only) CPU time each process spent per job in
              each round: PostgreSQL's (the postmaster and its backends,
              sampled from /proc every 50 ms so that backends that exit are
              counted too), the service's, the worker's, and this process's
              (publisher and receiver, or the raw and store loops).
lost          Deliveries the receiver never accepted.
duplicates    Deliveries the receiver accepted more than once.

The last line printed is one JSON object with those keys. BENCH_NOTIFY_JOBS,
BENCH_WORKERS and BENCH_WORKER_CONCURRENCY change the run, for experiments.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import dataclasses
import json
import os
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
_runtime = Path(tempfile.gettempdir()) / f"aimesh-runtime-{os.getuid()}"
_runtime.mkdir(mode=0o700, exist_ok=True)
os.environ.setdefault("XDG_RUNTIME_DIR", str(_runtime))

import asyncpg  # noqa: E402
import grpc  # noqa: E402

from aimesh.notify.v1 import notify_service_pb2 as pb  # noqa: E402
from aimesh.notify.v1 import notify_service_pb2_grpc  # noqa: E402
from tests.fakes.webhook_receiver import WebhookReceiver  # noqa: E402
from tests.tokens import claims, jwks, signed  # noqa: E402

JOBS = int(os.environ.get("BENCH_NOTIFY_JOBS", "10000"))
IN_FLIGHT = 64
CLAIM_BATCH = 100
PUBLISH_BATCH = 100
BATCHES_IN_FLIGHT = int(os.environ.get("BENCH_BATCHES_IN_FLIGHT", "4"))
WARM_UP = 2_000
WORKERS = int(os.environ.get("BENCH_WORKERS", "1"))
WORKER_CONCURRENCY = int(os.environ.get("BENCH_WORKER_CONCURRENCY", "256"))


class CpuMeter:
    """CPU seconds of PostgreSQL (a postmaster and its children) and of named
    processes, read from /proc by a sampling thread; a no-op without /proc."""

    def __init__(self, postmaster: int | None) -> None:
        self._postmaster = postmaster
        self._named: dict[str, int] = {"this process": os.getpid()}
        self._postgres: dict[int, float] = {}  # last reading of every backend seen
        self._tick = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
        self.available = postmaster is not None and Path("/proc/self/stat").exists()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample_forever, daemon=True)
        if self.available:
            self._thread.start()

    def name(self, name: str, pid: int) -> None:
        self._named[name] = pid

    def _stat(self, pid: str | int) -> tuple[int, float] | None:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            return None
        return int(fields[1]), (int(fields[11]) + int(fields[12])) / self._tick

    def _sample(self) -> None:
        postmaster = self._postmaster
        try:  # the postmaster is one thread: its children are all the backends
            children = Path(f"/proc/{postmaster}/task/{postmaster}/children").read_text()
        except OSError:
            return
        for pid in (postmaster, *map(int, children.split())):
            stat = self._stat(pid)
            if stat is not None:
                self._postgres[pid] = stat[1]

    def _sample_forever(self) -> None:
        while not self._stop.wait(0.05):
            self._sample()

    def reading(self) -> dict[str, float]:
        if not self.available:
            return {}
        self._sample()
        seconds = {"PostgreSQL": sum(self._postgres.values())}
        for name, pid in self._named.items():
            stat = self._stat(pid)
            if stat is not None:
                seconds[name] = stat[1]
        return seconds

    def report(self, what: str, before: dict[str, float], jobs: int) -> None:
        after = self.reading()
        parts = [
            f"{name} {(after[name] - before[name]) / jobs * 1e6:.0f} µs"
            for name in after
            if name in before
        ]
        if parts:
            print(f"  CPU per job, {what}: " + ", ".join(parts), flush=True)

    def close(self) -> None:
        self._stop.set()


async def serve(database_url: str) -> None:
    from aimesh_notify.server import SPEC
    from aimesh_runtime.config import RuntimeConfig, load
    from aimesh_runtime.server import AimeshServer, Mount, ServiceContext

    async def mount(context: ServiceContext) -> Mount:
        mounted = await SPEC.mount(context)
        mounted.jwks = jwks  # trust the bench's signing key, no user service needed
        return mounted

    environ = {
        "AIMESH_NOTIFY_DATABASE_URL": database_url,
        # main() sets it, for the worker processes too
        "AIMESH_NOTIFY_SECRET_ENCRYPTION_KEY": os.environ["AIMESH_NOTIFY_SECRET_ENCRYPTION_KEY"],
        "AIMESH_NOTIFY_ALLOW_PRIVATE_WEBHOOKS": "1",  # the receiver is on 127.0.0.1
        "AIMESH_NOTIFY_WORKER_CONCURRENCY": "0",  # delivery is the worker process's
        "AIMESH_NOTIFY_CLAIM_BATCH": str(CLAIM_BATCH),
        "AIMESH_RATE_LIMIT_RPS": "1000000",
        "AIMESH_RATE_LIMIT_BURST": "1000000",
        "AIMESH_LOG_LEVEL": "WARNING",
    }
    config = load(RuntimeConfig, environ, grpc_port=0, http_port=0)
    server = AimeshServer([dataclasses.replace(SPEC, mount=mount)], config, environ)
    await server.start()
    # The bench publishes as an outbox relay does: a service account (its topics are
    # no member's namespace).
    token = signed(claims(scope="notify.read notify.write mesh.service", sub="bench"))
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


async def start_worker(database_url: str) -> asyncio.subprocess.Process:
    """`python -m aimesh_notify.worker`, the delivery worker in its own process."""
    environ = {
        **os.environ,
        "AIMESH_NOTIFY_DATABASE_URL": database_url,
        "AIMESH_NOTIFY_ALLOW_PRIVATE_WEBHOOKS": "1",  # the receiver is on 127.0.0.1
        "AIMESH_NOTIFY_CLAIM_BATCH": str(CLAIM_BATCH),
        "AIMESH_LOG_LEVEL": "WARNING",
    }
    return await asyncio.create_subprocess_exec(
        sys.executable, "-m", "aimesh_notify.worker", "--concurrency", str(WORKER_CONCURRENCY),
        env=environ,
    )  # fmt: skip


async def finish(process: asyncio.subprocess.Process) -> None:
    assert process.stdin is not None
    process.stdin.write(b"stop\n")
    await process.stdin.drain()
    await process.wait()


async def publish_jobs(
    stub: Any, metadata: Any, prefix: str, count: int, batch: int, in_flight: int
) -> None:
    """Publish jobs 0..count-1 (keys `prefix:n`) with PublishBatch, `batch` events
    a call and `in_flight` calls at a time."""
    starts = iter(range(0, count, batch))

    async def publisher() -> None:
        for start in starts:
            await stub.PublishBatch(
                pb.PublishBatchRequest(
                    requests=[
                        pb.PublishRequest(
                            topic="bench.job.done",
                            idempotency_key=f"{prefix}:{n}",
                            payload=b'{"job": %d}' % n,
                        )
                        for n in range(start, min(start + batch, count))
                    ]
                ),
                metadata=metadata,
            )

    await asyncio.gather(*(publisher() for _ in range(in_flight)))


async def subscribe_receiver(
    stub: notify_service_pb2_grpc.NotifyServiceStub,
    metadata: Any,
    receiver: WebhookReceiver,
    topic_filter: str,
    path: str,
) -> None:
    """A webhook subscription to `receiver` at `path`, whose secret it then checks."""
    created = await stub.CreateSubscription(
        pb.CreateSubscriptionRequest(
            subscription=pb.Subscription(
                topics=[topic_filter], webhook=pb.WebhookChannel(url=receiver.url(path))
            )
        ),
        metadata=metadata,
    )
    receiver.secrets[path] = [created.secret]


async def end_to_end(
    address: str, token: str, receiver: WebhookReceiver, meter: CpuMeter
) -> dict[str, Any]:
    metadata = (("authorization", f"Bearer {token}"),)
    async with grpc.aio.insecure_channel(address) as channel:
        stub = notify_service_pb2_grpc.NotifyServiceStub(channel)
        await subscribe_receiver(stub, metadata, receiver, "bench.*", "/hook")

        async def publish_one_by_one(prefix: str, count: int) -> float:
            """Seconds to publish `count` events with Publish, IN_FLIGHT at a time."""
            numbers = iter(range(count))

            async def publisher() -> None:
                for n in numbers:
                    await stub.Publish(
                        pb.PublishRequest(
                            topic="bench.job.done",
                            idempotency_key=f"{prefix}:{n}",
                            payload=b'{"job": %d}' % n,
                        ),
                        metadata=metadata,
                    )

            started = time.perf_counter()
            await asyncio.gather(*(publisher() for _ in range(IN_FLIGHT)))
            return time.perf_counter() - started

        async def publish_batches(prefix: str, count: int) -> float:
            """Seconds to publish `count` events with PublishBatch, PUBLISH_BATCH
            events a call and BATCHES_IN_FLIGHT calls at a time."""
            started = time.perf_counter()
            await publish_jobs(stub, metadata, prefix, count, PUBLISH_BATCH, BATCHES_IN_FLIGHT)
            return time.perf_counter() - started

        # Warm up connections, prepared statements and the receiver's pool, and
        # time Publish one event a call on the way (not part of the figures).
        unary_s = await publish_one_by_one("warm", WARM_UP)
        await receiver.wait_for(lambda: len(receiver.accepted) >= WARM_UP, timeout_s=120)
        print(f"  Publish, one event a call, {IN_FLIGHT} in flight: {WARM_UP / unary_s:.0f}/s")
        await publish_batches("warm-batch", PUBLISH_BATCH * BATCHES_IN_FLIGHT)
        await receiver.wait_for(
            lambda: len(receiver.accepted) >= WARM_UP + PUBLISH_BATCH * BATCHES_IN_FLIGHT,
            timeout_s=60,
        )
        receiver.deliveries.clear()
        receiver.accepted.clear()
        cpu = meter.reading()
        started = time.perf_counter()
        published_s = await publish_batches("run", JOBS)
        with contextlib.suppress(TimeoutError):  # counted as lost below
            await receiver.wait_for(lambda: len(receiver.accepted) >= JOBS, timeout_s=300)
        elapsed = time.perf_counter() - started
        meter.report("end to end", cpu, JOBS)
        await asyncio.sleep(1.0)  # any late duplicate shows up here
    print(
        f"  end to end: {JOBS} events published in {published_s:.2f} s "
        f"({JOBS / published_s:.0f}/s), delivered in {elapsed:.2f} s",
        flush=True,
    )
    return {
        "jobs_per_s": len(receiver.accepted) / elapsed,
        "lost": JOBS - len(receiver.accepted),
        "duplicates": receiver.duplicates,
        "unsigned": receiver.unsigned,
    }


async def raw_queue(database_url: str, batch: int, in_flight: int) -> float:
    """Jobs per second through a bare asyncpg queue: insert, claim, acknowledge.

    `in_flight` producers insert `batch` jobs per statement (one autocommitted
    INSERT each) while one consumer claims up to CLAIM_BATCH due jobs with FOR
    UPDATE SKIP LOCKED, leasing them, and acknowledges them in one UPDATE."""
    pool = await asyncpg.create_pool(
        database_url, min_size=in_flight // 4 + 1, max_size=in_flight + 1
    )
    await pool.execute(
        """CREATE TABLE raw_jobs (id bigserial PRIMARY KEY, payload bytea NOT NULL,
               done boolean NOT NULL DEFAULT false, run_after timestamptz NOT NULL DEFAULT now());
           CREATE INDEX raw_jobs_due ON raw_jobs (run_after) WHERE NOT done"""
    )
    starts = iter(range(0, JOBS, batch))
    dequeued = 0

    async def producer() -> None:
        for start in starts:
            if batch == 1:
                await pool.execute(
                    "INSERT INTO raw_jobs (payload) VALUES ($1)", b'{"job": %d}' % start
                )
            else:
                await pool.execute(
                    "INSERT INTO raw_jobs (payload) SELECT unnest($1::bytea[])",
                    [b'{"job": %d}' % n for n in range(start, min(start + batch, JOBS))],
                )

    async def consumer() -> None:
        nonlocal dequeued
        while dequeued < JOBS:
            rows = await pool.fetch(
                """WITH due AS (SELECT id FROM raw_jobs WHERE NOT done AND run_after <= now()
                                ORDER BY run_after LIMIT $1 FOR UPDATE SKIP LOCKED)
                   UPDATE raw_jobs r SET run_after = now() + interval '30 seconds'
                   FROM due WHERE r.id = due.id RETURNING r.id, r.payload""",
                CLAIM_BATCH,
            )
            if not rows:
                await asyncio.sleep(0.001)
                continue
            await pool.execute(
                "UPDATE raw_jobs SET done = true WHERE id = ANY($1::bigint[])",
                [row["id"] for row in rows],
            )
            dequeued += len(rows)

    started = time.perf_counter()
    await asyncio.gather(consumer(), *(producer() for _ in range(in_flight)))
    elapsed = time.perf_counter() - started
    await pool.execute("DROP TABLE raw_jobs")
    await pool.close()
    print(
        f"  raw asyncpg queue, {batch} job(s) per INSERT, {in_flight} in flight: "
        f"{JOBS} jobs in {elapsed:.2f} s ({JOBS / elapsed:.0f}/s)"
    )
    return JOBS / elapsed


async def store_ceiling(admin_url: str) -> float:
    """Deliveries per second through notify's queue SQL alone (see the docstring)."""
    import datetime as dt
    import uuid

    from aimesh_notify.delivery_store import DeliveryStore, Outcome
    from aimesh_notify.event_store import EventStore
    from aimesh_notify.server import SPEC
    from aimesh_notify.store import SubscriptionStore
    from aimesh_runtime import db

    admin = await asyncpg.connect(admin_url)
    await admin.execute("CREATE DATABASE bench_notify_store")
    await admin.close()
    pool = await db.create_pool(admin_url.replace("/postgres?", "/bench_notify_store?"))
    await db.migrate(pool, SPEC.migrations)
    events, queue = EventStore(pool), DeliveryStore(pool)
    await SubscriptionStore(pool).create_subscription(
        "bench", "bench", "", ["bench.*"], "webhook", "http://127.0.0.1/", 5000, "unused"
    )
    starts = iter(range(0, JOBS, PUBLISH_BATCH))
    completed = 0

    async def publisher() -> None:
        for start in starts:
            batch = [
                (
                    uuid.uuid4().hex,
                    "bench.job.done",
                    b'{"job": %d}' % n,
                    "application/json",
                    f"{n}",
                    "users/bench",
                )
                for n in range(start, min(start + PUBLISH_BATCH, JOBS))
            ]
            await events.publish_batch(batch, lambda known: None)

    async def sequencer() -> None:
        while completed < JOBS:
            if not await events.sequence(5000):
                await asyncio.sleep(0.01)

    async def consumer() -> None:
        nonlocal completed
        while completed < JOBS:
            claimed, _ = await queue.claim(CLAIM_BATCH, 8, 30.0)
            if not claimed:
                await asyncio.sleep(0.001)
                continue
            now = dt.datetime.now(dt.UTC)
            await queue.complete(
                [Outcome(c.id, c.lease, c.attempt, 200, "", now, now, "succeeded") for c in claimed]
            )
            completed += len(claimed)

    started = time.perf_counter()
    await asyncio.gather(sequencer(), consumer(), *(publisher() for _ in range(BATCHES_IN_FLIGHT)))
    elapsed = time.perf_counter() - started
    await pool.close()
    print(
        f"  store ceiling, notify's queue SQL alone: {JOBS} deliveries in {elapsed:.2f} s "
        f"({JOBS / elapsed:.0f}/s)"
    )
    return JOBS / elapsed


async def main() -> None:
    import pgserver

    folder = Path(tempfile.mkdtemp(prefix="aimesh-bench-notify-"))
    os.chmod(folder, 0o755)  # pgserver runs PostgreSQL as its own user when root
    pg = pgserver.get_server(folder, cleanup_mode="stop")
    meter = CpuMeter(pg.get_pid())
    try:
        admin = pg.get_uri("postgres")
        connection = await asyncpg.connect(admin)
        await connection.execute("CREATE DATABASE bench_notify")
        await connection.close()
        database_url = admin.replace("/postgres?", "/bench_notify?")
        # One key for the service and the workers, which inherit the environment.
        os.environ["AIMESH_NOTIFY_SECRET_ENCRYPTION_KEY"] = base64.urlsafe_b64encode(
            os.urandom(32)
        ).decode()
        server, info = await spawn("--serve", database_url)
        workers = [await start_worker(database_url) for _ in range(WORKERS)]
        meter.name("service", server.pid)
        for n, worker in enumerate(workers):
            meter.name(f"worker {n + 1}" if WORKERS > 1 else "worker", worker.pid)
        receiver = await WebhookReceiver(keep=False).start()
        try:
            measured = await end_to_end(f"127.0.0.1:{info['port']}", info["token"], receiver, meter)
        finally:
            await receiver.stop()
            await finish(server)
            for worker in workers:
                worker.terminate()
                await worker.wait()
        # The baseline enqueues as the bench's producer publishes: batches of
        # PUBLISH_BATCH, BATCHES_IN_FLIGHT at a time. One job per INSERT, as a
        # producer of single events would, is shown for comparison.
        cpu = meter.reading()
        raw = await raw_queue(database_url, PUBLISH_BATCH, BATCHES_IN_FLIGHT)
        meter.report("raw loop, 100 per INSERT", cpu, JOBS)
        raw_one_by_one = await raw_queue(database_url, 1, IN_FLIGHT)
        cpu = meter.reading()
        ceiling = await store_ceiling(admin)
        meter.report("store ceiling", cpu, JOBS)
    finally:
        meter.close()
        pg.cleanup()
    if measured["unsigned"]:
        raise RuntimeError(f"{measured['unsigned']} deliveries failed signature checks")
    print(f"  store ceiling / raw (the most ratio_vs_raw could reach here): {ceiling / raw:.3f}")
    print(
        f"  ratio against the one-job-per-INSERT loop (for comparison only): "
        f"{measured['jobs_per_s'] / raw_one_by_one:.3f}"
    )
    print(
        json.dumps(
            {
                "bench": "notify",
                "jobs_per_s": round(measured["jobs_per_s"], 1),
                "ratio_vs_raw": round(measured["jobs_per_s"] / raw, 3),
                "ratio_vs_store": round(measured["jobs_per_s"] / ceiling, 3),
                "lost": measured["lost"],
                "duplicates": measured["duplicates"],
            }
        )
    )


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--serve", metavar="DATABASE_URL")
    args = parser.parse_args()
    if args.serve:
        asyncio.run(serve(args.serve))
    else:
        asyncio.run(main())
