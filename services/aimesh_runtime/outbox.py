"""Transactional outbox: events written with the change, published to notify later.

`emit` inserts the event into the service's own `outbox` table on the
caller's connection, so it commits or rolls back with the change it
announces, and wakes the relay with NOTIFY (delivered only on commit).

`OutboxRelay` claims due rows in id order (FOR UPDATE SKIP LOCKED, so
replicas share the work), publishes each through notify's Publish with the
idempotency key "<service>:outbox:<id>", a deadline and a circuit breaker,
and marks them published in the same transaction. All of its state is in the
table: a crash before the commit leaves the rows unpublished, and they are
sent again with the same keys, which notify deduplicates. At least once plus
dedupe is effectively once. Order is kept within a batch; a row that failed
waits for its backoff while later rows go on, so consumers should not rely
on order across failures (payloads carry outbox_id and emit_time).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import logging
import random
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import asyncpg
import grpc

from aimesh.notify.v1 import notify_service_pb2, notify_service_pb2_grpc
from aimesh_runtime.resilience import BreakerOpen, CircuitBreaker

log = logging.getLogger(__name__)

CHANNEL = "aimesh_outbox"  # LISTEN/NOTIFY channel
MAX_PAYLOAD_BYTES = 60 * 1024  # notify takes 64 KiB; leave room for the envelope
# notify will never take these: retrying cannot help, so the row is parked (kept).
REFUSED_FOR_GOOD = frozenset(
    {
        grpc.StatusCode.INVALID_ARGUMENT,
        grpc.StatusCode.ALREADY_EXISTS,
        grpc.StatusCode.OUT_OF_RANGE,
    }
)

Credentials = Callable[[], Sequence[tuple[str, str]]]


async def emit(
    conn: asyncpg.Connection, *, topic: str, key: str, payload: Mapping[str, Any]
) -> None:
    """Queue an event in the caller's transaction; `key` names what it is about."""
    body = json.dumps(dict(payload), default=str, separators=(",", ":"))
    if len(body) > MAX_PAYLOAD_BYTES:
        raise ValueError(f"outbox payload of {topic} is {len(body)} bytes; at most 60 KiB")
    await conn.execute(
        """WITH added AS (INSERT INTO outbox (topic, key, payload) VALUES ($1, $2, $3::jsonb)
                          RETURNING id)
           SELECT pg_notify($4, '') FROM added""",
        topic,
        key,
        body,
        CHANNEL,
    )


def idempotency_key(service: str, outbox_id: int) -> str:
    return f"{service}:outbox:{outbox_id}"


def envelope(service: str, row: Mapping[str, Any]) -> bytes:
    """What notify receives: the same bytes on every retry of a row."""
    data = row["payload"]
    return json.dumps(
        {
            "source": service,
            "outbox_id": row["id"],
            "topic": row["topic"],
            "key": row["key"],
            "emit_time": row["create_time"].isoformat(),
            "data": json.loads(data) if isinstance(data, str) else data,
        },
        sort_keys=True,
        separators=(",", ":"),
    ).encode()


