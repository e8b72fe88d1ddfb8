"""Every method of every service, tried by one member on another member's objects.

The walk reads the methods from the contracts' descriptors, so a new method
joins it by itself: one whose ownership rule says it touches a user, an owned
object or the platform's objects needs an attack below (aimed at Alice's
object, or the platform's), or the walk fails. Bob, an ordinary member, must
get PERMISSION_DENIED, or NOT_FOUND where he may not learn the object exists,
and Alice's objects must read the same afterwards. Admins and service accounts
are checked to pass where the rules let them.
"""

from __future__ import annotations

import asyncio
import shutil
import socket
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import asyncpg
import grpc
import pytest
from google.protobuf import field_mask_pb2
from google.protobuf.descriptor import MethodDescriptor, ServiceDescriptor
from google.protobuf.message_factory import GetMessageClass

from aimesh.chat.v1 import chat_service_pb2 as chat_pb
from aimesh.chat.v1 import chat_service_pb2_grpc
from aimesh.notify.v1 import notify_service_pb2 as notify_pb
from aimesh.notify.v1 import notify_service_pb2_grpc
from aimesh.options.v1 import access_pb2
from aimesh.recommend.v1 import recommend_service_pb2 as rec_pb
from aimesh.recommend.v1 import recommend_service_pb2_grpc
from aimesh.search.v1 import search_service_pb2 as search_pb
from aimesh.search.v1 import search_service_pb2_grpc
from aimesh.user.v1 import user_service_pb2 as user_pb
from aimesh.user.v1 import user_service_pb2_grpc
from aimesh_notify.topics import app_namespace
from aimesh_runtime import db, outbox
from aimesh_runtime.config import database_env
from tests.conftest import (
    PLATFORM_SERVICES,
    Running,
    admin_token,
    bearer,
    platform_service_token,
    register_and_login,
    service_token,
    start_server,
)

SERVICES: list[ServiceDescriptor] = [
    user_pb.DESCRIPTOR.services_by_name["UserService"],
    search_pb.DESCRIPTOR.services_by_name["SearchService"],
    rec_pb.DESCRIPTOR.services_by_name["RecommendService"],
    chat_pb.DESCRIPTOR.services_by_name["ChatService"],
    notify_pb.DESCRIPTOR.services_by_name["NotifyService"],
]
TOUCHING = (access_pb2.OWNERSHIP_CALLER, access_pb2.OWNERSHIP_OWNED, access_pb2.OWNERSHIP_PLATFORM)
REFUSED = (grpc.StatusCode.PERMISSION_DENIED, grpc.StatusCode.NOT_FOUND)


@dataclass
class Alice:
    """Alice's objects, made by her before Bob tries them."""

    user: str  # users/{id}
    api_key: str  # users/{id}/apiKeys/{key}
    collection: str
    document: str
    conversation: str
    subscription: str
    topic: str
    deletion: str  # a deleted member's deletion: not Bob's either


