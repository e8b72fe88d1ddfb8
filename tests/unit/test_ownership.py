"""The ownership rules as the pipeline enforces them, on the real contracts' rules."""

from __future__ import annotations

import pytest

from aimesh.chat.v1 import chat_service_pb2
from aimesh.notify.v1 import notify_service_pb2 as notify_pb
from aimesh.recommend.v1 import recommend_service_pb2 as rec_pb
from aimesh.search.v1 import search_service_pb2 as search_pb
from aimesh.webhooks import WebhookError
from aimesh.webhooks import verify as verify_webhook
from aimesh_notify.signing import Signed, new_secret, signature_header
from aimesh_notify.topics import Topics, app_namespace
from aimesh_runtime.auth import Principal
from aimesh_runtime.errors import NotFound, PermissionDenied, ServiceError
from aimesh_runtime.ownership import (
    SERVICE_SCOPE,
    Owner,
    OwnerResolver,
    OwnershipGuard,
    rules_for,
    service_scope,
)
from tests.unit.test_contracts import SERVICES

ALICE = Principal("alice", frozenset({"search.write", "recommend.write"}), "jwt")
BOB = Principal("bob", frozenset({"search.write", "recommend.write"}), "jwt")
ADMIN = Principal("root", frozenset({"search.admin", "recommend.admin", "notify.admin"}), "jwt")
SERVICE = Principal("svc", frozenset({SERVICE_SCOPE}), "api_key")
OWNERS = {
    "collections/private": Owner("alice"),
    "collections/shared": Owner("alice", shared=True),
}


async def collection_owner(name: str) -> Owner | None:
    return OWNERS.get("/".join(name.split("/")[:2]))


def hidden(name: str) -> ServiceError:
    return NotFound(f"{name} does not exist", reason="HIDDEN")


class Grants:
    """The one grant an admin made: c3d4 may publish under orders.eu."""

    async def all_topic_grants(self) -> list[tuple[str, str]]:
        return [("orders.eu.", "c3d4")]


GUARD = OwnershipGuard(
    rules_for(SERVICES),
    {
        "collections": OwnerResolver(collection_owner, hidden),
        "topic": OwnerResolver(Topics(Grants()).owner, hidden),  # type: ignore[arg-type]
    },
)
SEARCH = "/aimesh.search.v1.SearchService/"
REC = "/aimesh.recommend.v1.RecommendService/"
NOTIFY = "/aimesh.notify.v1.NotifyService/"


async def refused(method: str, who: Principal, request: object) -> ServiceError:
    with pytest.raises(ServiceError) as caught:
        await GUARD.check(method, who, request)
    return caught.value


async def test_owned_objects_hidden_shared_read_only_and_open_to_admins_and_services() -> None:
    private = search_pb.SearchRequest(parent="collections/private", query="q")
    shared = search_pb.SearchRequest(parent="collections/shared", query="q")
    await GUARD.check(SEARCH + "Search", ALICE, private)
    error = await refused(SEARCH + "Search", BOB, private)
    assert isinstance(error, NotFound) and error.reason == "HIDDEN"  # reads as absent
    await GUARD.check(SEARCH + "Search", BOB, shared)
    write = search_pb.UpsertDocumentsRequest(parent="collections/shared")
    assert isinstance(await refused(SEARCH + "UpsertDocuments", BOB, write), PermissionDenied)
    for privileged in (ADMIN, SERVICE):
        delete = search_pb.DeleteCollectionRequest(name="collections/private")
        await GUARD.check(SEARCH + "DeleteCollection", privileged, delete)
    # A missing collection is the handler's NOT_FOUND to give.
    await GUARD.check(
        SEARCH + "GetCollection", BOB, search_pb.GetCollectionRequest(name="collections/gone")
    )


async def test_names_under_a_collection_resolve_to_it() -> None:
    name = "collections/private/documents/d1"
    error = await refused(
        SEARCH + "DeleteDocument", BOB, search_pb.DeleteDocumentRequest(name=name)
    )
    assert isinstance(error, NotFound)
    target = search_pb.ImportDocumentsRequest(
        target=search_pb.ImportTarget(import_job="collections/private/importJobs/j")
    )
    assert isinstance(await refused(SEARCH + "ImportDocuments", BOB, target), NotFound)


