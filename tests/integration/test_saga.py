"""The user-deletion saga: crashed during each step, then resumed by a new
process on the same database; refused before any erasure, then compensated."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import grpc
import pytest

from aimesh.user.v1 import user_service_pb2 as pb
from aimesh.user.v1 import user_service_pb2_grpc
from tests.conftest import Running, admin_token, bearer, kek, register_and_login, start_server
from tests.fakes.peers import FakePeers

PEERS = ("chat", "recommend", "search", "notify")
HELD = {"chat": 3, "recommend": 5, "search": 7, "notify": 2}


@pytest.fixture
async def peers() -> AsyncIterator[FakePeers]:
    server = await FakePeers().start()
    yield server
    await server.stop()


def saga_env(peers: FakePeers, url: str) -> dict[str, str]:
    return {
        "AIMESH_USER_DATABASE_URL": url,
        "AIMESH_USER_KEY_ENCRYPTION_KEY": kek(),
        "AIMESH_CHAT_ADDRESS": peers.address,
        "AIMESH_RECOMMEND_ADDRESS": peers.address,
        "AIMESH_SEARCH_ADDRESS": peers.address,
        "AIMESH_NOTIFY_ADDRESS": peers.address,
        "AIMESH_USER_DELETION_STEP_TIMEOUT_S": "2",
        "AIMESH_USER_DELETION_LEASE_S": "4",
        "AIMESH_USER_DELETION_RESUME_S": "0.2",
        "AIMESH_USER_DELETION_WAIT_S": "0",
        "AIMESH_USER_DELETION_RETRY_MAX_S": "0.5",
    }


async def until_ended(running: Running, name: str, timeout_s: float = 20.0) -> pb.UserDeletion:
    async with running.channel() as channel:
        users = user_service_pb2_grpc.UserServiceStub(channel)
        token = await admin_token(users)
        async with asyncio.timeout(timeout_s):
            while True:
                reply = await users.GetUserDeletion(
                    pb.GetUserDeletionRequest(name=name), metadata=bearer(token)
                )
                if reply.deletion.state != pb.USER_DELETION_STATE_RUNNING:
                    return reply.deletion
                await asyncio.sleep(0.1)


@pytest.mark.parametrize("crash_in", PEERS)
async def test_crashed_during_a_step_then_resumed_deletes_everything_once(
    new_database: Any, peers: FakePeers, crash_in: str
) -> None:
    env = saga_env(peers, await new_database("user"))
    first = await start_server([_spec()], new_database, extra_env=env)
    async with first.channel() as channel:
        users = user_service_pb2_grpc.UserServiceStub(channel)
        user, token = await register_and_login(users, "a-long-password-1")
        for service, held in HELD.items():
            peers.state.data[service] = {user.name: held}
        peers.state.hang_purge = crash_in  # it erases, then the process dies before recording
        started = await users.DeleteUser(
            pb.DeleteUserRequest(name="users/me"), metadata=bearer(token)
        )
        deletion = started.deletion
        assert deletion.state == pb.USER_DELETION_STATE_RUNNING and deletion.user == user.name
        await asyncio.wait_for(peers.state.hung.wait(), 10)
        # Disabled from the start: the owner cannot log in while the saga runs.
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await users.Login(pb.LoginRequest(email=user.email, password="a-long-password-1"))
        assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED
    await first.server.stop(0)  # the crash: nothing after the peer's erasure was recorded

    second = await start_server([_spec()], new_database, extra_env=first.environ)
    try:
        ended = await until_ended(second, deletion.name)
        async with second.channel() as channel:
            users = user_service_pb2_grpc.UserServiceStub(channel)
            admin = await admin_token(users)
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await users.GetUser(pb.GetUserRequest(name=user.name), metadata=bearer(admin))
            assert caught.value.code() == grpc.StatusCode.NOT_FOUND
        # The relay of the new process announces the deletion.
        async with asyncio.timeout(10):
            while not any(p.topic == "user.deleted" for p in peers.state.published):
                await asyncio.sleep(0.05)
    finally:
        await second.server.stop(0.5)
    assert ended.state == pb.USER_DELETION_STATE_SUCCEEDED
    assert [s.service for s in ended.steps] == [*PEERS, "user"]
    assert all(s.state == pb.USER_DELETION_STEP_STATE_SUCCEEDED for s in ended.steps)
    # The crashed call's answer was lost with the process; its repeat found nothing left.
    counts = [0 if service == crash_in else held for service, held in HELD.items()]
    assert [s.deleted_count for s in ended.steps] == [*counts, 1]
    # Each peer's data went exactly once; the crashed step was called again and found nothing.
    calls = [(service, deleted) for service, _, deleted in peers.state.purges]
    expected = []
    for service in PEERS:
        expected.append((service, HELD[service]))
        if service == crash_in:
            expected.append((service, 0))
    assert calls == expected
    assert all(not held for held in peers.state.data.values())
    assert all({"chat.admin", "search.admin"} <= scopes for scopes in peers.state.purge_scopes)
    deleted = [p for p in peers.state.published if p.topic == "user.deleted"]
    assert deleted[0].payload["data"] == {"user": user.name, "deletion": deletion.name}


async def test_refused_before_any_erasure_aborts_and_enables_the_account(
    new_database: Any, peers: FakePeers
) -> None:
    peers.state.refuse_purge["chat"] = grpc.StatusCode.PERMISSION_DENIED
    running = await start_server(
        [_spec()], new_database, extra_env=saga_env(peers, await new_database("user"))
    )
    try:
        async with running.channel() as channel:
            users = user_service_pb2_grpc.UserServiceStub(channel)
            user, token = await register_and_login(users, "a-long-password-1")
            started = await users.DeleteUser(
                pb.DeleteUserRequest(name="users/me"), metadata=bearer(token)
            )
            ended = await until_ended(running, started.deletion.name)
            # Compensated: the account works again, with a new login (the tokens
            # issued before the deletion began stay revoked).
            login = await users.Login(
                pb.LoginRequest(email=user.email, password="a-long-password-1")
            )
            # The owner may read their own deletion; another member may not.
            own = await users.GetUserDeletion(
                pb.GetUserDeletionRequest(name=ended.name), metadata=bearer(login.access_token)
            )
            assert own.deletion.state == pb.USER_DELETION_STATE_ABORTED
            _, other = await register_and_login(users)
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await users.GetUserDeletion(
                    pb.GetUserDeletionRequest(name=ended.name), metadata=bearer(other)
                )
            assert caught.value.code() == grpc.StatusCode.NOT_FOUND
    finally:
        await running.server.stop(0.5)
    assert "PERMISSION_DENIED" in ended.abort_reason
    assert ended.steps[0].state == pb.USER_DELETION_STEP_STATE_FAILED
    assert all(s.state == pb.USER_DELETION_STEP_STATE_PENDING for s in ended.steps[1:])


async def test_a_failing_step_after_an_erasure_is_retried_not_aborted(
    new_database: Any, peers: FakePeers
) -> None:
    peers.state.refuse_purge["search"] = grpc.StatusCode.UNAVAILABLE
    running = await start_server(
        [_spec()], new_database, extra_env=saga_env(peers, await new_database("user"))
    )
    try:
        async with running.channel() as channel:
            users = user_service_pb2_grpc.UserServiceStub(channel)
            _, token = await register_and_login(users)
            started = await users.DeleteUser(
                pb.DeleteUserRequest(name="users/me"), metadata=bearer(token)
            )
            admin = await admin_token(users)
            async with asyncio.timeout(10):
                while True:
                    reply = await users.GetUserDeletion(
                        pb.GetUserDeletionRequest(name=started.deletion.name),
                        metadata=bearer(admin),
                    )
                    if reply.deletion.steps[2].attempts >= 2:
                        break
                    await asyncio.sleep(0.1)
            step = reply.deletion.steps[2]
            assert reply.deletion.state == pb.USER_DELETION_STATE_RUNNING
            assert step.state == pb.USER_DELETION_STEP_STATE_PENDING
            # The channel's own retries may run out the deadline first.
            assert step.last_error.split(":")[0] in ("UNAVAILABLE", "DEADLINE_EXCEEDED")
            peers.state.refuse_purge.clear()
            ended = await until_ended(running, started.deletion.name)
    finally:
        await running.server.stop(0.5)
    assert ended.state == pb.USER_DELETION_STATE_SUCCEEDED


async def test_peers_not_deployed_are_skipped_and_named(users: Any) -> None:
    _, token = await register_and_login(users)
    reply = await users.DeleteUser(pb.DeleteUserRequest(name="users/me"), metadata=bearer(token))
    deletion = reply.deletion
    assert deletion.state == pb.USER_DELETION_STATE_SUCCEEDED
    skipped = deletion.steps[:4]
    assert all(s.state == pb.USER_DELETION_STEP_STATE_SKIPPED for s in skipped)
    assert "AIMESH_CHAT_ADDRESS" in skipped[0].last_error
    assert deletion.steps[4].state == pb.USER_DELETION_STEP_STATE_SUCCEEDED


def _spec() -> Any:
    from aimesh_user.server import SPEC

    return SPEC


async def test_a_finished_deletion_leaves_no_user_id_in_the_audit_trail(
    new_database: Any, peers: FakePeers
) -> None:
    import asyncpg

    from aimesh_runtime import audit

    url = await new_database("user")
    running = await start_server([_spec()], new_database, extra_env=saga_env(peers, url))
    try:
        async with running.channel() as channel:
            users = user_service_pb2_grpc.UserServiceStub(channel)
            user, token = await register_and_login(users)
            started = await users.DeleteUser(
                pb.DeleteUserRequest(name="users/me"), metadata=bearer(token)
            )
            ended = await until_ended(running, started.deletion.name)
    finally:
        await running.server.stop(0.5)
    assert ended.state == pb.USER_DELETION_STATE_SUCCEEDED
    user_id = user.name.removeprefix("users/")
    connection = await asyncpg.connect(url)
    try:
        events = await connection.fetch("SELECT actor, target, details::text FROM audit_events")
        erased = [e for e in events if "erased-" in e["target"]]
        assert {e["target"] for e in erased} == {erased[0]["target"]}  # one pseudonym
        assert len(erased) >= 3  # registered, deletion started, deleted
        assert not any(user_id in "".join(map(str, e.values())) for e in events)
        assert await audit.verify(connection) == []
    finally:
        await connection.close()
