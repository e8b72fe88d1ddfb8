"""Webhook secrets at rest: sealed in notify's PostgreSQL, still signing, legacy
plaintext sealed at start, and a wrong key refused before anything runs."""

from __future__ import annotations

import asyncio
import base64
import datetime as dt
import os
import shutil
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import asyncpg
import pytest
from google.protobuf import duration_pb2

from aimesh.notify.v1 import notify_service_pb2 as pb
from aimesh_notify.sealing import SealError, SecretBox
from aimesh_notify.server import SPEC
from aimesh_runtime import db
from tests.conftest import ROOT, Running, bearer, kek, register_and_login
from tests.fakes.webhook_receiver import WebhookReceiver
from tests.integration.test_notify_service import (
    Stub,
    on,
    publish,
    settled,
    start_notify,
    topic,
    webhook,
)

KEY = "AIMESH_NOTIFY_SECRET_ENCRYPTION_KEY"
URL = "AIMESH_NOTIFY_DATABASE_URL"


def box_of(running_or_key: Running | str) -> SecretBox:
    key = running_or_key if isinstance(running_or_key, str) else running_or_key.environ[KEY]
    return SecretBox(base64.urlsafe_b64decode(key))


@pytest.fixture(scope="module")
async def receiver() -> AsyncIterator[WebhookReceiver]:
    server = await WebhookReceiver().start()
    yield server
    await server.stop()


@pytest.fixture(scope="module")
async def notify(new_database: Any, user_server: Running) -> AsyncIterator[Running]:
    running = await start_notify(
        new_database, user_server, AIMESH_NOTIFY_ALLOW_PRIVATE_WEBHOOKS="1"
    )
    yield running
    await running.server.stop(0.5)


@pytest.fixture(scope="module")
async def stub(notify: Running) -> AsyncIterator[Stub]:
    async with notify.channel() as channel:
        yield Stub(channel)


@pytest.fixture
async def md(users: Any) -> Any:
    _, token = await register_and_login(users)
    return bearer(token)


async def database_text(url: str) -> str:
    """Every row of every table of the database, as text."""
    connection = await asyncpg.connect(url)
    try:
        tables = await connection.fetch(
            "SELECT tablename FROM pg_tables WHERE schemaname = 'public'"
        )
        dumped = [
            await connection.fetchval(f'SELECT string_agg(t::text, chr(10)) FROM "{name}" t')
            for (name,) in tables
        ]
    finally:
        await connection.close()
    return "\n".join(text or "" for text in dumped)


async def stored_secrets(url: str, subscription_id: str) -> asyncpg.Record:
    connection = await asyncpg.connect(url)
    try:
        return await connection.fetchrow(
            "SELECT secret, previous_secret FROM subscriptions WHERE id = $1", subscription_id
        )
    finally:
        await connection.close()


async def test_secrets_are_sealed_after_create_and_rotate_and_still_sign(
    notify: Running, stub: Stub, md: Any, receiver: WebhookReceiver
) -> None:
    url = notify.environ[URL]
    name = topic()
    subscription, old, path = await webhook(stub, md, receiver, [name])
    subscription_id = subscription.name.split("/")[1]
    stored = await stored_secrets(url, subscription_id)
    assert stored["secret"].startswith("aesgcm1:") and stored["previous_secret"] is None
    assert box_of(notify).open(subscription_id, stored["secret"]) == old
    assert old not in await database_text(url)

    rotated = await stub.RotateSubscriptionSecret(
        pb.RotateSubscriptionSecretRequest(
            name=subscription.name, grace_period=duration_pb2.Duration(seconds=600)
        ),
        metadata=md,
    )
    new = rotated.secret
    stored = await stored_secrets(url, subscription_id)
    assert stored["secret"].startswith("aesgcm1:")
    assert stored["previous_secret"].startswith("aesgcm1:")
    assert [box_of(notify).open(subscription_id, s) for s in stored] == [new, old]
    dumped = await database_text(url)
    assert old not in dumped and new not in dumped

    receiver.secrets[path] = [old, new]
    await publish(stub, md, name, b"sealed")
    await receiver.wait_for(lambda: len(on(receiver, path)) == 1)
    assert set(on(receiver, path)[0].signed_by) == {old, new}


