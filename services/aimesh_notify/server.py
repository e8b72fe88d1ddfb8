"""Wiring of the notify service: store, SSRF guard, bell, domain, servicer, worker.

The delivery worker runs inside the service process unless
AIMESH_NOTIFY_WORKER_CONCURRENCY is 0; `python -m aimesh_notify.worker` runs
the same worker as a process of its own, and any number of them may share
the queue.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any

import asyncpg

from aimesh.notify.v1 import notify_service_pb2, notify_service_pb2_grpc
from aimesh_notify.deliveries import Deliveries
from aimesh_notify.delivery_store import DeliveryStore
from aimesh_notify.event_store import EventStore
from aimesh_notify.events import Announcer, Bell, Events, Sequencer
from aimesh_notify.metrics import DeliveryMetrics
from aimesh_notify.netguard import NetworkGuard
from aimesh_notify.queue import DeliveryWorker, WebhookSender
from aimesh_notify.sealing import SecretBox, seal_at_rest
from aimesh_notify.servicer import NotifyServicer
from aimesh_notify.settings import NotifySettings
from aimesh_notify.store import SubscriptionStore
from aimesh_notify.subscriptions import Subscriptions, not_found
from aimesh_notify.topics import Topics
from aimesh_runtime import db
from aimesh_runtime.config import database_url
from aimesh_runtime.errors import PermissionDenied, ServiceError
from aimesh_runtime.ownership import OwnerResolver
from aimesh_runtime.server import Mount, ServiceContext, ServiceSpec

log = logging.getLogger(__name__)
PRUNE_EVERY_S = 3600.0


async def mount(context: ServiceContext) -> Mount:
    settings: NotifySettings = context.settings
    store = SubscriptionStore(context.pool)
    event_store = EventStore(context.pool)
    delivery_store = DeliveryStore(context.pool)
    box = SecretBox(settings.secret_key_bytes(), settings.previous_key_bytes())
    await seal_at_rest(store, box, strict=True)  # a missing key stops the start here
    guard = NetworkGuard(settings.allow_private_webhooks)
    if settings.allow_private_webhooks:
        log.warning("AIMESH_NOTIFY_ALLOW_PRIVATE_WEBHOOKS is on: webhooks may reach any network")
    url = database_url("notify", context.environ)
    bell = Bell(url)
    subscriptions = Subscriptions(store, guard, box)
    topics = Topics(store)
    announcer = Announcer(event_store)
    events = Events(event_store, subscriptions, bell, announcer, poll_s=settings.poll_s)
    background: list[Callable[[], Coroutine[Any, Any, None]]] = [
        bell.listen_forever,
        announcer.run,
        Sequencer(event_store, bell, poll_s=settings.poll_s).run,
    ]

    async def maintain_forever() -> None:
        while True:
            try:
                pruned = await events.prune(settings.event_retention_days)
                if pruned:
                    log.info("removed %d events past retention", pruned)
            except Exception as error:  # retried next round
                log.warning("pruning events failed: %s", error)
            try:
                # Replicas of an older version or key write plaintext, or seal
                # under the old key, until a rollout ends.
                await seal_at_rest(store, box, strict=False)
            except Exception as error:
                log.warning("sealing webhook secrets failed: %s", error)
            await asyncio.sleep(PRUNE_EVERY_S)

    background.append(maintain_forever)
    metrics = DeliveryMetrics(context.metrics_registry)

    async def read_queue_forever() -> None:
        while True:
            try:
                metrics.record_queue(await delivery_store.queue_stats())
            except Exception as error:  # the gauges keep their last values meanwhile
                log.warning("reading the queue for metrics failed: %s", error)
            await asyncio.sleep(settings.queue_stats_s)

    background.append(read_queue_forever)
    sender: WebhookSender | None = None
    worker_pool: asyncpg.Pool | None = None
    if settings.worker_concurrency > 0:
        # A pool of its own, so a busy queue never starves the RPCs of connections.
        worker_pool = await db.create_pool(url, max_size=4)
        sender = WebhookSender(guard, settings.worker_concurrency)
        worker = DeliveryWorker(
            DeliveryStore(worker_pool),
            sender,
            bell,
            settings,
            box,
            concurrency=settings.worker_concurrency,
            metrics=metrics,
        )
        background.append(worker.run)

    async def close() -> None:
        if sender is not None:
            await sender.close()
        if worker_pool is not None:
            await worker_pool.close()
        await bell.close()

    return Mount(
        servicers=[
            (
                notify_service_pb2_grpc.add_NotifyServiceServicer_to_server,
                NotifyServicer(
                    subscriptions, events, Deliveries(delivery_store, subscriptions), topics
                ),
            )
        ],
        background=background,
        close=close,
        owners={
            "subscriptions": OwnerResolver(subscriptions.owner_of, not_found),
            # Topics are no names: the rules name the field ("topic").
            "topic": OwnerResolver(topics.owner, _no_topic),
        },
    )


def _no_topic(topic: str) -> ServiceError:
    # Unreachable: every topic resolves to an owner.
    return PermissionDenied(f"cannot publish to {topic}", reason="TOPIC_NOT_ALLOWED")


SPEC = ServiceSpec(
    name="notify",
    services=(notify_service_pb2.DESCRIPTOR.services_by_name["NotifyService"],),
    migrations=Path(__file__).parent / "migrations",
    mount=mount,
    settings=NotifySettings,
)
