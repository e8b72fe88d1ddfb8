"""The notify service over real gRPC, its own PostgreSQL, and a real HTTP
receiver on 127.0.0.1 that checks signatures and dedupes deliveries; its
webhook secrets sealed at rest."""

from __future__ import annotations

import asyncio
import base64
import datetime as dt
import json
import os
import re
import shutil
import subprocess
import sys
import urllib.request
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import asyncpg
import grpc
import jwt
import pytest
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from google.protobuf import duration_pb2, field_mask_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc

from aimesh.notify.v1 import notify_service_pb2 as pb
from aimesh.notify.v1 import notify_service_pb2_grpc
from aimesh.user.v1 import user_service_pb2 as user_pb
from aimesh.webhooks import WebhookError
from aimesh.webhooks import verify as verify_webhook
from aimesh_notify.sealing import SealError, SecretBox
from aimesh_notify.server import SPEC
from aimesh_notify.signing import new_secret
from aimesh_notify.topics import app_namespace
from aimesh_runtime import db
from tests.conftest import (
    ROOT,
    Running,
    admin_token,
    bearer,
    kek,
    register_and_login,
    start_server,
)
from tests.fakes.webhook_receiver import Received, WebhookReceiver

Stub = notify_service_pb2_grpc.NotifyServiceStub
FAST = {
    "AIMESH_NOTIFY_MAX_ATTEMPTS": "3",
    "AIMESH_NOTIFY_BACKOFF_BASE_S": "0.05",
    "AIMESH_NOTIFY_BACKOFF_CAP_S": "0.2",
    "AIMESH_NOTIFY_VISIBILITY_TIMEOUT_S": "1",
    "AIMESH_NOTIFY_POLL_S": "0.2",
    "AIMESH_NOTIFY_QUEUE_STATS_S": "0.2",
}


async def start_notify(new_database: Any, user_server: Running, **env: str) -> Running:
    return await start_server(
        [SPEC],
        new_database,
        extra_env={
            "AIMESH_JWKS_URL": f"http://127.0.0.1:{user_server.http_port}/.well-known/jwks.json",
            "AIMESH_USER_ADDRESS": user_server.address,
            **FAST,
            **env,
        },
        rate_limit_rps=100_000.0,
        rate_limit_burst=100_000,
    )


def poison(request: Received) -> int | None:
    return 500 if request.body == b'"poison"' else None


@pytest.fixture(scope="module")
async def receiver() -> AsyncIterator[WebhookReceiver]:
    server = await WebhookReceiver(answer=poison).start()
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


@pytest.fixture
async def admin(users: Any) -> Any:
    return bearer(await admin_token(users))


def namespace(md: Any) -> str:
    """The topics the member of `md` may publish: apps.u<its id>."""
    token = dict(md)["authorization"].removeprefix("Bearer ")
    found = app_namespace(jwt.decode(token, options={"verify_signature": False})["sub"])
    assert found is not None
    return found


def topic(md: Any) -> str:
    """A topic of the test's own, so tests sharing the server do not see each other."""
    return f"{namespace(md)}t{uuid.uuid4().hex[:10]}.happened"


async def webhook(
    stub: Stub, md: Any, receiver: WebhookReceiver, topics: list[str], **fields: Any
) -> tuple[pb.Subscription, str, str]:
    path = f"/{uuid.uuid4().hex}"
    created = await stub.CreateSubscription(
        pb.CreateSubscriptionRequest(
            subscription=pb.Subscription(
                display_name="hook",
                topics=topics,
                webhook=pb.WebhookChannel(url=receiver.url(path), **fields),
            )
        ),
        metadata=md,
    )
    receiver.secrets[path] = [created.secret]
    return created.subscription, created.secret, path


async def publish(stub: Stub, md: Any, topic: str, payload: bytes, key: str = "") -> pb.Event:
    reply = await stub.Publish(
        pb.PublishRequest(topic=topic, idempotency_key=key or uuid.uuid4().hex, payload=payload),
        metadata=md,
    )
    return reply.event


def on(receiver: WebhookReceiver, path: str) -> list[Received]:
    return [r for r in receiver.requests if r.path == path]


async def settled(stub: Stub, md: Any, parent: str, count: int) -> list[pb.Delivery]:
    """The subscription's deliveries once `count` of them are no longer in flight
    (outcomes are written in batches, just after the receiver answers)."""
    async with asyncio.timeout(10):
        while True:
            listed = await stub.ListDeliveries(pb.ListDeliveriesRequest(parent=parent), metadata=md)
            done = [
                d for d in listed.deliveries
                if d.status in (pb.DELIVERY_STATUS_SUCCEEDED, pb.DELIVERY_STATUS_DEAD_LETTER)
            ]  # fmt: skip
            if len(done) >= count:
                return list(listed.deliveries)
            await asyncio.sleep(0.05)


async def code_of(call: Any) -> grpc.StatusCode:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await call
    return caught.value.code()


async def test_serving_and_api_keys_are_exchanged(notify: Running, stub: Stub, users: Any) -> None:
    async with notify.channel() as channel:
        health = health_pb2_grpc.HealthStub(channel)
        reply = await health.Check(
            health_pb2.HealthCheckRequest(service=SPEC.services[0].full_name)
        )
    assert reply.status == health_pb2.HealthCheckResponse.SERVING
    _, token = await register_and_login(users)
    created = await users.CreateApiKey(
        user_pb.CreateApiKeyRequest(parent="users/me", api_key=user_pb.ApiKey(display_name="k")),
        metadata=bearer(token),
    )
    listed = await stub.ListSubscriptions(
        pb.ListSubscriptionsRequest(), metadata=(("x-api-key", created.key),)
    )
    assert not listed.subscriptions
    assert await code_of(stub.ListSubscriptions(pb.ListSubscriptionsRequest())) == (
        grpc.StatusCode.UNAUTHENTICATED
    )


async def test_members_publish_only_under_their_own_namespace(
    stub: Stub, md: Any, users: Any, admin: Any
) -> None:
    _, other_token = await register_and_login(users)
    other = bearer(other_token)
    for who, name in [
        (md, "user.deleted"),  # the platform's: its services alone
        (admin, "user.deleted"),
        (other, namespace(md) + "order.paid"),  # another member's namespace
        (md, "orders.paid"),  # outside any member's namespace
    ]:
        request = pb.PublishRequest(topic=name, idempotency_key=uuid.uuid4().hex, payload=b"{}")
        assert await code_of(stub.Publish(request, metadata=who)) == (
            grpc.StatusCode.PERMISSION_DENIED
        ), name
        batch = pb.PublishBatchRequest(requests=[request])
        assert await code_of(stub.PublishBatch(batch, metadata=who)) == (
            grpc.StatusCode.PERMISSION_DENIED
        )
    # An admin grants a prefix: its grantee publishes there, until the grant goes.
    prefix = f"orders{uuid.uuid4().hex[:8]}."
    member = "users/" + namespace(md).split(".")[1][1:]
    request = pb.CreateTopicGrantRequest(
        topic_grant=pb.TopicGrant(topic_prefix=prefix, grantee=member)
    )
    assert await code_of(stub.CreateTopicGrant(request, metadata=md)) == (
        grpc.StatusCode.PERMISSION_DENIED
    )
    grant = (await stub.CreateTopicGrant(request, metadata=admin)).topic_grant
    listed = await stub.ListTopicGrants(pb.ListTopicGrantsRequest(), metadata=admin)
    assert grant in listed.topic_grants and grant.grantee == member
    await publish(stub, md, prefix + "paid", b"{}")
    granted = pb.PublishRequest(topic=prefix + "paid", idempotency_key=uuid.uuid4().hex)
    assert await code_of(stub.Publish(granted, metadata=other)) == (
        grpc.StatusCode.PERMISSION_DENIED
    )
    await stub.DeleteTopicGrant(pb.DeleteTopicGrantRequest(name=grant.name), metadata=admin)
    assert await code_of(stub.Publish(granted, metadata=md)) == grpc.StatusCode.PERMISSION_DENIED
    platform = pb.CreateTopicGrantRequest(
        topic_grant=pb.TopicGrant(topic_prefix="user.", grantee=member)
    )
    assert await code_of(stub.CreateTopicGrant(platform, metadata=admin)) == (
        grpc.StatusCode.INVALID_ARGUMENT
    )
    own = await publish(stub, md, topic(md), b"{}", key=f"mine:{namespace(md)}")
    # Another member reusing the key gets no answer about the first event.
    reuse = pb.PublishRequest(
        topic=namespace(other) + "x.y", idempotency_key=f"mine:{namespace(md)}", payload=b"{}"
    )
    error = await code_of(stub.Publish(reuse, metadata=other))
    assert error == grpc.StatusCode.ALREADY_EXISTS and own.publisher.startswith("users/")


async def test_webhook_delivery_is_signed_and_listed(
    stub: Stub, md: Any, receiver: WebhookReceiver
) -> None:
    name = topic(md)
    subscription, secret, path = await webhook(stub, md, receiver, [name])
    assert secret.startswith("whsec_") and subscription.webhook.timeout.seconds == 10
    got = await stub.GetSubscription(pb.GetSubscriptionRequest(name=subscription.name), metadata=md)
    assert got.subscription == subscription  # the secret is never shown again
    event = await publish(stub, md, name, b'{"n": 12345678901234567890}')
    await receiver.wait_for(lambda: len(on(receiver, path)) == 1)
    request = on(receiver, path)[0]
    assert request.signed_by == (secret,) and request.body == b'{"n": 12345678901234567890}'
    assert request.headers["aimesh-event-id"] == event.id
    assert request.headers["aimesh-topic"] == name
    publisher = verify_webhook(request.body, request.headers, secret).publisher
    assert publisher == event.publisher == "users/" + namespace(md).split(".")[1][1:]
    assert request.headers["content-type"] == "application/json"
    [delivery] = await settled(stub, md, subscription.name, 1)
    assert delivery.name.endswith("/deliveries/" + request.delivery)
    assert delivery.status == pb.DELIVERY_STATUS_SUCCEEDED and delivery.event_id == event.id
    assert [(a.attempt, a.http_status, a.error) for a in delivery.attempts] == [(1, 200, "")]