class OutboxRelay:
    """Publishes one service's outbox to notify until cancelled."""

    def __init__(
        self,
        pool: asyncpg.Pool,
        channel: grpc.aio.Channel,
        *,
        service: str,
        credentials: Credentials,
        batch_size: int = 100,
        poll_s: float = 2.0,
        timeout_s: float = 5.0,
        max_backoff_s: float = 300.0,
        breaker: CircuitBreaker | None = None,
    ) -> None:
        self._pool = pool
        self._stub = notify_service_pb2_grpc.NotifyServiceStub(channel)
        self._service = service
        self._credentials = credentials
        self._batch_size = batch_size
        self._poll_s = poll_s
        self._timeout_s = timeout_s
        self._max_backoff_s = max_backoff_s
        self._breaker = breaker or CircuitBreaker(f"{service}.outbox.notify")
        self._wake = asyncio.Event()
        self.published = 0  # rows marked published by this relay, for logs and tests

    def _on_notify(self, *_: object) -> None:
        self._wake.set()

    async def run(self) -> None:
        """LISTEN for new rows and drain; poll as a fallback if a wake-up is missed."""
        while True:
            try:
                async with self._pool.acquire() as listener:
                    await listener.add_listener(CHANNEL, self._on_notify)
                    try:
                        await self._serve(listener)
                    finally:
                        with contextlib.suppress(Exception):
                            await listener.remove_listener(CHANNEL, self._on_notify)
            except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as error:
                log.warning("outbox relay of %s: database unavailable (%s)", self._service, error)
                await asyncio.sleep(self._poll_s)

    async def _serve(self, listener: asyncpg.Connection) -> None:
        while not listener.is_closed():
            self._wake.clear()
            delay = self._poll_s
            try:
                await self.drain()
            except BreakerOpen as error:
                delay = max(error.retry_after_s, 0.05)
            except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as error:
                log.warning("outbox relay of %s: %s", self._service, error)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), delay)

    async def drain(self) -> int:
        """Publish batches until none is due; the number of rows published."""
        total = 0
        while True:
            published, claimed = await self.publish_batch()
            total += published
            if claimed < self._batch_size or published < claimed:
                return total

    async def publish_batch(self) -> tuple[int, int]:
        """Claim one batch and publish it; (rows published, rows claimed).

        Raises BreakerOpen (after committing what was published) when notify
        is refusing calls, so the caller waits instead of spinning.
        """
        published, refused = 0, None
        async with self._pool.acquire() as conn, conn.transaction():
            rows = await conn.fetch(
                """SELECT id, topic, key, payload, create_time, attempts FROM outbox
                   WHERE publish_time IS NULL AND fail_time IS NULL
                     AND next_attempt_time <= now()
                   ORDER BY id LIMIT $1 FOR UPDATE SKIP LOCKED""",
                self._batch_size,
            )
            for row in rows:
                try:
                    await self._breaker.call(functools.partial(self._publish, row))
                except BreakerOpen as error:
                    refused = error
                    break
                except grpc.aio.AioRpcError as error:
                    if error.code() in REFUSED_FOR_GOOD:
                        await self._park(conn, row, error)
                        continue
                    await self._back_off(conn, row, f"{error.code().name}: {error.details()}")
                    break  # notify is failing: the rest of the batch waits for next time
                except (TimeoutError, OSError) as error:
                    await self._back_off(conn, row, repr(error))
                    break
                await conn.execute(
                    "UPDATE outbox SET publish_time = now() WHERE id = $1", row["id"]
                )
                published += 1
        self.published += published
        if refused is not None:
            raise refused
        return published, len(rows)

    async def _publish(self, row: asyncpg.Record) -> None:
        request = notify_service_pb2.PublishRequest(
            topic=row["topic"],
            idempotency_key=idempotency_key(self._service, row["id"]),
            payload=envelope(self._service, row),
            content_type="application/json",
        )
        await self._stub.Publish(
            request, timeout=self._timeout_s, metadata=tuple(self._credentials())
        )

    async def _back_off(self, conn: asyncpg.Connection, row: asyncpg.Record, error: str) -> None:
        attempts = row["attempts"] + 1
        delay = min(self._max_backoff_s, 0.5 * 2 ** min(attempts, 20)) * random.uniform(0.5, 1.0)
        log.warning(
            "outbox %s:%s (%s) not published, attempt %d, next in %.1f s: %s",
            self._service, row["id"], row["topic"], attempts, delay, error,
        )  # fmt: skip
        await conn.execute(
            """UPDATE outbox SET attempts = $2, last_error = $3,
                   next_attempt_time = now() + make_interval(secs => $4)
               WHERE id = $1""",
            row["id"], attempts, error[:1000], delay,
        )  # fmt: skip

    async def _park(
        self, conn: asyncpg.Connection, row: asyncpg.Record, error: grpc.aio.AioRpcError
    ) -> None:
        message = f"{error.code().name}: {error.details()}"
        log.error("outbox %s:%s (%s) refused by notify, kept: %s",
                  self._service, row["id"], row["topic"], message)  # fmt: skip
        await conn.execute(
            """UPDATE outbox SET attempts = attempts + 1, last_error = $2, fail_time = now()
               WHERE id = $1""",
            row["id"],
            message[:1000],
        )