# What Bob sends to each method that touches someone's objects: aimed at Alice's
# (or the platform's). A method missing here fails the walk.
ATTACKS: dict[str, Callable[[Alice], Any]] = {
    # user
    "RotateSigningKey": lambda a: user_pb.RotateSigningKeyRequest(),
    "GetUser": lambda a: user_pb.GetUserRequest(name=a.user),
    "ListUsers": lambda a: user_pb.ListUsersRequest(),
    "UpdateUser": lambda a: user_pb.UpdateUserRequest(
        user=user_pb.User(name=a.user, display_name="bob was here"),
        update_mask=field_mask_pb2.FieldMask(paths=["display_name"]),
    ),
    "DeleteUser": lambda a: user_pb.DeleteUserRequest(name=a.user),
    "CreateApiKey": lambda a: user_pb.CreateApiKeyRequest(
        parent=a.user, api_key=user_pb.ApiKey(display_name="bob's")
    ),
    "ListApiKeys": lambda a: user_pb.ListApiKeysRequest(parent=a.user),
    "RevokeApiKey": lambda a: user_pb.RevokeApiKeyRequest(name=a.api_key),
    "GetUserDeletion": lambda a: user_pb.GetUserDeletionRequest(name=a.deletion),
    # search
    "GetCollection": lambda a: search_pb.GetCollectionRequest(name=a.collection),
    "DeleteCollection": lambda a: search_pb.DeleteCollectionRequest(name=a.collection),
    "UpdateCollection": lambda a: search_pb.UpdateCollectionRequest(
        collection=search_pb.Collection(
            name=a.collection, visibility=search_pb.VISIBILITY_ORGANISATION
        ),
        update_mask=field_mask_pb2.FieldMask(paths=["visibility"]),
    ),
    "UpsertDocuments": lambda a: search_pb.UpsertDocumentsRequest(
        parent=a.collection,
        documents=[search_pb.Document(name=f"{a.collection}/documents/planted", text="lies")],
    ),
    "GetDocument": lambda a: search_pb.GetDocumentRequest(name=a.document),
    "ListDocuments": lambda a: search_pb.ListDocumentsRequest(parent=a.collection),
    "DeleteDocument": lambda a: search_pb.DeleteDocumentRequest(name=a.document),
    "Search": lambda a: search_pb.SearchRequest(parent=a.collection, query="secret", top_k=3),
    "BatchSearch": lambda a: search_pb.BatchSearchRequest(
        parent=a.collection,
        requests=[search_pb.SearchRequest(parent=a.collection, query="secret", top_k=3)],
    ),
    "ImportDocuments": lambda a: [
        search_pb.ImportDocumentsRequest(
            target=search_pb.ImportTarget(import_job=f"{a.collection}/importJobs/bob")
        ),
        search_pb.ImportDocumentsRequest(chunk=b'{"id": "planted", "text": "lies"}\n'),
    ],
    "GetImportJob": lambda a: search_pb.GetImportJobRequest(name=f"{a.collection}/importJobs/j"),
    "ListImportJobs": lambda a: search_pb.ListImportJobsRequest(parent=a.collection),
    "CancelImportJob": lambda a: search_pb.CancelImportJobRequest(
        name=f"{a.collection}/importJobs/j"
    ),
    # recommend
    "RecordInteractions": lambda a: rec_pb.RecordInteractionsRequest(
        interactions=[
            rec_pb.Interaction(
                interaction_id=uuid.uuid4().hex,
                user=a.user,
                item="items/poison",
                kind=rec_pb.INTERACTION_KIND_PURCHASE,
            )
        ]
    ),
    "UpsertItems": lambda a: rec_pb.UpsertItemsRequest(
        items=[rec_pb.Item(name="items/poison", text="buy this")]
    ),
    "DeleteItem": lambda a: rec_pb.DeleteItemRequest(name="items/walk"),
    "Recommend": lambda a: rec_pb.RecommendRequest(user=a.user, k=3),
    "TrainModel": lambda a: rec_pb.TrainModelRequest(
        training_job_id="bob", training_job=rec_pb.TrainingJob()
    ),
    "GetTrainingJob": lambda a: rec_pb.GetTrainingJobRequest(name="trainingJobs/any"),
    "CancelTrainingJob": lambda a: rec_pb.CancelTrainingJobRequest(name="trainingJobs/any"),
    # chat
    "GetConversation": lambda a: chat_pb.GetConversationRequest(name=a.conversation),
    "ListMessages": lambda a: chat_pb.ListMessagesRequest(parent=a.conversation),
    "StreamChat": lambda a: chat_pb.StreamChatRequest(conversation=a.conversation, message="hi"),
    "CancelChat": lambda a: chat_pb.CancelChatRequest(name=f"{a.conversation}/messages/m"),
    # notify
    "GetSubscription": lambda a: notify_pb.GetSubscriptionRequest(name=a.subscription),
    "UpdateSubscription": lambda a: notify_pb.UpdateSubscriptionRequest(
        subscription=notify_pb.Subscription(name=a.subscription, display_name="bob's"),
        update_mask=field_mask_pb2.FieldMask(paths=["display_name"]),
    ),
    "DeleteSubscription": lambda a: notify_pb.DeleteSubscriptionRequest(name=a.subscription),
    "RotateSubscriptionSecret": lambda a: notify_pb.RotateSubscriptionSecretRequest(
        name=a.subscription
    ),
    "Publish": lambda a: notify_pb.PublishRequest(
        topic=a.topic, idempotency_key=uuid.uuid4().hex, payload=b"{}"
    ),
    "PublishBatch": lambda a: notify_pb.PublishBatchRequest(
        requests=[
            notify_pb.PublishRequest(
                topic="user.deleted", idempotency_key=uuid.uuid4().hex, payload=b"{}"
            )
        ]
    ),
    "Subscribe": lambda a: notify_pb.SubscribeRequest(subscription=a.subscription),
    "ListDeliveries": lambda a: notify_pb.ListDeliveriesRequest(parent=a.subscription),
    "RedriveDeadLetters": lambda a: notify_pb.RedriveDeadLettersRequest(parent=a.subscription),
    "CreateTopicGrant": lambda a: notify_pb.CreateTopicGrantRequest(
        topic_grant=notify_pb.TopicGrant(topic_prefix="orders.", grantee="users/bob")
    ),
    "ListTopicGrants": lambda a: notify_pb.ListTopicGrantsRequest(),
    "DeleteTopicGrant": lambda a: notify_pb.DeleteTopicGrantRequest(name="topicGrants/any"),
}