async def test_a_prefix_filter_matches_its_topics_only(
    stub: Stub, md: Any, receiver: WebhookReceiver
) -> None:
    word = f"p{uuid.uuid4().hex[:8]}"
    _, _, path = await webhook(stub, md, receiver, [f"{namespace(md)}{word}.*"])
    await publish(stub, md, f"{namespace(md)}{word}.import.finished", b"1")
    await publish(stub, md, f"{namespace(md)}x{word}.import.finished", b"2")
    await publish(stub, md, f"{namespace(md)}{word}x.done", b"3")
    await receiver.wait_for(lambda: len(on(receiver, path)) >= 1)
    await asyncio.sleep(0.3)
    assert [r.body for r in on(receiver, path)] == [b"1"]


async def test_rotation_signs_with_both_secrets_until_the_old_one_expires(
    stub: Stub, md: Any, receiver: WebhookReceiver
) -> None:
    name = topic(md)
    subscription, old, path = await webhook(stub, md, receiver, [name])
    rotated = await stub.RotateSubscriptionSecret(
        pb.RotateSubscriptionSecretRequest(
            name=subscription.name, grace_period=duration_pb2.Duration(seconds=1)
        ),
        metadata=md,
    )
    new = rotated.secret
    assert new != old and rotated.subscription.webhook.HasField("previous_secret_expire_time")
    receiver.secrets[path] = [old, new]
    await publish(stub, md, name, b"during")
    await receiver.wait_for(lambda: len(on(receiver, path)) == 1)
    assert set(on(receiver, path)[0].signed_by) == {old, new}
    await asyncio.sleep(1.2)
    await publish(stub, md, name, b"after")
    await receiver.wait_for(lambda: len(on(receiver, path)) == 2)
    assert on(receiver, path)[1].signed_by == (new,)
    stream = await stub.CreateSubscription(
        pb.CreateSubscriptionRequest(
            subscription=pb.Subscription(topics=[name], stream=pb.StreamChannel())
        ),
        metadata=md,
    )
    assert not stream.secret
    assert (
        await code_of(
            stub.RotateSubscriptionSecret(
                pb.RotateSubscriptionSecretRequest(name=stream.subscription.name), metadata=md
            )
        )
        == grpc.StatusCode.FAILED_PRECONDITION
    )


async def test_same_key_published_100_times_concurrently_delivers_once(
    stub: Stub, md: Any, receiver: WebhookReceiver
) -> None:
    name = topic(md)
    subscription, _, path = await webhook(stub, md, receiver, [name])
    key = f"test:{uuid.uuid4().hex}"
    replies = await asyncio.gather(
        *(
            stub.Publish(
                pb.PublishRequest(topic=name, idempotency_key=key, payload=b"once"), metadata=md
            )
            for _ in range(100)
        )
    )
    assert len({r.event.id for r in replies}) == 1
    assert sum(not r.duplicate for r in replies) == 1
    await receiver.wait_for(lambda: len(on(receiver, path)) == 1)
    await asyncio.sleep(0.5)  # room for a second delivery, were there one
    assert len(on(receiver, path)) == 1
    listed = await stub.ListDeliveries(
        pb.ListDeliveriesRequest(parent=subscription.name), metadata=md
    )
    assert len(listed.deliveries) == 1
    assert (
        await code_of(
            stub.Publish(
                pb.PublishRequest(topic=name, idempotency_key=key, payload=b"other"), metadata=md
            )
        )
        == grpc.StatusCode.ALREADY_EXISTS
    )


async def test_publish_batch_publishes_each_once_and_fails_as_a_whole(
    stub: Stub, md: Any, receiver: WebhookReceiver
) -> None:
    name = topic(md)
    subscription, _, path = await webhook(stub, md, receiver, [name])
    known = await publish(stub, md, name, b"known", key=f"known:{name}")

    def request(key: str, payload: bytes) -> pb.PublishRequest:
        return pb.PublishRequest(topic=name, idempotency_key=key, payload=payload)

    batch = [request(f"{name}:{n}", b"%d" % n) for n in range(20)]
    batch += [request(f"{name}:3", b"3"), request(f"known:{name}", b"known")]
    replies = await asyncio.gather(
        *(stub.PublishBatch(pb.PublishBatchRequest(requests=batch), metadata=md) for _ in range(5))
    )
    for reply in replies:
        assert [r.event.idempotency_key for r in reply.responses] == [
            r.idempotency_key for r in batch
        ]
        assert reply.responses[3].event.id == reply.responses[20].event.id
        assert reply.responses[20].duplicate and reply.responses[21].duplicate
        assert reply.responses[21].event.id == known.id
    # Each new key is new in exactly one of the five concurrent calls.
    assert sum(not r.duplicate for reply in replies for r in reply.responses) == 20
    await receiver.wait_for(lambda: len(on(receiver, path)) == 21)
    await asyncio.sleep(0.5)  # room for a second delivery, were there one
    assert len(on(receiver, path)) == 21
    assert sorted(r.body for r in on(receiver, path)) == sorted(
        [b"known"] + [b"%d" % n for n in range(20)]
    )
    # A known key with another payload, or one key twice with two payloads:
    # ALREADY_EXISTS, and nothing of the batch is stored.
    fresh = f"{name}:fresh"
    for bad in (
        [request(fresh, b"new"), request(f"known:{name}", b"changed")],
        [request(fresh, b"new"), request(fresh, b"other")],
    ):
        assert (
            await code_of(stub.PublishBatch(pb.PublishBatchRequest(requests=bad), metadata=md))
            == grpc.StatusCode.ALREADY_EXISTS
        )
    again = await stub.PublishBatch(
        pb.PublishBatchRequest(requests=[request(fresh, b"new")]), metadata=md
    )
    assert not again.responses[0].duplicate
    too_many = [request(f"{name}:many:{n}", b"") for n in range(1001)]
    assert (
        await code_of(stub.PublishBatch(pb.PublishBatchRequest(requests=too_many), metadata=md))
        == grpc.StatusCode.INVALID_ARGUMENT
    )
    assert (
        await code_of(
            stub.PublishBatch(pb.PublishBatchRequest(requests=[request("", b"x")]), metadata=md)
        )
        == grpc.StatusCode.INVALID_ARGUMENT
    )
    listed = await stub.ListDeliveries(
        pb.ListDeliveriesRequest(parent=subscription.name, page_size=100), metadata=md
    )
    assert len(listed.deliveries) == 22


