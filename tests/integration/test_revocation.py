"""A deleted user's tokens and API keys stop working in every service.

User, search and notify run for real (search and notify in one process, each
with its own database), verifying tokens against the user service's JWKS
document, which also lists who was disabled or deleted.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import grpc
import pytest
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from aimesh.notify.v1 import notify_service_pb2 as notify_pb
from aimesh.notify.v1 import notify_service_pb2_grpc
from aimesh.search.v1 import search_service_pb2 as search_pb
from aimesh.search.v1 import search_service_pb2_grpc
from aimesh.user.v1 import user_service_pb2 as user_pb
from aimesh.user.v1 import user_service_pb2_grpc
from tests.conftest import Running, bearer, register_and_login, start_server


@pytest.fixture(scope="module")
async def peers(new_database: Any, user_server: Running) -> AsyncIterator[Running]:
    from aimesh_notify.server import SPEC as NOTIFY
    from aimesh_search.server import SPEC as SEARCH

    running = await start_server(
        [SEARCH, NOTIFY],
        new_database,
        extra_env={
            "AIMESH_JWKS_URL": f"http://127.0.0.1:{user_server.http_port}/.well-known/jwks.json",
            "AIMESH_USER_ADDRESS": user_server.address,
        },
    )
    yield running
    await running.server.stop(0.5)


def reason_of(error: grpc.aio.AioRpcError) -> str:
    status = rpc_status.from_call(error)
    assert status is not None
    for detail in status.details:
        if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
            info = error_details_pb2.ErrorInfo()
            detail.Unpack(info)
            return str(info.reason)
    return ""


async def test_a_deleted_users_token_and_key_are_refused_everywhere(
    users: user_service_pb2_grpc.UserServiceStub, peers: Running
) -> None:
    gone, token = await register_and_login(users)
    _, other_token = await register_and_login(users)
    created = await users.CreateApiKey(
        user_pb.CreateApiKeyRequest(
            parent="users/me", api_key=user_pb.ApiKey(display_name="ci", scopes=["search.read"])
        ),
        metadata=bearer(token),
    )
    as_key = (("x-api-key", created.key),)
    async with peers.channel() as channel:
        search = search_service_pb2_grpc.SearchServiceStub(channel)
        notify = notify_service_pb2_grpc.NotifyServiceStub(channel)

        def create_collection(metadata: Any, name: str) -> Any:
            return search.CreateCollection(
                search_pb.CreateCollectionRequest(
                    collection_id=name, collection=search_pb.Collection()
                ),
                metadata=metadata,
            )

        def create_stream(metadata: Any) -> Any:
            subscription = notify_pb.Subscription(topics=["t.x"], stream=notify_pb.StreamChannel())
            return notify.CreateSubscription(
                notify_pb.CreateSubscriptionRequest(subscription=subscription), metadata=metadata
            )

        # Before: the token and the key work, and their principals are cached.
        await create_collection(bearer(token), f"before-{gone.name[6:14]}")
        await create_stream(bearer(token))
        listed = search.ListCollections(search_pb.ListCollectionsRequest(), metadata=as_key)
        await listed

        deletion = await users.DeleteUser(
            user_pb.DeleteUserRequest(name="users/me"), metadata=bearer(token)
        )
        assert deletion.deletion.state == user_pb.USER_DELETION_STATE_SUCCEEDED

        # After: refused by every service, for the token and the cached key alike,
        # and nothing can be created under the erased user.
        refused = [
            users.GetUser(user_pb.GetUserRequest(name="users/me"), metadata=bearer(token)),
            create_collection(bearer(token), f"after-{gone.name[6:14]}"),
            create_stream(bearer(token)),
            search.ListCollections(search_pb.ListCollectionsRequest(), metadata=as_key),
            notify.ListSubscriptions(notify_pb.ListSubscriptionsRequest(), metadata=bearer(token)),
        ]
        for call in refused:
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await call
            assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED
            assert reason_of(caught.value) in ("TOKEN_REVOKED", "API_KEY_INVALID")
        # Someone else's token is untouched.
        await create_collection(bearer(other_token), f"other-{gone.name[6:14]}")