@dataclass
class Platform:
    channels: dict[str, grpc.aio.Channel]  # by service full name
    environ: dict[str, str]  # the servers' settings, with every database URL

    def stub(self, service: ServiceDescriptor) -> Any:
        stubs = {
            "UserService": user_service_pb2_grpc.UserServiceStub,
            "SearchService": search_service_pb2_grpc.SearchServiceStub,
            "RecommendService": recommend_service_pb2_grpc.RecommendServiceStub,
            "ChatService": chat_service_pb2_grpc.ChatServiceStub,
            "NotifyService": notify_service_pb2_grpc.NotifyServiceStub,
        }
        return stubs[service.name](self.channels[service.full_name])


@pytest.fixture(scope="module")
async def platform(user_server: Running, new_database: Any) -> AsyncIterator[Platform]:
    from aimesh_chat.server import SPEC as CHAT
    from aimesh_notify.server import SPEC as NOTIFY
    from aimesh_recommend.server import SPEC as RECOMMEND
    from aimesh_search.server import SPEC as SEARCH

    rest_port = free_port()
    env = {
        "AIMESH_JWKS_URL": f"http://127.0.0.1:{user_server.http_port}/.well-known/jwks.json",
        "AIMESH_USER_ADDRESS": user_server.address,
        # Every outbox relays to the notify below, each with its service's own key.
        "AIMESH_NOTIFY_ADDRESS": f"127.0.0.1:{rest_port}",
        "AIMESH_OUTBOX_POLL_S": "0.2",
    }
    # Search first: chat and recommend call it, with the caller's credentials.
    search = await start_server([SEARCH], new_database, extra_env=env)
    # Several services in one process, as the monolith runs them.
    rest = await start_server(
        [RECOMMEND, CHAT, NOTIFY],
        new_database,
        extra_env={**env, "AIMESH_SEARCH_ADDRESS": search.address},
        grpc_port=rest_port,
    )
    channels = {
        "user": user_server.channel(),
        "search": search.channel(),
        "rest": rest.channel(),
    }
    by_service = {
        SERVICES[0].full_name: channels["user"],
        SERVICES[1].full_name: channels["search"],
        **{s.full_name: channels["rest"] for s in SERVICES[2:]},
    }
    try:
        yield Platform(by_service, {**rest.environ, **search.environ})
    finally:
        for channel in channels.values():
            await channel.close()
        await rest.server.stop(0.5)
        await search.server.stop(0.5)


async def call(stub: Any, method: MethodDescriptor, request: Any, metadata: Any) -> Any:
    """Make the call whatever its shape; the first response of a stream."""
    function = getattr(stub, method.name)
    if method.client_streaming:

        async def requests() -> AsyncIterator[Any]:
            for message in request:
                yield message

        return await function(requests(), metadata=metadata)
    if method.server_streaming:
        async for response in function(request, metadata=metadata):
            return response
        return None
    return await function(request, metadata=metadata)


async def snapshot(platform: Platform, alice: Alice, md: Any) -> list[Any]:
    """Alice's objects as she reads them (volatile fields left out)."""
    user, search, rec, chat, notify = (platform.stub(s) for s in SERVICES)
    recommended = await rec.Recommend(rec_pb.RecommendRequest(user=alice.user, k=5), metadata=md)
    return [
        await user.GetUser(user_pb.GetUserRequest(name=alice.user), metadata=md),
        [
            k.name
            for k in (
                await user.ListApiKeys(user_pb.ListApiKeysRequest(parent=alice.user), metadata=md)
            ).api_keys
            if not k.HasField("revoke_time")
        ],
        await search.GetCollection(
            search_pb.GetCollectionRequest(name=alice.collection), metadata=md
        ),
        await search.ListDocuments(
            search_pb.ListDocumentsRequest(parent=alice.collection), metadata=md
        ),
        await chat.GetConversation(
            chat_pb.GetConversationRequest(name=alice.conversation), metadata=md
        ),
        await chat.ListMessages(
            chat_pb.ListMessagesRequest(parent=alice.conversation), metadata=md
        ),
        await notify.GetSubscription(
            notify_pb.GetSubscriptionRequest(name=alice.subscription), metadata=md
        ),
        [item.name for item in recommended.items],
        await rec.ListItems(rec_pb.ListItemsRequest(), metadata=md),
    ]


async def make_alice(platform: Platform, users: Any, md: Any, admin: Any) -> Alice:
    user, search, rec, chat, notify = (platform.stub(s) for s in SERVICES)
    me = (await user.GetUser(user_pb.GetUserRequest(name="users/me"), metadata=md)).user
    key = await user.CreateApiKey(
        user_pb.CreateApiKeyRequest(parent="users/me", api_key=user_pb.ApiKey(display_name="k")),
        metadata=md,
    )
    collection_id = f"alice{uuid.uuid4().hex[:8]}"
    await search.CreateCollection(
        search_pb.CreateCollectionRequest(
            collection_id=collection_id, collection=search_pb.Collection(display_name="private")
        ),
        metadata=md,
    )
    collection = f"collections/{collection_id}"
    document = f"{collection}/documents/d1"
    await search.UpsertDocuments(
        search_pb.UpsertDocumentsRequest(
            parent=collection,
            documents=[search_pb.Document(name=document, text="Alice's secret plans")],
        ),
        metadata=md,
    )
    conversation = (
        await chat.CreateConversation(
            chat_pb.CreateConversationRequest(conversation=chat_pb.Conversation(display_name="c")),
            metadata=md,
        )
    ).conversation.name
    subscription = (
        await notify.CreateSubscription(
            notify_pb.CreateSubscriptionRequest(
                subscription=notify_pb.Subscription(
                    display_name="s", topics=["apps.*"], stream=notify_pb.StreamChannel()
                )
            ),
            metadata=md,
        )
    ).subscription.name
    # A catalogue item, the platform's, made by the admin.
    await rec.UpsertItems(
        rec_pb.UpsertItemsRequest(items=[rec_pb.Item(name="items/walk", text="a walk")]),
        metadata=admin,
    )
    # Carol deletes herself: her deletion is someone else's for Bob too.
    carol, carol_token = await register_and_login(users)
    deleted = await user.DeleteUser(
        user_pb.DeleteUserRequest(name=carol.name), metadata=bearer(carol_token)
    )
    namespace = app_namespace(me.name.removeprefix("users/"))
    assert namespace is not None
    return Alice(
        user=me.name,
        api_key=key.api_key.name,
        collection=collection,
        document=document,
        conversation=conversation,
        subscription=subscription,
        topic=namespace + "walk.done",
        deletion=deleted.deletion.name,
    )


async def test_no_member_touches_another_members_or_the_platforms_objects(
    platform: Platform, users: Any
) -> None:
    _, alice_token = await register_and_login(users)
    _, bob_token = await register_and_login(users)
    alice_md, bob_md = bearer(alice_token), bearer(bob_token)
    admin = bearer(await admin_token(users))
    alice = await make_alice(platform, users, alice_md, admin)
    before = await snapshot(platform, alice, alice_md)

    walked, missing = [], []
    for service in SERVICES:
        stub = platform.stub(service)
        for method in service.methods:
            access = method.GetOptions().Extensions[access_pb2.access]
            if access.ownership not in TOUCHING:
                assert access.ownership == access_pb2.OWNERSHIP_NONE, method.full_name
                continue
            attack = ATTACKS.get(method.name)
            if method.name == "PurgeUserData":  # every service has one, the same shape
                request = GetMessageClass(method.input_type)(user=alice.user)
            elif attack is not None:
                request = attack(alice)
            else:
                missing.append(method.full_name)
                continue
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await call(stub, method, request, bob_md)
            code = refused.value.code()
            assert code in REFUSED, f"{method.full_name}: {code} {refused.value.details()}"
            walked.append(method.full_name)
    assert not missing, f"no attack for {missing}: add one to ATTACKS"
    assert len(walked) >= 40
    assert await snapshot(platform, alice, alice_md) == before


