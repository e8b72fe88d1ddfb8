"""Kill -9 the delivery worker 50 times while 10,000 notifications flow:
none is lost, and after the receiver's dedupe none arrives twice.

The service runs here without a worker of its own; the worker is
`python -m aimesh_notify.worker` in a subprocess, killed with SIGKILL a
moment after each start while publishes keep coming, then restarted.
Deliveries it held when killed are taken over once their lease runs out.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import signal
import sys
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

import asyncpg
import pytest

from aimesh.notify.v1 import notify_service_pb2 as pb
from aimesh.notify.v1 import notify_service_pb2_grpc
from aimesh_notify.server import SPEC
from aimesh_notify.worker import READY
from tests.conftest import ROOT, Running, bearer, register_and_login, start_server
from tests.fakes.webhook_receiver import WebhookReceiver

EVENTS = 10_000
KILLS = 50
PUBLISHERS = 32
SETTINGS = {
    "AIMESH_NOTIFY_ALLOW_PRIVATE_WEBHOOKS": "1",
    "AIMESH_NOTIFY_VISIBILITY_TIMEOUT_S": "1",
    "AIMESH_NOTIFY_MAX_ATTEMPTS": "1000",  # kills must not dead-letter anything here
    "AIMESH_NOTIFY_BACKOFF_BASE_S": "0.05",
    "AIMESH_NOTIFY_BACKOFF_CAP_S": "0.5",
    "AIMESH_NOTIFY_POLL_S": "0.2",
}


@pytest.fixture(scope="module")
async def notify(new_database: Any, user_server: Running) -> AsyncIterator[Running]:
    running = await start_server(
        [SPEC],
        new_database,
        extra_env={
            "AIMESH_JWKS_URL": f"http://127.0.0.1:{user_server.http_port}/.well-known/jwks.json",
            "AIMESH_NOTIFY_WORKER_CONCURRENCY": "0",
            **SETTINGS,
        },
        rate_limit_rps=1_000_000.0,
        rate_limit_burst=1_000_000,
    )
    yield running
    await running.server.stop(0.5)


async def start_worker(
    notify: Running, started: list[asyncio.subprocess.Process]
) -> tuple[asyncio.subprocess.Process, asyncio.Event]:
    """Start a worker on the service's database and key, and add it to `started`,
    for the caller's cleanup."""
    shared = ("AIMESH_NOTIFY_DATABASE_URL", "AIMESH_NOTIFY_SECRET_ENCRYPTION_KEY")
    environ = {
        **os.environ,
        **SETTINGS,
        **{name: notify.environ[name] for name in shared},
        "PYTHONPATH": os.pathsep.join([str(ROOT / "services"), str(ROOT / "protos")]),
    }
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "aimesh_notify.worker", "--concurrency", "64",
        env=environ, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
    )  # fmt: skip
    started.append(process)
    ready = asyncio.Event()

    async def watch() -> None:
        assert process.stdout is not None
        async for line in process.stdout:  # keep reading so the pipe never fills
            if READY.encode() in line:
                ready.set()

    asyncio.get_running_loop().create_task(watch())
    return process, ready


@pytest.mark.timeout(300)  # well under a minute on two shared cores; the drain may take longer
async def test_kill_9_the_worker_50_times_loses_nothing(notify: Running, users: Any) -> None:
    receiver = await WebhookReceiver(keep=False).start()
    workers: list[asyncio.subprocess.Process] = []
    try:
        await run_with_kills(notify, users, receiver, workers)
    finally:
        # Whatever failed, leave no worker behind.
        for process in workers:
            if process.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    process.kill()
                await process.wait()
        await receiver.stop()


async def run_with_kills(
    notify: Running,
    users: Any,
    receiver: WebhookReceiver,
    workers: list[asyncio.subprocess.Process],
) -> None:
    user, token = await register_and_login(users)
    md = bearer(token)
    database_url = notify.environ["AIMESH_NOTIFY_DATABASE_URL"]
    topic = f"apps.u{user.name.removeprefix('users/')}.kill{uuid.uuid4().hex[:8]}.event"
    async with notify.channel() as channel:
        stub = notify_service_pb2_grpc.NotifyServiceStub(channel)
        created = await stub.CreateSubscription(
            pb.CreateSubscriptionRequest(
                subscription=pb.Subscription(
                    topics=[topic],
                    # 1 s timeout + 1 s visibility: a killed worker's leases end in 2 s.
                    webhook=pb.WebhookChannel(url=receiver.url("/kill9"), timeout={"seconds": 1}),
                )
            ),
            metadata=md,
        )
        receiver.secrets["/kill9"] = [created.secret]
        counter = iter(range(EVENTS))

        async def publisher() -> None:
            for n in counter:
                await stub.Publish(
                    pb.PublishRequest(
                        topic=topic, idempotency_key=f"kill9:{n}", payload=str(n).encode()
                    ),
                    metadata=md,
                )

        publishing = asyncio.gather(*(publisher() for _ in range(PUBLISHERS)))
        started = time.monotonic()
        draw = random.Random(9)
        try:
            for _ in range(KILLS):
                process, ready = await start_worker(notify, workers)
                async with asyncio.timeout(30):
                    await ready.wait()
                await asyncio.sleep(draw.uniform(0.1, 0.35))
                process.send_signal(signal.SIGKILL)
                assert await process.wait() == -signal.SIGKILL
            await publishing
        finally:
            publishing.cancel()  # if a kill went wrong; a no-op once published
            with contextlib.suppress(asyncio.CancelledError):
                await publishing
        killed_at = len(receiver.accepted)
        last, _ = await start_worker(notify, workers)
        try:
            with contextlib.suppress(TimeoutError):  # the assertions below say what is missing
                await receiver.wait_for(lambda: len(receiver.accepted) >= EVENTS, timeout_s=150)
            await asyncio.sleep(0.5)  # a late extra delivery would show here
        finally:
            last.send_signal(signal.SIGTERM)
            await last.wait()
        elapsed = time.monotonic() - started
    connection = await asyncpg.connect(database_url)
    try:
        rows = await connection.fetch("SELECT id, status FROM deliveries")
        statuses = await connection.fetch(
            "SELECT status, count(*), min(run_after) - now() AS due FROM deliveries GROUP BY 1"
        )
        takeovers = await connection.fetchval(
            "SELECT count(*) FROM delivery_attempts WHERE error LIKE 'lease expired%'"
        )
    finally:
        await connection.close()
    print(
        f"\n{EVENTS} events, {KILLS} kills, {elapsed:.1f} s: {killed_at} delivered while "
        f"killing; {takeovers} leases taken over; {receiver.duplicates} raw redeliveries "
        "absorbed by the receiver's dedupe"
    )
    print("statuses:", [tuple(row) for row in statuses])
    assert len(rows) == EVENTS
    assert {str(row["id"]) for row in rows} == receiver.accepted  # 0 lost
    assert len(receiver.accepted) == EVENTS  # deduped: each exactly once
    assert receiver.unsigned == 0
    assert {row["status"] for row in rows} == {"succeeded"}
