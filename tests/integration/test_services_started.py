"""Services whose behaviour is still to come: started, healthy, migrated, and honest
about what is missing. A service leaves this file when its issue builds it."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import asyncpg
import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from aimesh.notify.v1 import notify_service_pb2, notify_service_pb2_grpc
from aimesh.recommend.v1 import recommend_service_pb2, recommend_service_pb2_grpc
from aimesh.user.v1 import user_service_pb2 as user_pb
from aimesh_notify.server import SPEC as NOTIFY
from aimesh_recommend.server import SPEC as RECOMMEND
from aimesh_runtime.db import read_migrations
from tests.conftest import Running, bearer, register_and_login, start_server

# One cheap call per service, with the scope a member holds.
PROBES: dict[str, Any] = {
    "recommend": (
        RECOMMEND,
        lambda ch, md: recommend_service_pb2_grpc.RecommendServiceStub(ch).GetItem(
            recommend_service_pb2.GetItemRequest(name="items/i1"), metadata=md
        ),
    ),
    "notify": (
        NOTIFY,
        lambda ch, md: notify_service_pb2_grpc.NotifyServiceStub(ch).ListSubscriptions(
            notify_service_pb2.ListSubscriptionsRequest(), metadata=md
        ),
    ),
}


@pytest.fixture(scope="module", params=sorted(PROBES))
async def service(
    request: pytest.FixtureRequest, user_server: Running, new_database: Any
) -> AsyncIterator[tuple[str, Running]]:
    spec, _ = PROBES[request.param]
    running = await start_server(
        [spec],
        new_database,
        extra_env={
            "AIMESH_JWKS_URL": f"http://127.0.0.1:{user_server.http_port}/.well-known/jwks.json",
            "AIMESH_USER_ADDRESS": user_server.address,
        },
    )
    yield request.param, running
    await running.server.stop(0.5)


async def test_serving_with_reflection(service: tuple[str, Running]) -> None:
    name, running = service
    spec = PROBES[name][0]
    async with running.channel() as channel:
        health = health_pb2_grpc.HealthStub(channel)
        for target in ("", spec.services[0].full_name):
            reply = await health.Check(health_pb2.HealthCheckRequest(service=target))
            assert reply.status == health_pb2.HealthCheckResponse.SERVING
        reflection = reflection_pb2_grpc.ServerReflectionStub(channel)
        responses = reflection.ServerReflectionInfo(
            iter([reflection_pb2.ServerReflectionRequest(list_services="")])
        )
        listed = [s.name async for r in responses for s in r.list_services_response.service]
    assert spec.services[0].full_name in listed and "grpc.health.v1.Health" in listed


async def test_owns_a_migrated_database(service: tuple[str, Running]) -> None:
    name, running = service
    connection = await asyncpg.connect(running.environ[f"AIMESH_{name.upper()}_DATABASE_URL"])
    try:
        versions = await connection.fetch("SELECT version FROM schema_migrations ORDER BY version")
    finally:
        await connection.close()
    expected = [m.version for m in read_migrations(PROBES[name][0].migrations)]
    assert [row["version"] for row in versions] == expected


async def test_unbuilt_methods_say_unimplemented(service: tuple[str, Running], users: Any) -> None:
    name, running = service
    _, token = await register_and_login(users)
    async with running.channel() as channel:
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await PROBES[name][1](channel, bearer(token))
    assert caught.value.code() == grpc.StatusCode.UNIMPLEMENTED
    assert "not implemented yet" in (caught.value.details() or "")


async def test_auth_comes_before_unimplemented(service: tuple[str, Running]) -> None:
    name, running = service
    async with running.channel() as channel:
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await PROBES[name][1](channel, ())
    assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED


async def test_api_key_is_exchanged_with_the_user_service(
    service: tuple[str, Running], users: Any
) -> None:
    name, running = service
    _, token = await register_and_login(users)
    created = await users.CreateApiKey(
        user_pb.CreateApiKeyRequest(parent="users/me", api_key=user_pb.ApiKey(display_name="k")),
        metadata=bearer(token),
    )
    async with running.channel() as channel:
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await PROBES[name][1](channel, (("x-api-key", created.key),))
        # Authenticated through the exchange, then told the method is not built yet.
        assert caught.value.code() == grpc.StatusCode.UNIMPLEMENTED
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await PROBES[name][1](channel, (("x-api-key", created.key + "x"),))
        assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED
