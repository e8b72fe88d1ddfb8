"""A short form of `scripts/bench chaos` in the suite (issue 17, item 6).

Search injects faults for the chaos traffic (10% of calls aborted UNAVAILABLE,
10% held 2 s); recommend is stopped without a drain under load and started again
on its port. The caller of tests/load/bench_chaos.py (breaker, fallback,
retries) must see no failure, send nothing to recommend while its breaker is
open, and get real answers again within 10 s of the restart."""

from __future__ import annotations

import asyncio
import socket
from argparse import Namespace
from collections.abc import AsyncIterator
from typing import Any

import pytest

from aimesh.user.v1 import user_service_pb2 as user_pb
from tests.conftest import Running, admin_token, bearer, start_server
from tests.load.bench_chaos import SEARCH_FAULTS, Caller, drive, setup_data

LOAD = Namespace(rate=40.0, duration=6.0, kill_at=1.5, restart_at=3.0)
RECOVERY_S = 10.0


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@pytest.fixture
async def search(user_server: Running, new_database: Any) -> AsyncIterator[Running]:
    from aimesh_search.server import SPEC

    running = await start_server(
        [SPEC], new_database, extra_env={**peer_env(user_server), **SEARCH_FAULTS}
    )
    yield running
    await running.server.stop(0.5)


def peer_env(user_server: Running) -> dict[str, str]:
    return {
        "AIMESH_JWKS_URL": f"http://127.0.0.1:{user_server.http_port}/.well-known/jwks.json",
        "AIMESH_USER_ADDRESS": user_server.address,
        "AIMESH_RATE_LIMIT_RPS": "100000",
        "AIMESH_RATE_LIMIT_BURST": "100000",
    }


async def test_killing_recommend_and_faulty_search_stay_invisible_to_users(
    user_server: Running, users: Any, search: Running, new_database: Any
) -> None:
    from aimesh_recommend.server import SPEC

    port = free_port()
    env = {**peer_env(user_server), "AIMESH_SEARCH_ADDRESS": search.address}
    recommend = await start_server([SPEC], new_database, extra_env=env, grpc_port=port)
    token = await admin_token(users)
    me = await users.GetUser(user_pb.GetUserRequest(name="users/me"), metadata=bearer(token))
    addresses = {
        "user": user_server.address,
        "search": search.address,
        "recommend": recommend.address,
    }
    await setup_data(addresses, token)
    caller = Caller(addresses, token)
    stopping: list[asyncio.Task[None]] = []

    def kill() -> None:
        # stop(0) answers calls in flight with CANCELLED, which a real crash (the SIGKILL of
        # `scripts/bench chaos`) never sends. The grace outlives the caller's 1 s deadline, so
        # no call is cancelled by the server however slow the machine; new calls find it gone.
        stopping.append(asyncio.create_task(recommend.server.stop(2.0)))
        caller.killed_at = asyncio.get_running_loop().time()

    async def restart() -> None:
        nonlocal recommend
        await asyncio.gather(*stopping)
        recommend = await start_server(
            [SPEC], new_database, extra_env=recommend.environ, grpc_port=port
        )

    try:
        await drive(LOAD, caller, restart, kill, me.user.name)
    finally:
        await caller.close()
        await asyncio.gather(*stopping)
        await recommend.server.stop(0.5)
    counts = caller.counts
    assert counts.get("user_visible_failures", 0) == 0, dict(counts)
    assert caller.killed_at is not None and caller.opened_after, "the breaker never opened"
    assert caller.sent_while_open == 0
    assert caller.recovered_at is not None and caller.restarted_at is not None
    assert caller.recovered_at - caller.restarted_at <= RECOVERY_S
    # The faults were there to absorb: some searches were aborted or held.
    assert counts["search:ok"] > 0 and any(k.startswith("recommend:fallback") for k in counts)
