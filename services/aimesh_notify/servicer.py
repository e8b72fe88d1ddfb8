"""NotifyService: proto in, domain call, proto out."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator

import grpc
from google.protobuf import duration_pb2

from aimesh.notify.v1 import notify_service_pb2 as pb
from aimesh.notify.v1 import notify_service_pb2_grpc
from aimesh_notify.deliveries import Deliveries
from aimesh_notify.delivery_store import DeliveryRow
from aimesh_notify.event_store import EventRow
from aimesh_notify.events import Events, Publish
from aimesh_notify.store import SubscriptionRow, TopicGrantRow
from aimesh_notify.subscriptions import Subscriptions, Webhook, subscription_name
from aimesh_notify.topics import Topics, grant_name
from aimesh_runtime.context import principal as caller
from aimesh_runtime.pages import timestamp

STATUSES = {
    "pending": pb.DELIVERY_STATUS_PENDING,
    "in_flight": pb.DELIVERY_STATUS_IN_FLIGHT,
    "succeeded": pb.DELIVERY_STATUS_SUCCEEDED,
    "dead_letter": pb.DELIVERY_STATUS_DEAD_LETTER,
}
STATUS_NAMES = {value: name for name, value in STATUSES.items()}


def duration(milliseconds: int) -> duration_pb2.Duration:
    return duration_pb2.Duration(
        seconds=milliseconds // 1000, nanos=(milliseconds % 1000) * 1_000_000
    )


def milliseconds(value: duration_pb2.Duration) -> int:
    return int(value.seconds * 1000 + value.nanos // 1_000_000)


def subscription_proto(row: SubscriptionRow) -> pb.Subscription:
    message = pb.Subscription(
        name=subscription_name(row.id),
        display_name=row.display_name,
        topics=list(row.topics),
        owner=f"users/{row.owner_id}",
        create_time=timestamp(row.create_time),
        update_time=timestamp(row.update_time),
    )
    if row.kind == "webhook":
        message.webhook.CopyFrom(
            pb.WebhookChannel(
                url=row.url or "",
                timeout=duration(row.timeout_ms or 0),
                secret_create_time=timestamp(row.secret_create_time),
                previous_secret_expire_time=timestamp(
                    row.previous_secret_expire_time if row.previous_secret else None
                ),
            )
        )
    else:
        message.stream.SetInParent()
    return message


def topic_grant_proto(row: TopicGrantRow) -> pb.TopicGrant:
    return pb.TopicGrant(
        name=grant_name(row.id),
        topic_prefix=row.topic_prefix,
        grantee=f"users/{row.grantee}",
        create_time=timestamp(row.create_time),
    )


def event_proto(row: EventRow) -> pb.Event:
    return pb.Event(
        id=row.id,
        topic=row.topic,
        payload=row.payload,
        content_type=row.content_type,
        idempotency_key=row.idempotency_key,
        publisher=row.publisher,
        publish_time=timestamp(row.publish_time),
    )


def delivery_proto(row: DeliveryRow) -> pb.Delivery:
    return pb.Delivery(
        name=f"{subscription_name(row.subscription_id)}/deliveries/{row.id}",
        event_id=row.event_id,
        topic=row.topic,
        status=STATUSES[row.status],
        attempts=[
            pb.DeliveryAttempt(
                attempt=a.attempt,
                http_status=a.http_status,
                error=a.error,
                start_time=timestamp(a.start_time),
                end_time=timestamp(a.end_time),
            )
            for a in row.attempts
        ],
        next_attempt_time=timestamp(row.run_after if row.status == "pending" else None),
        create_time=timestamp(row.create_time),
        update_time=timestamp(row.update_time),
    )


def webhook_of(subscription: pb.Subscription) -> Webhook | None:
    if not subscription.HasField("webhook"):
        return None
    return Webhook(subscription.webhook.url, milliseconds(subscription.webhook.timeout))


class NotifyServicer(notify_service_pb2_grpc.NotifyServiceServicer):
    def __init__(
        self, subscriptions: Subscriptions, events: Events, deliveries: Deliveries, topics: Topics
    ) -> None:
        self._subscriptions = subscriptions
        self._events = events
        self._deliveries = deliveries
        self._topics = topics

    async def CreateTopicGrant(
        self, request: pb.CreateTopicGrantRequest, context: grpc.aio.ServicerContext
    ) -> pb.CreateTopicGrantResponse:
        grant = request.topic_grant
        row = await self._topics.grant(grant.topic_prefix, grant.grantee)
        return pb.CreateTopicGrantResponse(topic_grant=topic_grant_proto(row))

    async def ListTopicGrants(
        self, request: pb.ListTopicGrantsRequest, context: grpc.aio.ServicerContext
    ) -> pb.ListTopicGrantsResponse:
        rows, token = await self._topics.list(request.page_size, request.page_token)
        return pb.ListTopicGrantsResponse(
            topic_grants=[topic_grant_proto(row) for row in rows], next_page_token=token
        )

    async def DeleteTopicGrant(
        self, request: pb.DeleteTopicGrantRequest, context: grpc.aio.ServicerContext
    ) -> pb.DeleteTopicGrantResponse:
        await self._topics.revoke(request.name)
        return pb.DeleteTopicGrantResponse()

    async def CreateSubscription(
        self, request: pb.CreateSubscriptionRequest, context: grpc.aio.ServicerContext
    ) -> pb.CreateSubscriptionResponse:
        wanted = request.subscription
        row, secret = await self._subscriptions.create(
            caller(), wanted.display_name, list(wanted.topics), webhook_of(wanted)
        )
        return pb.CreateSubscriptionResponse(subscription=subscription_proto(row), secret=secret)

    async def GetSubscription(
        self, request: pb.GetSubscriptionRequest, context: grpc.aio.ServicerContext
    ) -> pb.GetSubscriptionResponse:
        row = await self._subscriptions.get(caller(), request.name)
        return pb.GetSubscriptionResponse(subscription=subscription_proto(row))

    async def ListSubscriptions(
        self, request: pb.ListSubscriptionsRequest, context: grpc.aio.ServicerContext
    ) -> pb.ListSubscriptionsResponse:
        page = await self._subscriptions.list(caller(), request.page_size, request.page_token)
        return pb.ListSubscriptionsResponse(
            subscriptions=[subscription_proto(row) for row in page.items],
            next_page_token=page.next_page_token,
        )

    async def UpdateSubscription(
        self, request: pb.UpdateSubscriptionRequest, context: grpc.aio.ServicerContext
    ) -> pb.UpdateSubscriptionResponse:
        wanted = request.subscription
        row = await self._subscriptions.update(
            caller(),
            wanted.name,
            list(request.update_mask.paths),
            wanted.display_name,
            list(wanted.topics),
            webhook_of(wanted),
            sets_stream=wanted.HasField("stream"),
        )
        return pb.UpdateSubscriptionResponse(subscription=subscription_proto(row))

    async def DeleteSubscription(
        self, request: pb.DeleteSubscriptionRequest, context: grpc.aio.ServicerContext
    ) -> pb.DeleteSubscriptionResponse:
        await self._subscriptions.delete(caller(), request.name)
        return pb.DeleteSubscriptionResponse()

    async def RotateSubscriptionSecret(
        self, request: pb.RotateSubscriptionSecretRequest, context: grpc.aio.ServicerContext
    ) -> pb.RotateSubscriptionSecretResponse:
        row, secret = await self._subscriptions.rotate_secret(
            caller(), request.name, request.grace_period.ToTimedelta()
        )
        return pb.RotateSubscriptionSecretResponse(
            subscription=subscription_proto(row), secret=secret
        )

    async def Publish(
        self, request: pb.PublishRequest, context: grpc.aio.ServicerContext
    ) -> pb.PublishResponse:
        published = await self._events.publish(
            request.topic,
            request.idempotency_key,
            request.payload,
            request.content_type,
            publisher=f"users/{caller().subject}",
        )
        return pb.PublishResponse(event=event_proto(published.event), duplicate=published.duplicate)

    async def PublishBatch(
        self, request: pb.PublishBatchRequest, context: grpc.aio.ServicerContext
    ) -> pb.PublishBatchResponse:
        published = await self._events.publish_batch(
            [
                Publish(r.topic, r.idempotency_key, r.payload, r.content_type)
                for r in request.requests
            ],
            publisher=f"users/{caller().subject}",
        )
        return pb.PublishBatchResponse(
            responses=[
                pb.PublishResponse(event=event_proto(p.event), duplicate=p.duplicate)
                for p in published
            ]
        )

    async def Subscribe(
        self, request: pb.SubscribeRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.SubscribeResponse]:
        events = self._events.stream(
            caller(), request.subscription, request.cursor, alive=lambda: not context.done()
        )
        async with contextlib.aclosing(events):
            async for event, cursor in events:
                yield pb.SubscribeResponse(event=event_proto(event), cursor=cursor)

    async def ListDeliveries(
        self, request: pb.ListDeliveriesRequest, context: grpc.aio.ServicerContext
    ) -> pb.ListDeliveriesResponse:
        page = await self._deliveries.list(
            caller(),
            request.parent,
            STATUS_NAMES.get(request.status),
            request.page_size,
            request.page_token,
        )
        return pb.ListDeliveriesResponse(
            deliveries=[delivery_proto(row) for row in page.items],
            next_page_token=page.next_page_token,
        )

    async def RedriveDeadLetters(
        self, request: pb.RedriveDeadLettersRequest, context: grpc.aio.ServicerContext
    ) -> pb.RedriveDeadLettersResponse:
        count = await self._deliveries.redrive(caller(), request.parent)
        return pb.RedriveDeadLettersResponse(redriven_count=count)

    async def PurgeUserData(
        self, request: pb.PurgeUserDataRequest, context: grpc.aio.ServicerContext
    ) -> pb.PurgeUserDataResponse:
        deleted = await self._subscriptions.purge(request.user)
        return pb.PurgeUserDataResponse(deleted_subscriptions=deleted)
