"""The user-deletion saga end to end on the five real services (issue 17, item 5):
a user with data in search, recommend, chat and notify is deleted while
recommend is down; recommend is restarted mid-saga on the same port and
database; everything ends erased exactly once, the saga SUCCEEDED, and
user.deleted reaches a webhook once."""

from __future__ import annotations

import asyncio
import json
import socket
import uuid
from collections.abc import AsyncIterator
from typing import Any

import asyncpg
import grpc
import pytest

from aimesh.chat.v1 import chat_service_pb2 as chat_pb
from aimesh.chat.v1 import chat_service_pb2_grpc
from aimesh.notify.v1 import notify_service_pb2 as notify_pb
from aimesh.notify.v1 import notify_service_pb2_grpc
from aimesh.recommend.v1 import recommend_service_pb2 as rec_pb
from aimesh.recommend.v1 import recommend_service_pb2_grpc
from aimesh.search.v1 import search_service_pb2 as search_pb
from aimesh.search.v1 import search_service_pb2_grpc
from aimesh.user.v1 import user_service_pb2 as pb
from aimesh.user.v1 import user_service_pb2_grpc
from tests.conftest import Running, admin_token, bearer, register_and_login, start_server
from tests.fakes.webhook_receiver import WebhookReceiver

PEERS = ("chat", "recommend", "search", "notify")


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@pytest.fixture
async def receiver() -> AsyncIterator[WebhookReceiver]:
    server = await WebhookReceiver().start()
    yield server
    await server.stop()