async def test_admins_and_service_accounts_pass_where_the_rules_let_them(
    platform: Platform, users: Any
) -> None:
    user, search, rec, _, notify = (platform.stub(s) for s in SERVICES)
    _, alice_token = await register_and_login(users)
    alice_md = bearer(alice_token)
    admin = bearer(await admin_token(users))
    service = bearer(await service_token(users))
    me = (await user.GetUser(user_pb.GetUserRequest(name="users/me"), metadata=alice_md)).user
    collection_id = f"shared{uuid.uuid4().hex[:8]}"
    await search.CreateCollection(
        search_pb.CreateCollectionRequest(
            collection_id=collection_id, collection=search_pb.Collection()
        ),
        metadata=alice_md,
    )
    shared = f"collections/{collection_id}"
    _, bob_token = await register_and_login(users)
    bob = bearer(bob_token)
    # Private until its owner shares it.
    with pytest.raises(grpc.aio.AioRpcError) as hidden:
        await search.GetCollection(search_pb.GetCollectionRequest(name=shared), metadata=bob)
    assert hidden.value.code() == grpc.StatusCode.NOT_FOUND
    share = search_pb.UpdateCollectionRequest(
        collection=search_pb.Collection(name=shared, visibility=search_pb.VISIBILITY_ORGANISATION),
        update_mask=field_mask_pb2.FieldMask(paths=["visibility"]),
    )
    updated = await search.UpdateCollection(share, metadata=alice_md)
    assert updated.collection.visibility == search_pb.VISIBILITY_ORGANISATION
    assert updated.collection.owner == me.name
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await search.UpdateCollection(share, metadata=bob)
    assert refused.value.code() == grpc.StatusCode.PERMISSION_DENIED
    # Shared: Bob reads and lists it, but cannot write into it.
    await search.GetCollection(search_pb.GetCollectionRequest(name=shared), metadata=bob)
    listed = await search.ListCollections(search_pb.ListCollectionsRequest(), metadata=bob)
    assert shared in [c.name for c in listed.collections]
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await search.UpsertDocuments(
            search_pb.UpsertDocumentsRequest(
                parent=shared,
                documents=[search_pb.Document(name=f"{shared}/documents/x", text="t")],
            ),
            metadata=bob,
        )
    assert refused.value.code() == grpc.StatusCode.PERMISSION_DENIED
    # Admins and service accounts act for the platform.
    await search.UpsertDocuments(
        search_pb.UpsertDocumentsRequest(
            parent=shared, documents=[search_pb.Document(name=f"{shared}/documents/x", text="t")]
        ),
        metadata=service,
    )
    await rec.Recommend(rec_pb.RecommendRequest(user=me.name, k=3), metadata=admin)
    await rec.RecordInteractions(
        rec_pb.RecordInteractionsRequest(
            interactions=[
                rec_pb.Interaction(
                    interaction_id=uuid.uuid4().hex,
                    user=me.name,
                    item="items/walk",
                    kind=rec_pb.INTERACTION_KIND_VIEW,
                )
            ]
        ),
        metadata=service,
    )
    # The platform's topics: only the owning service's own account publishes them.
    search_account = bearer(await platform_service_token(users, "search"))
    event = await notify.Publish(
        notify_pb.PublishRequest(topic="search.walked", idempotency_key=uuid.uuid4().hex),
        metadata=search_account,
    )
    assert event.event.publisher == "users/service-search"
    forgeries = [
        (search_account, "user.deleted"),  # another service's topic
        (service, "search.walked"),  # a service account, but not search's
        (admin, "search.walked"),
    ]
    for who, topic in forgeries:
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await notify.Publish(
                notify_pb.PublishRequest(topic=topic, idempotency_key=uuid.uuid4().hex),
                metadata=who,
            )
        assert refused.value.code() == grpc.StatusCode.PERMISSION_DENIED, topic