async def test_poison_dead_letters_without_blocking_and_redrives(
    stub: Stub, md: Any, admin: Any, receiver: WebhookReceiver
) -> None:
    name = topic(md)
    subscription, _, path = await webhook(stub, md, receiver, [name])
    await publish(stub, md, name, b'"poison"')
    for n in range(20):
        await publish(stub, md, name, str(n).encode())
    accepted = lambda: {r.body for r in on(receiver, path) if r.body != b'"poison"'}  # noqa: E731
    await receiver.wait_for(lambda: len(accepted()) == 20)

    async def dead() -> list[pb.Delivery]:
        listed = await stub.ListDeliveries(
            pb.ListDeliveriesRequest(
                parent=subscription.name, status=pb.DELIVERY_STATUS_DEAD_LETTER
            ),
            metadata=md,
        )
        return list(listed.deliveries)

    async with asyncio.timeout(10):
        while not await dead():
            await asyncio.sleep(0.1)
    [letter] = await dead()
    assert [(a.attempt, a.http_status) for a in letter.attempts] == [(1, 500), (2, 500), (3, 500)]
    assert not letter.HasField("next_attempt_time")
    request = pb.RedriveDeadLettersRequest(parent=subscription.name)
    assert await code_of(stub.RedriveDeadLetters(request, metadata=md)) == (
        grpc.StatusCode.PERMISSION_DENIED
    )
    previous = receiver.answer
    receiver.answer = lambda r: None  # the receiver now accepts the poison
    try:
        redriven = await stub.RedriveDeadLetters(request, metadata=admin)
        assert redriven.redriven_count == 1
        await receiver.wait_for(lambda: receiver.deliveries[letter.name.rsplit("/", 1)[1]] == 1)
    finally:
        receiver.answer = previous
    assert (await stub.RedriveDeadLetters(request, metadata=admin)).redriven_count == 0
    missing = pb.RedriveDeadLettersRequest(parent="subscriptions/nope")
    assert await code_of(stub.RedriveDeadLetters(missing, metadata=admin)) == (
        grpc.StatusCode.NOT_FOUND
    )


async def stream_sub(stub: Stub, md: Any, topics: list[str]) -> str:
    created = await stub.CreateSubscription(
        pb.CreateSubscriptionRequest(
            subscription=pb.Subscription(topics=topics, stream=pb.StreamChannel())
        ),
        metadata=md,
    )
    return str(created.subscription.name)


async def read(
    stub: Stub, md: Any, name: str, cursor: str, count: int
) -> list[pb.SubscribeResponse]:
    got: list[pb.SubscribeResponse] = []
    call = stub.Subscribe(pb.SubscribeRequest(subscription=name, cursor=cursor), metadata=md)
    async with asyncio.timeout(20):
        async for item in call:
            got.append(item)
            if len(got) == count:
                call.cancel()
                break
    return got


async def test_stream_replays_then_tails_and_resumes_with_no_gap(stub: Stub, md: Any) -> None:
    name = topic(md)
    before = await publish(stub, md, name, b"before the subscription")
    subscription = await stream_sub(stub, md, [name])
    published: list[str] = []

    async def publisher() -> None:
        for n in range(300):
            published.append((await publish(stub, md, name, str(n).encode())).id)
            if n % 50 == 0:
                await asyncio.sleep(0.05)

    task = asyncio.create_task(publisher())
    seen: list[str] = []
    cursor = ""
    while len(seen) < 300:  # read in slices, reconnecting from the cursor each time
        batch = await read(stub, md, subscription, cursor, min(37, 300 - len(seen)))
        seen.extend(item.event.id for item in batch)
        cursor = batch[-1].cursor
    await task
    assert seen == published and before.id not in seen
    assert (
        await code_of(
            stub.Subscribe(
                pb.SubscribeRequest(subscription=subscription, cursor="garbage"), metadata=md
            ).read()
        )
        == grpc.StatusCode.INVALID_ARGUMENT
    )


