"""Rotating AIMESH_USER_KEY_ENCRYPTION_KEY, the KEK that seals the JWT signing keys:
the old KEK moves to AIMESH_USER_PREVIOUS_KEY_ENCRYPTION_KEYS, a start reseals,
tokens keep verifying; a start refuses while a live signing key needs a KEK it
does not hold (the same scheme, and the same tests, as notify's sealing key)."""

from __future__ import annotations

import asyncio
import base64
import datetime as dt
import os
import subprocess
import sys
from typing import Any

import asyncpg
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.serialization import (
    Encoding,
    NoEncryption,
    PrivateFormat,
    PublicFormat,
)

from aimesh.user.v1 import user_service_pb2 as pb
from aimesh.user.v1 import user_service_pb2_grpc
from aimesh_runtime.config import ConfigError
from aimesh_user.signing import key_id
from tests.conftest import ROOT, Running, bearer, kek, register_and_login, start_server

URL = "AIMESH_USER_DATABASE_URL"
KEY = "AIMESH_USER_KEY_ENCRYPTION_KEY"
PREVIOUS = "AIMESH_USER_PREVIOUS_KEY_ENCRYPTION_KEYS"


async def start_user(new_database: Any, **env: str) -> Running:
    from aimesh_user.server import SPEC

    return await start_server([SPEC], new_database, extra_env=env)


def kek_id_of(key: str) -> str:
    return key_id(base64.urlsafe_b64decode(key))


async def stored_kek_ids(url: str) -> dict[str, str | None]:
    connection = await asyncpg.connect(url)
    try:
        rows = await connection.fetch("SELECT kid, kek_id FROM signing_keys")
    finally:
        await connection.close()
    return {row["kid"]: row["kek_id"] for row in rows}


def run_user(env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "aimesh_user"],
        env={"PATH": os.environ["PATH"], "AIMESH_GRPC_PORT": "0", "AIMESH_HTTP_PORT": "0", **env},
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
    )


async def test_the_kek_rotates_and_tokens_keep_verifying(new_database: Any) -> None:
    old_key, new_key = kek(), kek()
    first = await start_user(new_database, **{KEY: old_key})
    url = first.environ[URL]
    try:
        async with first.channel() as channel:
            users = user_service_pb2_grpc.UserServiceStub(channel)
            user, token = await register_and_login(users)
    finally:
        await first.server.stop(0.5)
    assert set((await stored_kek_ids(url)).values()) == {kek_id_of(old_key)}
    # And as a release from before key ids left it: no KEK named.
    connection = await asyncpg.connect(url)
    try:
        await connection.execute("UPDATE signing_keys SET kek_id = NULL")
    finally:
        await connection.close()

    # The new KEK alone opens nothing stored: the start refuses, naming the way out.
    result = await asyncio.to_thread(run_user, {URL: url, KEY: new_key})
    assert result.returncode == 2, result.stderr
    assert f"{KEY} does not open the signing keys" in result.stderr
    assert PREVIOUS in result.stderr and "Traceback" not in result.stderr

    second = await start_user(new_database, **{URL: url, KEY: new_key, PREVIOUS: old_key})
    try:
        assert set((await stored_kek_ids(url)).values()) == {kek_id_of(new_key)}
        async with second.channel() as channel:
            users = user_service_pb2_grpc.UserServiceStub(channel)
            got = await users.GetUser(pb.GetUserRequest(name="users/me"), metadata=bearer(token))
            assert got.user.name == user.name  # a token signed before the rotation still verifies
            await register_and_login(users)
    finally:
        await second.server.stop(0.5)

    # Done: the new KEK starts alone, and the old one alone no longer does.
    third = await start_user(new_database, **{URL: url, KEY: new_key})
    await third.server.stop(0.5)
    with pytest.raises(ConfigError, match=f"sealed under key {kek_id_of(new_key)}"):
        await start_user(new_database, **{URL: url, KEY: old_key})


def _sealed_row(kid: str, key: str) -> tuple[bytes, bytes]:
    private = Ed25519PrivateKey.generate()
    raw = private.private_bytes(Encoding.Raw, PrivateFormat.Raw, NoEncryption())
    nonce = os.urandom(12)
    sealed = nonce + AESGCM(base64.urlsafe_b64decode(key)).encrypt(nonce, raw, kid.encode())
    return sealed, private.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)


async def insert_signing_key(url: str, kid: str, key: str, retire_time: dt.datetime) -> None:
    sealed, public = _sealed_row(kid, key)
    connection = await asyncpg.connect(url)
    try:
        await connection.execute(
            """INSERT INTO signing_keys
                   (kid, private_key_sealed, public_key, activate_time, retire_time, kek_id)
               VALUES ($1, $2, $3, now() - interval '2 hours', $4, $5)""",
            kid, sealed, public, retire_time, kek_id_of(key),
        )  # fmt: skip
    finally:
        await connection.close()


async def test_a_start_refuses_while_a_live_signing_key_needs_a_kek_it_lacks(
    new_database: Any,
) -> None:
    old_key, new_key = kek(), kek()
    running = await start_user(new_database, **{KEY: new_key})
    url = running.environ[URL]
    await running.server.stop(0.5)
    now = dt.datetime.now(dt.UTC)
    # Retired but still verifying tokens, sealed under the old KEK by a replica not yet rolled:
    await insert_signing_key(url, "late", old_key, now + dt.timedelta(hours=1))
    # Past its retirement: needs the old KEK no more.
    await insert_signing_key(url, "expired", old_key, now - dt.timedelta(hours=1))

    result = await asyncio.to_thread(run_user, {URL: url, KEY: new_key})
    assert result.returncode == 2, result.stderr
    assert "configuration error" in result.stderr and "Traceback" not in result.stderr
    assert f"signing key late is sealed under key {kek_id_of(old_key)}" in result.stderr
    assert f"put that key back in {PREVIOUS}" in result.stderr
    assert (await stored_kek_ids(url))["late"] == kek_id_of(old_key)  # untouched

    running = await start_user(new_database, **{URL: url, KEY: new_key, PREVIOUS: old_key})
    await running.server.stop(0.5)
    stored = await stored_kek_ids(url)
    assert stored["late"] == kek_id_of(new_key)
    assert stored["expired"] == kek_id_of(old_key)  # not live: left to expire