async def test_chat_grounds_only_on_what_the_caller_may_read(
    platform: Platform, users: Any
) -> None:
    _, search, _, chat, _ = (platform.stub(s) for s in SERVICES)
    _, alice_token = await register_and_login(users)
    _, bob_token = await register_and_login(users)
    alice, bob = bearer(alice_token), bearer(bob_token)
    collection_id = f"grounds{uuid.uuid4().hex[:8]}"
    await search.CreateCollection(
        search_pb.CreateCollectionRequest(
            collection_id=collection_id, collection=search_pb.Collection()
        ),
        metadata=alice,
    )
    collection = f"collections/{collection_id}"
    await search.UpsertDocuments(
        search_pb.UpsertDocumentsRequest(
            parent=collection,
            documents=[
                search_pb.Document(name=f"{collection}/documents/d", text="The vault code is 7341.")
            ],
        ),
        metadata=alice,
    )

    async def ask(md: Any) -> list[Any]:
        conversation = await chat.CreateConversation(
            chat_pb.CreateConversationRequest(conversation=chat_pb.Conversation()), metadata=md
        )
        request = chat_pb.StreamChatRequest(
            conversation=conversation.conversation.name,
            message="What is the vault code?",
            collection=collection,
        )
        return [response async for response in chat.StreamChat(request, metadata=md)]

    answered = await ask(alice)  # chat searched with Alice's credentials: her collection
    assert any("7341" in str(response) for response in answered)
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await ask(bob)
    assert refused.value.code() == grpc.StatusCode.NOT_FOUND


async def test_collections_from_before_owners_become_the_platforms_and_stay_readable(
    new_database: Any, tmp_path: Path
) -> None:
    from aimesh_search.server import SPEC as SEARCH

    before = tmp_path / "before"
    before.mkdir()
    for migration in sorted(SEARCH.migrations.glob("*.sql")):
        if migration.name < "0003":
            shutil.copy(migration, before)
    pool = await db.create_pool(await new_database("search"))
    try:
        await db.migrate(pool, before)
        await pool.execute(
            "INSERT INTO collections (id, embedding_model, dimension, max_input_tokens)"
            " VALUES ('old', 'm', 3, 8)"
        )
        await db.migrate(pool, SEARCH.migrations)
        await pool.execute(
            "INSERT INTO collections (id, embedding_model, dimension, max_input_tokens, owner)"
            " VALUES ('new', 'm', 3, 8, 'users/a')"
        )
        rows = await pool.fetch("SELECT id, owner, visibility FROM collections ORDER BY id")
        assert [tuple(row) for row in rows] == [
            ("new", "users/a", "PRIVATE"),
            ("old", "", "ORGANISATION"),
        ]
    finally:
        await pool.close()


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


async def test_each_outbox_publishes_its_services_topics_with_its_own_account(
    platform: Platform,
) -> None:
    """search alone, and recommend, chat and notify in one process: each relay sends
    its own service's key, so notify takes each service's topics from it alone."""
    for service in PLATFORM_SERVICES:
        conn = await asyncpg.connect(platform.environ[database_env(service)])
        try:
            async with conn.transaction():
                await outbox.emit(conn, topic=f"{service}.walked", key="k", payload={})
        finally:
            await conn.close()
    conn = await asyncpg.connect(platform.environ[database_env("notify")])
    try:
        async with asyncio.timeout(20):
            while True:
                rows = await conn.fetch(
                    "SELECT topic, publisher FROM events WHERE topic LIKE '%.walked'"
                    " AND idempotency_key LIKE '%:outbox:%'"
                )
                if len(rows) == len(PLATFORM_SERVICES):
                    break
                await asyncio.sleep(0.1)
    finally:
        await conn.close()
    assert sorted((r["topic"], r["publisher"]) for r in rows) == sorted(
        (f"{s}.walked", f"users/service-{s}") for s in PLATFORM_SERVICES
    )


async def test_members_cannot_take_the_platforms_collection_ids(
    platform: Platform, users: Any
) -> None:
    search = platform.stub(SERVICES[1])
    _, token = await register_and_login(users)
    member = bearer(token)
    for collection_id in ("recommend-items", "Recommend-Items", f"platform-{uuid.uuid4().hex[:8]}"):
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await search.CreateCollection(
                search_pb.CreateCollectionRequest(
                    collection_id=collection_id, collection=search_pb.Collection()
                ),
                metadata=member,
            )
        assert refused.value.code() == grpc.StatusCode.PERMISSION_DENIED, collection_id
    for who in (bearer(await admin_token(users)), bearer(await service_token(users))):
        created = await search.CreateCollection(
            search_pb.CreateCollectionRequest(
                collection_id=f"platform-{uuid.uuid4().hex[:8]}", collection=search_pb.Collection()
            ),
            metadata=who,
        )
        assert created.collection.name.startswith("collections/platform-")