async def test_bad_input_gets_clear_statuses(
    stub: Stub, md: Any, users: Any, receiver: WebhookReceiver
) -> None:
    name = topic(md)
    subscription, _, _ = await webhook(stub, md, receiver, [name])
    _, other_token = await register_and_login(users)
    other = bearer(other_token)
    for who in (md, other):
        missing = "subscriptions/nope" if who is md else subscription.name
        assert (
            await code_of(
                stub.GetSubscription(pb.GetSubscriptionRequest(name=missing), metadata=who)
            )
            == grpc.StatusCode.NOT_FOUND
        )
        assert (
            await code_of(
                stub.ListDeliveries(pb.ListDeliveriesRequest(parent=missing), metadata=who)
            )
            == grpc.StatusCode.NOT_FOUND
        )
        assert (
            await code_of(
                stub.DeleteSubscription(pb.DeleteSubscriptionRequest(name=missing), metadata=who)
            )
            == grpc.StatusCode.NOT_FOUND
        )
        assert (
            await code_of(
                stub.Subscribe(pb.SubscribeRequest(subscription=missing), metadata=who).read()
            )
            == grpc.StatusCode.NOT_FOUND
        )
    assert (
        await code_of(
            stub.Subscribe(pb.SubscribeRequest(subscription=subscription.name), metadata=md).read()
        )
        == grpc.StatusCode.FAILED_PRECONDITION
    )
    assert (
        await code_of(
            stub.Publish(
                pb.PublishRequest(topic=name, idempotency_key="k", payload=b"x" * 65537),
                metadata=md,
            )
        )
        == grpc.StatusCode.INVALID_ARGUMENT
    )
    assert (
        await code_of(
            stub.CreateSubscription(
                pb.CreateSubscriptionRequest(subscription=pb.Subscription(topics=[name])),
                metadata=md,
            )
        )
        == grpc.StatusCode.INVALID_ARGUMENT
    )
    # Updates: a field, the kind (fixed), an unknown path.
    update = pb.UpdateSubscriptionRequest(
        subscription=pb.Subscription(name=subscription.name, display_name="renamed"),
        update_mask=field_mask_pb2.FieldMask(paths=["display_name"]),
    )
    updated = await stub.UpdateSubscription(update, metadata=md)
    assert updated.subscription.display_name == "renamed"
    assert updated.subscription.webhook.url == subscription.webhook.url
    update.subscription.stream.SetInParent()
    assert await code_of(stub.UpdateSubscription(update, metadata=md)) == (
        grpc.StatusCode.FAILED_PRECONDITION
    )
    update = pb.UpdateSubscriptionRequest(
        subscription=pb.Subscription(name=subscription.name),
        update_mask=field_mask_pb2.FieldMask(paths=["owner"]),
    )
    assert await code_of(stub.UpdateSubscription(update, metadata=md)) == (
        grpc.StatusCode.INVALID_ARGUMENT
    )


async def test_list_pages_and_purge_is_idempotent(
    stub: Stub, users: Any, admin: Any, receiver: WebhookReceiver
) -> None:
    user, token = await register_and_login(users)
    md = bearer(token)
    names = [(await webhook(stub, md, receiver, [topic(md)]))[0].name for _ in range(3)]
    names.append(await stream_sub(stub, md, [topic(md)]))
    first = await stub.ListSubscriptions(pb.ListSubscriptionsRequest(page_size=3), metadata=md)
    rest = await stub.ListSubscriptions(
        pb.ListSubscriptionsRequest(page_size=3, page_token=first.next_page_token), metadata=md
    )
    assert [s.name for s in [*first.subscriptions, *rest.subscriptions]] == names
    assert not rest.next_page_token
    purge = pb.PurgeUserDataRequest(user=user.name)
    assert await code_of(stub.PurgeUserData(purge, metadata=md)) == (
        grpc.StatusCode.PERMISSION_DENIED
    )
    assert (await stub.PurgeUserData(purge, metadata=admin)).deleted_subscriptions == 4
    assert (await stub.PurgeUserData(purge, metadata=admin)).deleted_subscriptions == 0
    left = await stub.ListSubscriptions(pb.ListSubscriptionsRequest(), metadata=md)
    assert not left.subscriptions


DENIED_URLS = [
    "http://127.0.0.1:8080/hook",
    "http://localhost/hook",
    "http://169.254.169.254/latest/meta-data/",
    "http://10.1.2.3/",
    "http://172.16.0.1/",
    "http://192.168.1.1/",
    "http://100.64.0.1/",
    "http://0.0.0.0/",
    "http://224.0.0.1/",
    "http://[::1]/",
    "http://[::ffff:127.0.0.1]/",
    "http://[fd00:ec2::254]/",
    "http://[fe80::1]/",
    "https://user:pass@93.184.216.34/",
    "ftp://93.184.216.34/",
    "file:///etc/passwd",
]


async def test_webhooks_to_denied_networks_are_invalid(
    new_database: Any, user_server: Running, users: Any
) -> None:
    strict = await start_notify(new_database, user_server)
    try:
        _, token = await register_and_login(users)
        md = bearer(token)
        async with strict.channel() as channel:
            stub = Stub(channel)
            for url in DENIED_URLS:
                request = pb.CreateSubscriptionRequest(
                    subscription=pb.Subscription(
                        topics=["user.deleted"], webhook=pb.WebhookChannel(url=url)
                    )
                )
                code = await code_of(stub.CreateSubscription(request, metadata=md))
                assert code == grpc.StatusCode.INVALID_ARGUMENT, url
            # A public address is fine (nothing is sent until an event comes).
            allowed = await stub.CreateSubscription(
                pb.CreateSubscriptionRequest(
                    subscription=pb.Subscription(
                        topics=[topic(md)], webhook=pb.WebhookChannel(url="https://93.184.216.34/h")
                    )
                ),
                metadata=md,
            )
            update = pb.UpdateSubscriptionRequest(
                subscription=pb.Subscription(
                    name=allowed.subscription.name,
                    webhook=pb.WebhookChannel(url="http://169.254.169.254/"),
                ),
                update_mask=field_mask_pb2.FieldMask(paths=["webhook.url"]),
            )
            assert await code_of(stub.UpdateSubscription(update, metadata=md)) == (
                grpc.StatusCode.INVALID_ARGUMENT
            )
    finally:
        await strict.server.stop(0.5)