async def test_deleting_a_user_across_the_five_services_survives_a_peer_restart(
    new_database: Any, receiver: WebhookReceiver
) -> None:
    from aimesh_chat.server import SPEC as CHAT
    from aimesh_notify.server import SPEC as NOTIFY
    from aimesh_recommend.server import SPEC as RECOMMEND
    from aimesh_search.server import SPEC as SEARCH
    from aimesh_user.server import SPEC as USER

    ports = {peer: free_port() for peer in PEERS}
    address = {peer: f"127.0.0.1:{port}" for peer, port in ports.items()}
    user_env = {
        **{f"AIMESH_{peer.upper()}_ADDRESS": address[peer] for peer in PEERS},
        "AIMESH_USER_DELETION_STEP_TIMEOUT_S": "2",
        "AIMESH_USER_DELETION_LEASE_S": "4",
        "AIMESH_USER_DELETION_RESUME_S": "0.2",
        "AIMESH_USER_DELETION_WAIT_S": "0",
        "AIMESH_USER_DELETION_RETRY_MAX_S": "0.5",
        "AIMESH_OUTBOX_POLL_S": "0.1",
    }
    # Peers first, on ports chosen ahead, so user's saga and outbox relay find them
    # at once (tokens are checked against user's JWKS only when calls come).
    user_grpc, user_http = free_port(), free_port()
    common = {
        "AIMESH_JWKS_URL": f"http://127.0.0.1:{user_http}/.well-known/jwks.json",
        "AIMESH_USER_ADDRESS": f"127.0.0.1:{user_grpc}",
    }
    started: list[Running] = []
    try:
        environments = {
            "search": common,
            "recommend": {**common, "AIMESH_SEARCH_ADDRESS": address["search"]},
            "chat": {**common, "AIMESH_SEARCH_ADDRESS": address["search"]},
            "notify": {
                **common,
                "AIMESH_NOTIFY_ALLOW_PRIVATE_WEBHOOKS": "1",
                "AIMESH_NOTIFY_POLL_S": "0.2",
                "AIMESH_NOTIFY_BACKOFF_BASE_S": "0.05",
            },
        }
        specs = {"search": SEARCH, "recommend": RECOMMEND, "chat": CHAT, "notify": NOTIFY}
        servers: dict[str, Running] = {}
        for peer in ("search", "recommend", "chat", "notify"):
            servers[peer] = await start_server(
                [specs[peer]], new_database, extra_env=environments[peer], grpc_port=ports[peer]
            )
            started.append(servers[peer])
        user = await start_server(
            [USER], new_database, extra_env=user_env, grpc_port=user_grpc, http_port=user_http
        )
        started.append(user)

        async with user.channel() as channel:
            users = user_service_pb2_grpc.UserServiceStub(channel)
            admin = bearer(await admin_token(users))
            member, token = await register_and_login(users)
            md = bearer(token)
        user_id = member.name.removeprefix("users/")

        # An admin's webhook for user.deleted; the member's data in every peer.
        async with servers["notify"].channel() as channel:
            notify = notify_service_pb2_grpc.NotifyServiceStub(channel)
            hook = await notify.CreateSubscription(
                notify_pb.CreateSubscriptionRequest(
                    subscription=notify_pb.Subscription(
                        topics=["user.deleted"],
                        webhook=notify_pb.WebhookChannel(url=receiver.url("/deleted")),
                    )
                ),
                metadata=admin,
            )
            receiver.secrets["/deleted"] = [hook.secret]
            await notify.CreateSubscription(
                notify_pb.CreateSubscriptionRequest(
                    subscription=notify_pb.Subscription(
                        topics=["e2e.mine"], stream=notify_pb.StreamChannel()
                    )
                ),
                metadata=md,
            )
        collection = f"e2e{uuid.uuid4().hex[:8]}"
        async with servers["search"].channel() as channel:
            search = search_service_pb2_grpc.SearchServiceStub(channel)
            await search.CreateCollection(
                search_pb.CreateCollectionRequest(
                    collection_id=collection, collection=search_pb.Collection()
                ),
                metadata=md,
            )
            await search.UpsertDocuments(
                search_pb.UpsertDocumentsRequest(
                    parent=f"collections/{collection}",
                    documents=[
                        search_pb.Document(
                            name=f"collections/{collection}/documents/d{n}", text=f"doc {n}"
                        )
                        for n in range(2)
                    ],
                ),
                metadata=md,
            )
        async with servers["recommend"].channel() as channel:
            recommend = recommend_service_pb2_grpc.RecommendServiceStub(channel)
            await recommend.RecordInteractions(
                rec_pb.RecordInteractionsRequest(
                    interactions=[
                        rec_pb.Interaction(
                            interaction_id=uuid.uuid4().hex,
                            user=member.name,
                            item=f"items/i{n}",
                            kind=rec_pb.INTERACTION_KIND_VIEW,
                        )
                        for n in range(3)
                    ]
                ),
                metadata=md,
            )
        async with servers["chat"].channel() as channel:
            chat = chat_service_pb2_grpc.ChatServiceStub(channel)
            await chat.CreateConversation(
                chat_pb.CreateConversationRequest(conversation=chat_pb.Conversation()),
                metadata=md,
            )

        # Recommend crashes; the saga starts, erases chat, and keeps failing on recommend.
        recommend_env = servers["recommend"].environ
        await servers["recommend"].server.stop(0)
        started.remove(servers["recommend"])
        async with user.channel() as channel:
            users = user_service_pb2_grpc.UserServiceStub(channel)
            deletion = (
                await users.DeleteUser(pb.DeleteUserRequest(name="users/me"), metadata=md)
            ).deletion
            async with asyncio.timeout(30):
                while True:
                    now = (
                        await users.GetUserDeletion(
                            pb.GetUserDeletionRequest(name=deletion.name), metadata=admin
                        )
                    ).deletion
                    if now.steps[1].attempts >= 2:  # recommend's step failed, is retrying
                        break
                    await asyncio.sleep(0.1)
            assert now.state == pb.USER_DELETION_STATE_RUNNING
            assert now.steps[0].state == pb.USER_DELETION_STEP_STATE_SUCCEEDED
            assert now.steps[2].state == pb.USER_DELETION_STEP_STATE_PENDING

            # Restarted on its port and database: the saga goes on and ends.
            servers["recommend"] = await start_server(
                [RECOMMEND], new_database, extra_env=recommend_env, grpc_port=ports["recommend"]
            )
            started.append(servers["recommend"])
            async with asyncio.timeout(60):
                while now.state == pb.USER_DELETION_STATE_RUNNING:
                    await asyncio.sleep(0.2)
                    now = (
                        await users.GetUserDeletion(
                            pb.GetUserDeletionRequest(name=deletion.name), metadata=admin
                        )
                    ).deletion
        assert now.state == pb.USER_DELETION_STATE_SUCCEEDED, now
        # Each peer erased what the user had, once: a repeat would count 0.
        counts = [s.deleted_count for s in now.steps]
        assert counts[:4] == [1, 3, 2, 1], counts  # conversations, interactions, docs, subs
        assert counts[-1] == 1  # the account

        # Nothing of the user is left in any service's database.
        queries = {
            "chat": "SELECT count(*) FROM conversations WHERE owner_id = $1",
            "recommend": "SELECT count(*) FROM interactions WHERE user_id = $1",
            "notify": "SELECT count(*) FROM subscriptions WHERE owner_id = $1",
        }
        for peer, query in queries.items():
            url = servers[peer].environ[f"AIMESH_{peer.upper()}_DATABASE_URL"]
            connection = await asyncpg.connect(url)
            try:
                key = member.name if peer == "recommend" else user_id
                assert await connection.fetchval(query, key) == 0, peer
            finally:
                await connection.close()
        async with servers["search"].channel() as channel:
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await search_service_pb2_grpc.SearchServiceStub(channel).GetDocument(
                    search_pb.GetDocumentRequest(name=f"collections/{collection}/documents/d0"),
                    metadata=admin,
                )
            assert caught.value.code() == grpc.StatusCode.NOT_FOUND

        # user.deleted, once: one event reached the webhook, and notify made one delivery.
        await receiver.wait_for(lambda: len(receiver.accepted) >= 1, timeout_s=30)
        events = {
            r.headers.get("aimesh-event-id")
            for r in receiver.requests
            if r.headers.get("aimesh-topic") == "user.deleted"
        }
        assert len(events) == 1
        body = json.loads(next(r.body for r in receiver.requests if r.path == "/deleted"))
        assert member.name in json.dumps(body)
        assert len(receiver.accepted) == 1
    finally:
        for running in reversed(started):
            await running.server.stop(0.5)
