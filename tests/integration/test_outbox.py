"""The transactional outbox and its relay, against a fake notify that
deduplicates by idempotency key, over real gRPC and a real PostgreSQL."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import asyncpg
import grpc
import pytest

from aimesh.user.v1 import user_service_pb2 as user_pb
from aimesh.user.v1 import user_service_pb2_grpc
from aimesh_runtime import db, outbox
from aimesh_runtime.config import ConfigError
from aimesh_runtime.outbox import OutboxRelay
from tests.conftest import start_server
from tests.fakes.peers import FakePeers

MIGRATIONS = Path(__file__).resolve().parents[2] / "services" / "aimesh_user" / "migrations"


@pytest.fixture
async def peers() -> AsyncIterator[FakePeers]:
    server = await FakePeers().start()
    yield server
    await server.stop()


@pytest.fixture
async def url(new_database: Any) -> str:
    url: str = await new_database("outbox")
    pool = await db.create_pool(url)
    try:
        await db.migrate(pool, MIGRATIONS)
    finally:
        await pool.close()
    return url


@contextlib.asynccontextmanager
async def relay_running(
    url: str, peers: FakePeers, **options: Any
) -> AsyncIterator[tuple[OutboxRelay, asyncpg.Pool]]:
    pool = await db.create_pool(url)
    channel = grpc.aio.insecure_channel(peers.address)
    relay = OutboxRelay(
        pool, channel, service="t", credentials=lambda: (("x-api-key", "k"),), **options
    )
    task = asyncio.create_task(relay.run())
    try:
        yield relay, pool
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        await channel.close()
        pool.terminate()  # a crash, not a drain: nothing gets to tidy up


async def emit_many(url: str, topics: list[str]) -> None:
    conn = await asyncpg.connect(url)
    try:
        for topic in topics:
            async with conn.transaction():
                await outbox.emit(conn, topic=topic, key="k", payload={"topic": topic})
    finally:
        await conn.close()


async def until(condition: Any, timeout_s: float = 10.0) -> None:
    async with asyncio.timeout(timeout_s):
        while not condition():
            await asyncio.sleep(0.02)


async def unpublished(url: str) -> int:
    conn = await asyncpg.connect(url)
    try:
        return int(await conn.fetchval("SELECT count(*) FROM outbox WHERE publish_time IS NULL"))
    finally:
        await conn.close()


async def test_rolled_back_emit_publishes_nothing_committed_one_does(
    url: str, peers: FakePeers
) -> None:
    conn = await asyncpg.connect(url)
    try:
        with contextlib.suppress(RuntimeError):
            async with conn.transaction():
                await outbox.emit(conn, topic="t.gone", key="a", payload={"n": 1})
                raise RuntimeError("the change failed")
        async with conn.transaction():
            await outbox.emit(conn, topic="t.kept", key="b", payload={"n": 2})
    finally:
        await conn.close()
    async with relay_running(url, peers, poll_s=0.1) as (relay, _):
        await until(lambda: relay.published == 1)
        await asyncio.sleep(0.3)  # time for a wrong second publish to show
    published = peers.state.published
    assert [(p.topic, p.key) for p in published] == [("t.kept", "t:outbox:2")]
    assert published[0].payload["data"] == {"n": 2} and published[0].payload["key"] == "b"
    assert published[0].metadata["x-api-key"] == "k"


async def test_a_restart_publishes_each_row_once(url: str, peers: FakePeers) -> None:
    await emit_many(url, [f"t.first{i}" for i in range(5)])
    async with relay_running(url, peers, poll_s=0.1) as (relay, _):
        await until(lambda: relay.published == 5)
    await emit_many(url, [f"t.second{i}" for i in range(5)])  # while no relay runs
    async with relay_running(url, peers, poll_s=0.1) as (relay, _):
        await until(lambda: relay.published == 5)
    assert peers.state.deliveries() == {f"t:outbox:{i}": 1 for i in range(1, 11)}
    assert await unpublished(url) == 0


async def test_a_crash_mid_batch_republishes_and_dedupe_keeps_it_once(
    url: str, peers: FakePeers
) -> None:
    await emit_many(url, [f"t.e{i}" for i in range(20)])
    peers.state.hang_publish_at = 8  # 7 published, the 8th in flight, nothing marked
    async with relay_running(url, peers, batch_size=50, poll_s=0.1):
        await asyncio.wait_for(peers.state.hung.wait(), 10)
    assert await unpublished(url) == 20  # the batch's transaction died with the process
    peers.state.release.set()
    async with relay_running(url, peers, batch_size=50, poll_s=0.1) as (relay, _):
        await until(lambda: relay.published == 20)
    calls = peers.state.deliveries()
    assert set(peers.state.first) == {f"t:outbox:{i}" for i in range(1, 21)}
    assert all(calls[f"t:outbox:{i}"] == 2 for i in range(1, 9))  # sent again, deduped
    assert all(calls[f"t:outbox:{i}"] == 1 for i in range(9, 21))
    assert await unpublished(url) == 0


async def test_listen_wakes_the_relay_long_before_its_poll(url: str, peers: FakePeers) -> None:
    async with relay_running(url, peers, poll_s=60) as (relay, _):
        await asyncio.sleep(0.3)  # the relay is listening and idle
        await emit_many(url, ["t.woken"])
        await until(lambda: relay.published == 1, timeout_s=3)


async def test_a_refused_row_is_parked_and_the_rest_go_on(url: str, peers: FakePeers) -> None:
    peers.state.refuse_topic["t.bad"] = grpc.StatusCode.INVALID_ARGUMENT
    await emit_many(url, ["t.ok1", "t.bad", "t.ok2"])
    async with relay_running(url, peers, poll_s=0.1) as (relay, pool):
        await until(lambda: relay.published == 2)
        parked = await pool.fetchrow("SELECT * FROM outbox WHERE topic = 't.bad'")
    assert parked["fail_time"] is not None and "INVALID_ARGUMENT" in parked["last_error"]
    assert parked["publish_time"] is None  # kept, not lost
    assert [p.topic for p in peers.state.published] == ["t.ok1", "t.ok2"]


async def test_notify_down_backs_off_then_delivers(url: str, peers: FakePeers) -> None:
    peers.state.refuse_topic["t.later"] = grpc.StatusCode.UNAVAILABLE
    await emit_many(url, ["t.later"])
    async with relay_running(url, peers, poll_s=0.1) as (relay, pool):
        async with asyncio.timeout(10):
            while not (row := await pool.fetchrow("SELECT attempts, last_error FROM outbox"))[
                "attempts"
            ]:
                await asyncio.sleep(0.05)
        assert "UNAVAILABLE" in row["last_error"] and relay.published == 0
        peers.state.refuse_topic.clear()
        await pool.execute("UPDATE outbox SET next_attempt_time = now()")  # skip the wait
        await until(lambda: relay.published == 1)


async def test_the_user_service_relays_user_registered(new_database: Any, peers: FakePeers) -> None:
    from aimesh_user.server import SPEC

    running = await start_server(
        [SPEC],
        new_database,
        extra_env={"AIMESH_NOTIFY_ADDRESS": peers.address},
        outbox_poll_s=0.2,
    )
    try:
        async with running.channel() as channel:
            users = user_service_pb2_grpc.UserServiceStub(channel)
            reply = await users.Register(
                user_pb.RegisterRequest(email="relay@example.com", password="a-long-password-1")
            )
        await until(
            lambda: any(p.payload["data"]["user"] == reply.user.name for p in peers.state.published)
        )
    finally:
        await running.server.stop(0.5)
    registered = [p for p in peers.state.published if p.topic == "user.registered"]
    # The bootstrap admin registered first; both carry the user service's own token.
    names = [p.payload["data"]["user"] for p in registered]
    assert reply.user.name in names
    assert all(p.key.startswith("user:outbox:") for p in registered)
    assert all(p.metadata["authorization"].startswith("Bearer ") for p in registered)


async def test_a_relay_with_only_the_retired_shared_key_refuses_to_start(
    new_database: Any, peers: FakePeers
) -> None:
    """The one key all services shared names no service, so notify would refuse every
    event it sent: the start fails, naming the setting that replaces it."""
    from aimesh_notify.server import SPEC

    shared_only = {
        "AIMESH_NOTIFY_ADDRESS": peers.address,
        "AIMESH_SERVICE_API_KEY": "amk_0123abcd_an-old-key-every-service-shared-once",
        "AIMESH_NOTIFY_SERVICE_API_KEY": "",
    }
    with pytest.raises(ConfigError, match="set AIMESH_NOTIFY_SERVICE_API_KEY"):
        await start_server([SPEC], new_database, extra_env=shared_only)


async def test_a_finished_import_is_emitted_with_its_state(new_database: Any) -> None:
    from aimesh_search.store import SearchStore

    pool = await db.create_pool(await new_database("search"))
    try:
        await db.migrate(pool, MIGRATIONS.parents[1] / "aimesh_search" / "migrations")
        await pool.execute(
            """INSERT INTO collections (id, embedding_model, dimension, max_input_tokens)
               VALUES ('docs', 'm', 3, 8)"""
        )
        await pool.execute(
            """INSERT INTO import_jobs (collection_id, id, state, upserted_documents)
               VALUES ('docs', 'j1', 'RUNNING', 4), ('docs', 'j2', 'RUNNING', 0)"""
        )
        store = SearchStore(pool)
        await store.finish_import_job("docs", "j1", "SUCCEEDED")
        await store.finish_import_job("docs", "j2", "INTERRUPTED")  # resumable: not finished
        rows = await pool.fetch("SELECT topic, key, payload FROM outbox")
    finally:
        await pool.close()
    assert [(r["topic"], r["key"]) for r in rows] == [
        ("search.import_finished", "collections/docs/importJobs/j1")
    ]
    payload = json.loads(rows[0]["payload"])
    assert payload["state"] == "SUCCEEDED" and payload["upserted_documents"] == 4


async def test_the_real_notify_receives_each_user_event_once(
    new_database: Any, user_server: Any
) -> None:
    from aimesh_notify.server import SPEC as NOTIFY
    from aimesh_user.server import SPEC as USER

    notify = await start_server(
        [NOTIFY],
        new_database,
        extra_env={
            "AIMESH_JWKS_URL": f"http://127.0.0.1:{user_server.http_port}/.well-known/jwks.json",
            "AIMESH_USER_ADDRESS": user_server.address,
        },
    )
    # A user service of its own, whose tokens the notify above must trust: share the key ring.
    user = await start_server(
        [USER],
        new_database,
        extra_env={
            "AIMESH_USER_DATABASE_URL": user_server.environ["AIMESH_USER_DATABASE_URL"],
            "AIMESH_USER_KEY_ENCRYPTION_KEY": user_server.environ["AIMESH_USER_KEY_ENCRYPTION_KEY"],
            "AIMESH_NOTIFY_ADDRESS": notify.address,
        },
        outbox_poll_s=0.2,
    )
    conn = await asyncpg.connect(notify.environ["AIMESH_NOTIFY_DATABASE_URL"])
    try:
        async with user.channel() as channel:
            users = user_service_pb2_grpc.UserServiceStub(channel)
            reply = await users.Register(
                user_pb.RegisterRequest(email="real-notify@example.com", password="a-long-pw-12")
            )
        async with asyncio.timeout(15):
            while not await conn.fetchval(
                "SELECT count(*) FROM events WHERE convert_from(payload, 'UTF8') LIKE $1",
                f"%{reply.user.name}%",
            ):
                await asyncio.sleep(0.1)
        keys = await conn.fetch(
            "SELECT idempotency_key FROM events WHERE topic = 'user.registered'"
        )
    finally:
        await conn.close()
        await user.server.stop(0.5)
        await notify.server.stop(0.5)
    found = [row["idempotency_key"] for row in keys]
    assert len(found) == len(set(found)) and all(k.startswith("user:outbox:") for k in found)