# Webhook secrets at rest: sealed in notify's PostgreSQL, still signing, legacy
# plaintext sealed at start, and a wrong key refused before anything runs.

KEY = "AIMESH_NOTIFY_SECRET_ENCRYPTION_KEY"
URL = "AIMESH_NOTIFY_DATABASE_URL"


def box_of(running_or_key: Running | str) -> SecretBox:
    key = running_or_key if isinstance(running_or_key, str) else running_or_key.environ[KEY]
    return SecretBox(base64.urlsafe_b64decode(key))


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
    name = topic(md)
    subscription, old, path = await webhook(stub, md, receiver, [name])
    subscription_id = subscription.name.split("/")[1]
    stored = await stored_secrets(url, subscription_id)
    assert box_of(notify).is_current(stored["secret"]) and stored["previous_secret"] is None
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
    assert box_of(notify).is_current(stored["secret"])
    assert box_of(notify).is_current(stored["previous_secret"])
    assert [box_of(notify).open(subscription_id, s) for s in stored] == [new, old]
    dumped = await database_text(url)
    assert old not in dumped and new not in dumped

    receiver.secrets[path] = [old, new]
    await publish(stub, md, name, b"sealed")
    await receiver.wait_for(lambda: len(on(receiver, path)) == 1)
    received = on(receiver, path)[0]
    assert set(received.signed_by) == {old, new}
    # The client package's check agrees with the independent receiver's.
    for secrets in ([new], [old], [old, new]):
        delivery = verify_webhook(received.body, received.headers, secrets)
        assert delivery.delivery_id == received.delivery and delivery.attempt == 1
    with pytest.raises(WebhookError):
        verify_webhook(received.body, received.headers, [new_secret()])


async def test_a_sealed_secret_copied_onto_another_subscription_does_not_open(
    notify: Running, stub: Stub, md: Any, receiver: WebhookReceiver
) -> None:
    url = notify.environ[URL]
    first, _, _ = await webhook(stub, md, receiver, [topic(md)])
    name = topic(md)
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
    name = topic(md)
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
            if box.is_current(row["secret"]) and box.is_current(row["previous_secret"])
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
    await webhook(stub, md, receiver, [topic(md)])  # something sealed under the right key
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


# Rotating AIMESH_NOTIFY_SECRET_ENCRYPTION_KEY: the old key moves to
# AIMESH_NOTIFY_PREVIOUS_SECRET_ENCRYPTION_KEYS, starts reseal, webhooks keep signing.

PREVIOUS = "AIMESH_NOTIFY_PREVIOUS_SECRET_ENCRYPTION_KEYS"


def module_env(url: str, key: str, jwks_url: str, **more: str) -> dict[str, str]:
    return {
        URL: url,
        KEY: key,
        "AIMESH_GRPC_PORT": "0",
        "AIMESH_HTTP_PORT": "0",
        "AIMESH_JWKS_URL": jwks_url,
        **more,
    }


async def insert_webhook(url: str, subscription_id: str, secret: str, previous: str | None,
                         previous_expires: dt.datetime | None = None) -> None:  # fmt: skip
    connection = await asyncpg.connect(url)
    try:
        await connection.execute(
            """INSERT INTO subscriptions (id, owner_id, topics, kind, url, timeout_ms, secret,
                   secret_create_time, previous_secret, previous_secret_expire_time)
               VALUES ($1, 'someone', ARRAY['rotation.other'], 'webhook',
                       'http://127.0.0.1:9/', 10000, $2, now(), $3, $4)""",
            subscription_id,
            secret,
            previous,
            previous_expires,
        )
    finally:
        await connection.close()