async def test_a_sealed_secret_copied_onto_another_subscription_does_not_open(
    notify: Running, stub: Stub, md: Any, receiver: WebhookReceiver
) -> None:
    url = notify.environ[URL]
    first, _, _ = await webhook(stub, md, receiver, [topic()])
    name = topic()
    second, _, path = await webhook(stub, md, receiver, [name])
    first_id, second_id = first.name.split("/")[1], second.name.split("/")[1]
    connection = await asyncpg.connect(url)
    try:
        await connection.execute(
            """UPDATE subscriptions SET secret = (SELECT secret FROM subscriptions WHERE id = $1)
               WHERE id = $2""",
            first_id,
            second_id,
        )
    finally:
        await connection.close()
    copied = (await stored_secrets(url, second_id))["secret"]
    with pytest.raises(SealError, match=second_id):
        box_of(notify).open(second_id, copied)

    await publish(stub, md, name, b"never signed with garbage")
    [delivery] = await settled(stub, md, second.name, 1)
    assert delivery.status == pb.DELIVERY_STATUS_DEAD_LETTER
    assert delivery.attempts and all(
        a.http_status == 0 and a.error == "internal: the webhook secret does not open"
        for a in delivery.attempts
    )
    assert not on(receiver, path)  # nothing was sent at all


async def legacy_database(new_database: Any, tmp_path: Path) -> str:
    """A database migrated as it was before sealing (its first two migrations)."""
    url: str = await new_database("notify")
    before = tmp_path / "migrations"
    before.mkdir()
    for migration in ("0001_baseline.sql", "0002_notify_queue.sql"):
        shutil.copy(SPEC.migrations / migration, before / migration)
    pool = await db.create_pool(url, max_size=1)
    try:
        await db.migrate(pool, before)
    finally:
        await pool.close()
    return url


async def test_legacy_plaintext_is_sealed_at_start_by_replicas_at_once_and_still_signs(
    new_database: Any,
    user_server: Running,
    md: Any,
    receiver: WebhookReceiver,
    tmp_path: Path,
) -> None:
    url = await legacy_database(new_database, tmp_path)
    name = topic()
    path = f"/{uuid.uuid4().hex}"
    plain = {f"legacy{n:04d}": (f"whsec_cur{n}", f"whsec_prev{n}") for n in range(1200)}
    connection = await asyncpg.connect(url)
    try:
        await connection.executemany(
            """INSERT INTO subscriptions (id, owner_id, topics, kind, url, timeout_ms, secret,
                   secret_create_time, previous_secret, previous_secret_expire_time)
               VALUES ($1, 'someone', $2, 'webhook', $3, 10000, $4, now(), $5, $6)""",
            [
                (
                    subscription_id,
                    [name] if subscription_id == "legacy0000" else ["legacy.other"],
                    receiver.url(path),
                    secret,
                    previous,
                    dt.datetime.now(dt.UTC) + dt.timedelta(hours=1),
                )
                for subscription_id, (secret, previous) in plain.items()
            ],
        )
    finally:
        await connection.close()

    key = kek()
    env = {URL: url, KEY: key, "AIMESH_NOTIFY_ALLOW_PRIVATE_WEBHOOKS": "1"}
    replicas = await asyncio.gather(
        start_notify(new_database, user_server, **env),
        start_notify(new_database, user_server, **env),
    )
    try:
        connection = await asyncpg.connect(url)
        try:
            rows = await connection.fetch("SELECT id, secret, previous_secret FROM subscriptions")
        finally:
            await connection.close()
        box = box_of(key)
        assert {
            row["id"]: (
                box.open(row["id"], row["secret"]),
                box.open(row["id"], row["previous_secret"]),
            )
            for row in rows
            if row["secret"].startswith("aesgcm1:")
            and row["previous_secret"].startswith("aesgcm1:")
        } == plain
        dumped = await database_text(url)
        assert "whsec_" not in dumped

        receiver.secrets[path] = list(plain["legacy0000"])
        async with replicas[0].channel() as channel:
            await publish(Stub(channel), md, name, b"legacy")
        await receiver.wait_for(lambda: len(on(receiver, path)) == 1)
        assert set(on(receiver, path)[0].signed_by) == set(plain["legacy0000"])
    finally:
        for running in replicas:
            await running.server.stop(0.5)


def run_module(module: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", module],
        env={
            "PATH": os.environ["PATH"],
            "PYTHONPATH": os.pathsep.join([str(ROOT / "services"), str(ROOT / "protos")]),
            **env,
        },
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
    )


async def test_a_wrong_key_refuses_to_start_the_service_and_the_worker(
    notify: Running, stub: Stub, md: Any, receiver: WebhookReceiver
) -> None:
    await webhook(stub, md, receiver, [topic()])  # something sealed under the right key
    env = {
        URL: notify.environ[URL],
        KEY: kek(),
        "AIMESH_GRPC_PORT": "0",
        "AIMESH_HTTP_PORT": "0",
        "AIMESH_JWKS_URL": notify.environ["AIMESH_JWKS_URL"],
    }
    for module in ("aimesh_notify", "aimesh_notify.worker"):
        result = await asyncio.to_thread(run_module, module, env)
        assert result.returncode == 2, (module, result.stderr)
        assert "configuration error" in result.stderr, module
        assert f"{KEY} does not open the webhook secrets" in result.stderr, module
        assert "Traceback" not in result.stderr, module