async def test_caller_rules_check_every_element_and_rewrite_me() -> None:
    def record(*users: str) -> rec_pb.RecordInteractionsRequest:
        return rec_pb.RecordInteractionsRequest(
            interactions=[rec_pb.Interaction(user=u, item="items/i") for u in users]
        )

    mine = record("users/me", "users/alice")
    await GUARD.check(REC + "RecordInteractions", ALICE, mine)
    assert [i.user for i in mine.interactions] == ["users/alice", "users/alice"]
    error = await refused(REC + "RecordInteractions", ALICE, record("users/alice", "users/bob"))
    assert isinstance(error, PermissionDenied) and error.reason == "NOT_OWNER"
    await GUARD.check(REC + "RecordInteractions", SERVICE, record("users/bob", "users/carol"))
    await GUARD.check(REC + "Recommend", ADMIN, rec_pb.RecommendRequest(user="users/bob"))
    error = await refused(REC + "Recommend", ALICE, rec_pb.RecommendRequest(user="users/bob"))
    assert isinstance(error, PermissionDenied)


async def test_platform_methods_are_for_admins_and_services() -> None:
    upsert = rec_pb.UpsertItemsRequest()
    error = await refused(REC + "UpsertItems", ALICE, upsert)
    assert isinstance(error, PermissionDenied) and error.reason == "PLATFORM_ONLY"
    await GUARD.check(REC + "UpsertItems", ADMIN, upsert)
    await GUARD.check(REC + "UpsertItems", SERVICE, upsert)


async def test_topics_platform_for_services_apps_for_their_member() -> None:
    def publish(*topics: str) -> notify_pb.PublishBatchRequest:
        return notify_pb.PublishBatchRequest(
            requests=[notify_pb.PublishRequest(topic=t) for t in topics]
        )

    forged = publish("user.deleted")
    search = Principal("service-search", frozenset({SERVICE_SCOPE, service_scope("search")}), "jwt")
    # Any service account but the user service's own is refused too.
    for who in (ALICE, ADMIN, SERVICE, search):
        error = await refused(NOTIFY + "PublishBatch", who, forged)
        assert isinstance(error, PermissionDenied) and error.reason == "RESERVED_TO_SERVICES"
    user = Principal("service-user", frozenset({SERVICE_SCOPE, service_scope("user")}), "jwt")
    await GUARD.check(NOTIFY + "PublishBatch", user, forged)
    await GUARD.check(NOTIFY + "PublishBatch", search, publish("search.import_finished"))
    error = await refused(NOTIFY + "PublishBatch", search, publish("search.x", "chat.y"))
    assert isinstance(error, PermissionDenied) and error.metadata == {"service": "chat"}
    member = Principal("a1b2", frozenset(), "jwt")
    namespace = app_namespace("a1b2")
    assert namespace == "apps.ua1b2."
    await GUARD.check(NOTIFY + "PublishBatch", member, publish(namespace + "order.paid"))
    stranger = Principal("c3d4", frozenset(), "jwt")
    error = await refused(
        NOTIFY + "Publish", stranger, notify_pb.PublishRequest(topic="apps.ua1b2.x")
    )
    assert isinstance(error, PermissionDenied)
    error = await refused(NOTIFY + "Publish", member, notify_pb.PublishRequest(topic="orders.paid"))
    assert isinstance(error, PermissionDenied)
    await GUARD.check(NOTIFY + "Publish", ADMIN, notify_pb.PublishRequest(topic="orders.paid"))
    granted = notify_pb.PublishRequest(topic="orders.eu.paid")
    await GUARD.check(NOTIFY + "Publish", stranger, granted)
    assert isinstance(await refused(NOTIFY + "Publish", member, granted), PermissionDenied)
    assert app_namespace("Has-Dash") is None


async def test_methods_of_no_contract_are_refused() -> None:
    request = chat_service_pb2.GetConversationRequest(name="conversations/c")
    with pytest.raises(PermissionDenied):
        await GUARD.check("/x.v1.Unknown/Do", ALICE, request)


def test_webhooks_sign_the_publisher_and_the_client_package_checks_it() -> None:
    secret = new_secret()
    signed = Signed(1_700_000_000, "42", "ev1", "user.deleted", "users/svc")
    body = b'{"a": 1}'
    header = signature_header([secret], signed, body)
    headers = {
        "aimesh-delivery": "42",
        "aimesh-event-id": "ev1",
        "aimesh-topic": "user.deleted",
        "aimesh-publisher": "users/svc",
        "aimesh-timestamp": str(signed.timestamp),
        "aimesh-signature": header,
    }
    assert verify_webhook(body, headers, secret, now=signed.timestamp).publisher == "users/svc"
    forged = {**headers, "aimesh-publisher": "users/mallory"}
    with pytest.raises(WebhookError, match="no signature matches"):
        verify_webhook(body, forged, secret, now=signed.timestamp)
    # Without v3 (a notify before it, or v3 stripped) the header is not vouched for.
    v2_only = {**forged, "aimesh-signature": ",".join(header.split(",")[:2])}
    assert verify_webhook(body, v2_only, secret, now=signed.timestamp).publisher == ""