async def test_the_sealing_key_rotates_and_webhooks_keep_their_secrets(
    new_database: Any, user_server: Running, md: Any, receiver: WebhookReceiver
) -> None:
    old_key, new_key = kek(), kek()
    allow = {"AIMESH_NOTIFY_ALLOW_PRIVATE_WEBHOOKS": "1"}
    first = await start_notify(new_database, user_server, **{KEY: old_key}, **allow)
    url, jwks_url = first.environ[URL], first.environ["AIMESH_JWKS_URL"]
    name = topic(md)
    try:
        async with first.channel() as channel:
            stub = Stub(channel)
            subscription, old_secret, path = await webhook(stub, md, receiver, [name])
            rotated = await stub.RotateSubscriptionSecret(
                pb.RotateSubscriptionSecretRequest(
                    name=subscription.name, grace_period=duration_pb2.Duration(seconds=600)
                ),
                metadata=md,
            )
    finally:
        await first.server.stop(0.5)
    subscription_id = subscription.name.split("/")[1]
    # And one sealed by a release from before key ids.
    nonce = os.urandom(12)
    aead = AESGCM(base64.urlsafe_b64decode(old_key))
    v1 = (
        "aesgcm1:"
        + base64.urlsafe_b64encode(
            nonce + aead.encrypt(nonce, b"whsec_legacy", b"legacy-v1")
        ).decode()
    )
    await insert_webhook(url, "legacy-v1", v1, None)

    # The new key alone opens nothing stored: both processes refuse to start.
    for module in ("aimesh_notify", "aimesh_notify.worker"):
        result = await asyncio.to_thread(run_module, module, module_env(url, new_key, jwks_url))
        assert result.returncode == 2, (module, result.stderr)
        assert f"{KEY} does not open the webhook secrets" in result.stderr, module
        assert PREVIOUS in result.stderr, module

    second = await start_notify(
        new_database, user_server, **{URL: url, KEY: new_key, PREVIOUS: old_key}, **allow
    )
    try:
        alone = box_of(new_key)  # what was sealed is now under the new key only
        stored = await stored_secrets(url, subscription_id)
        assert all(alone.is_current(value) for value in stored)
        assert [alone.open(subscription_id, v) for v in stored] == [rotated.secret, old_secret]
        assert alone.open("legacy-v1", (await stored_secrets(url, "legacy-v1"))["secret"]) == (
            "whsec_legacy"
        )
        receiver.secrets[path] = [old_secret, rotated.secret]
        async with second.channel() as channel:
            await publish(Stub(channel), md, name, b"after the key rotated")
        await receiver.wait_for(lambda: len(on(receiver, path)) == 1)
        assert set(on(receiver, path)[0].signed_by) == {old_secret, rotated.secret}
    finally:
        await second.server.stop(0.5)

    # Done: the new key starts alone, and the old key alone no longer does.
    third = await start_notify(new_database, user_server, **{URL: url, KEY: new_key}, **allow)
    await third.server.stop(0.5)
    result = await asyncio.to_thread(
        run_module, "aimesh_notify.worker", module_env(url, old_key, jwks_url)
    )
    assert result.returncode == 2 and f"{KEY} does not open" in result.stderr, result.stderr


async def test_a_start_refuses_while_a_live_secret_needs_a_key_it_lacks(
    new_database: Any, user_server: Running
) -> None:
    old_key, new_key = kek(), kek()
    running = await start_notify(new_database, user_server, **{KEY: new_key})
    url, jwks_url = running.environ[URL], running.environ["AIMESH_JWKS_URL"]
    await running.server.stop(0.5)
    old, new = box_of(old_key), box_of(new_key)
    # Sealed under the old key after the last sweep, by a replica not yet rolled:
    await insert_webhook(url, "late", old.seal("late", "whsec_late"), None)
    # An expired previous secret under the old key needs it no more.
    await insert_webhook(
        url, "expired", new.seal("expired", "whsec_now"), old.seal("expired", "whsec_before"),
        dt.datetime.now(dt.UTC) - dt.timedelta(hours=1),
    )  # fmt: skip

    for module in ("aimesh_notify", "aimesh_notify.worker"):
        result = await asyncio.to_thread(run_module, module, module_env(url, new_key, jwks_url))
        assert result.returncode == 2, (module, result.stderr)
        assert "configuration error" in result.stderr and "Traceback" not in result.stderr
        assert "1 webhook secrets (subscriptions/late among them)" in result.stderr, module
        assert f"sealed under key {old.key_id}" in result.stderr, module
        assert f"put that key back in {PREVIOUS}" in result.stderr, module
    assert (await stored_secrets(url, "late"))["secret"].startswith(old.prefix)  # untouched

    running = await start_notify(
        new_database, user_server, **{URL: url, KEY: new_key, PREVIOUS: old_key}
    )
    await running.server.stop(0.5)
    assert new.open("late", (await stored_secrets(url, "late"))["secret"]) == "whsec_late"
    expired = await stored_secrets(url, "expired")
    assert new.open("expired", expired["previous_secret"]) == "whsec_before"


# Metrics: attempts by outcome where they end, and the queue's depth and lag.


def scrape(port: int) -> dict[str, float]:
    """Samples of a /metrics page, by name with labels."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as answer:
        text = answer.read().decode()
    samples = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            samples[name] = float(value)
    return samples


ATTEMPTS = "aimesh_notify_delivery_attempts_total"
DASHBOARD = ROOT / "services" / "aimesh_runtime" / "grafana" / "aimesh.json"


async def test_metrics_count_attempts_by_outcome_and_show_dead_letters(
    notify: Running, stub: Stub, md: Any, receiver: WebhookReceiver
) -> None:
    before = await asyncio.to_thread(scrape, notify.http_port)
    name = topic(md)
    subscription, _, _ = await webhook(stub, md, receiver, [name])
    await publish(stub, md, name, b'"poison"')  # answered 500: three attempts, then dead
    await publish(stub, md, name, b"fine")

    def grown(now: dict[str, float], outcome: str) -> float:
        key = f'{ATTEMPTS}{{outcome="{outcome}"}}'
        return now.get(key, 0) - before.get(key, 0)

    async with asyncio.timeout(15):
        while True:
            now = await asyncio.to_thread(scrape, notify.http_port)
            if (
                grown(now, "dead_letter") >= 1
                and now.get('aimesh_notify_deliveries{state="dead_letter"}', 0) >= 1
            ):
                break
            await asyncio.sleep(0.1)
    assert grown(now, "succeeded") >= 1 and grown(now, "retry") >= 2
    assert grown(now, "lease_expired") == 0
    histogram = "aimesh_notify_delivery_attempt_duration_seconds_count"
    assert now[histogram] - before.get(histogram, 0) >= 4
    for state in ("due", "waiting", "in_flight"):
        assert f'aimesh_notify_deliveries{{state="{state}"}}' in now
    assert now["aimesh_notify_oldest_due_seconds"] >= 0
    assert now["aimesh_notify_queue_read_timestamp_seconds"] > 0
    [letter] = [d for d in await settled(stub, md, subscription.name, 2) if d.attempts[-1].error]
    assert letter.status == pb.DELIVERY_STATUS_DEAD_LETTER
    # Every notify series the dashboard queries is in this scrape.
    scraped = {re.split(r"[{ ]", name, maxsplit=1)[0] for name in now}
    queried = {
        name
        for panel in json.loads(DASHBOARD.read_text())["panels"]
        for target in panel["targets"]
        for name in re.findall(r"\b(aimesh_notify_[a-z0-9_]+)\b", target["expr"])
    }
    assert len(queried) >= 4 and queried <= scraped


async def test_a_standalone_worker_serves_its_attempt_metrics(notify: Running) -> None:
    environ = {
        **os.environ,
        **FAST,
        **{name: notify.environ[name] for name in (URL, KEY)},
        "AIMESH_NOTIFY_ALLOW_PRIVATE_WEBHOOKS": "1",
        "PYTHONPATH": os.pathsep.join([str(ROOT / "services"), str(ROOT / "protos")]),
    }
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "aimesh_notify.worker", "--metrics-port", "0",
        env=environ, stdout=asyncio.subprocess.PIPE,
    )  # fmt: skip
    try:
        assert process.stdout is not None
        async with asyncio.timeout(30):
            while True:
                line = json.loads(await process.stdout.readline())
                if line["message"] == "notify worker ready":
                    break
        samples = await asyncio.to_thread(scrape, line["metrics_port"])
        assert f'{ATTEMPTS}{{outcome="succeeded"}}' in samples
        assert not any(name.startswith("aimesh_notify_deliveries") for name in samples)
    finally:
        process.terminate()
        await process.wait()


# A receiver that stops answering is paused, so it does not hold every worker.


async def test_a_hanging_receiver_is_paused_and_other_subscriptions_go_on(
    new_database: Any, user_server: Running, md: Any, receiver: WebhookReceiver
) -> None:
    held: list[asyncio.StreamWriter] = []

    async def never_answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        held.append(writer)
        await reader.read()

    hanging = await asyncio.start_server(never_answer, "127.0.0.1", 0)
    port = hanging.sockets[0].getsockname()[1]
    running = await start_notify(
        new_database,
        user_server,
        AIMESH_NOTIFY_ALLOW_PRIVATE_WEBHOOKS="1",
        AIMESH_NOTIFY_WORKER_CONCURRENCY="4",
        AIMESH_NOTIFY_PAUSE_AFTER_FAILURES="4",
        AIMESH_NOTIFY_PAUSE_FIRST_S="120",
        AIMESH_NOTIFY_MAX_ATTEMPTS="8",
    )
    try:
        async with running.channel() as channel:
            stub = Stub(channel)
            stuck_topic, healthy_topic = topic(md), topic(md)
            stuck = await stub.CreateSubscription(
                pb.CreateSubscriptionRequest(
                    subscription=pb.Subscription(
                        topics=[stuck_topic],
                        webhook=pb.WebhookChannel(
                            url=f"http://127.0.0.1:{port}/hook",
                            timeout=duration_pb2.Duration(seconds=1),
                        ),
                    )
                ),
                metadata=md,
            )
            for n in range(40):
                await publish(stub, md, stuck_topic, b"%d" % n)

            async def stuck_deliveries() -> list[pb.Delivery]:
                listed = await stub.ListDeliveries(
                    pb.ListDeliveriesRequest(parent=stuck.subscription.name, page_size=100),
                    metadata=md,
                )
                return list(listed.deliveries)

            async with asyncio.timeout(20):  # four attempts of 1 s, four at a time
                while sum(len(d.attempts) for d in await stuck_deliveries()) < 4:
                    await asyncio.sleep(0.1)
            _, _, path = await webhook(stub, md, receiver, [healthy_topic])
            for n in range(10):
                await publish(stub, md, healthy_topic, b"%d" % n)
            await receiver.wait_for(lambda: len(on(receiver, path)) == 10, timeout_s=20)
            # The healthy receiver got everything while the stuck backlog waits:
            # without the pause, 36 attempts of 1 s, four at a time, come first.
            deliveries = await stuck_deliveries()
            attempted = [d for d in deliveries if d.attempts]
            assert len(deliveries) == 40 and len(attempted) <= 8
            later = dt.datetime.now(dt.UTC) + dt.timedelta(seconds=60)
            waiting = [
                d for d in deliveries if d.status == pb.DELIVERY_STATUS_PENDING and not d.attempts
            ]
            assert len(waiting) >= 30  # the rest are in flight or failed, never more than 8
            assert all(d.next_attempt_time.ToDatetime(dt.UTC) > later for d in waiting)
            samples = await asyncio.to_thread(scrape, running.http_port)
            assert samples["aimesh_notify_receiver_pauses_total"] >= 1
    finally:
        await running.server.stop(0.5)
        for writer in held:
            writer.close()
        hanging.close()
