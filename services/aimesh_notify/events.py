"""Publishing events once, and reading them back as a gap-free stream.

A publish only inserts (the event and its webhook deliveries, one
statement), so concurrent publishes share disk flushes. Stream order is given
afterwards by the sequencer: one run at a time (an advisory lock, whichever
replica holds it) numbers the committed, unnumbered events in one
transaction. Numbers thus become visible strictly in order, and a reader that
has seen sequence n never later finds a smaller one: the cursor is the last
sequence read, and "replay, then tail" is one query in a loop, woken by
LISTEN/NOTIFY.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import logging
import uuid
from collections.abc import AsyncGenerator, Callable, Sequence
from dataclasses import dataclass
from typing import NamedTuple

import asyncpg

from aimesh_notify.event_store import CHANNEL, EventRow, EventStore
from aimesh_notify.subscriptions import Subscriptions, not_found
from aimesh_runtime.auth import Principal
from aimesh_runtime.errors import AlreadyExists, FailedPrecondition, InvalidArgument
from aimesh_runtime.pages import decode_page_token, encode_page_token

log = logging.getLogger(__name__)

MAX_PAYLOAD_BYTES = 64 * 1024
DEFAULT_CONTENT_TYPE = "application/json"
STREAM_BATCH = 500
SEQUENCE_LINGER_S = 0.01


@dataclass(frozen=True)
class Published:
    event: EventRow
    duplicate: bool


class Bell:
    """Wakes waiters when the database says something new arrived.

    One LISTEN connection per process. Waiters also wake after a timeout, so a
    notification lost with a dropped connection delays them, never stalls them.
    """

    def __init__(self, url: str) -> None:
        self._url = url
        self._rung = asyncio.Event()
        self._generation = 0
        self._connection: asyncpg.Connection | None = None

    @property
    def generation(self) -> int:
        return self._generation

    def ring(self, *_: object) -> None:
        self._generation += 1
        self._rung.set()
        self._rung = asyncio.Event()

    async def wait(self, seen: int, timeout_s: float) -> None:
        """Return once rung after generation `seen`, or after `timeout_s`."""
        if self._generation != seen:
            return
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout_s):
                await self._rung.wait()

    async def listen_forever(self) -> None:
        delay = 0.1
        while True:
            try:
                connection = await asyncpg.connect(self._url)
                self._connection = connection
                await connection.add_listener(CHANNEL, self.ring)
                delay = 0.1
                self.ring()  # anything sent while we were away is due now
                while not connection.is_closed():
                    await asyncio.sleep(1.0)
            except asyncio.CancelledError:
                raise
            except Exception as error:  # the database may be restarting
                log.warning("notify listener lost (%s); reconnecting", error)
            finally:
                await self.close()
            await asyncio.sleep(delay)
            delay = min(delay * 2, 5.0)

    async def close(self) -> None:
        if self._connection is not None:
            self._connection.terminate()
            self._connection = None


class Announcer:
    """Tells other processes (workers, replicas) that events were published.

    Publishes never NOTIFY themselves: PostgreSQL holds a global lock through
    the commit of a notifying transaction. Instead pokes are coalesced here
    into at most one NOTIFY in flight at a time.
    """

    def __init__(self, store: EventStore) -> None:
        self._store = store
        self._poked = asyncio.Event()

    def poke(self) -> None:
        self._poked.set()

    async def run(self) -> None:
        while True:
            await self._poked.wait()
            self._poked.clear()
            try:
                await self._store.notify("published")
            except Exception as error:  # pollers still find the work, a little later
                log.warning("announcing published events failed: %s", error)
                await asyncio.sleep(0.5)


class Sequencer:
    """Numbers committed events for streams, batch by batch."""

    def __init__(self, store: EventStore, bell: Bell, *, poll_s: float, batch: int = 5000) -> None:
        self._store = store
        self._bell = bell
        self._poll_s = poll_s
        self._batch = batch

    async def run(self) -> None:
        while True:
            seen = self._bell.generation
            try:
                numbered = await self._store.sequence(self._batch)
            except Exception as error:  # the database may be away
                log.warning("sequencing events failed: %s", error)
                await asyncio.sleep(self._poll_s)
                continue
            if numbered:
                self._bell.ring()
            if numbered < self._batch:
                await self._bell.wait(seen, self._poll_s)
                # One run per burst of publishes, not one per publish.
                await asyncio.sleep(SEQUENCE_LINGER_S)


class Publish(NamedTuple):
    """One event to publish, as a caller sent it."""

    topic: str
    key: str
    payload: bytes
    content_type: str


def check_publish(payload: bytes, key: str, prefix: str = "") -> None:
    if len(payload) > MAX_PAYLOAD_BYTES:
        raise InvalidArgument.field(f"{prefix}payload", f"at most {MAX_PAYLOAD_BYTES} bytes")
    if not key:
        raise InvalidArgument.field(f"{prefix}idempotency_key", "required")


def key_reused(key: str, event_id: str) -> AlreadyExists:
    metadata = {"idempotency_key": key}
    if event_id:
        metadata["event"] = event_id
    return AlreadyExists(
        "the idempotency key was already used with another topic or payload",
        reason="IDEMPOTENCY_KEY_REUSED",
        metadata=metadata,
    )


def check_same(
    first: EventRow, topic: str, payload: bytes, content_type: str, publisher: str
) -> None:
    """AlreadyExists unless the key's first event is the one now published again."""
    if first.publisher != publisher:
        # Someone else's key: do not hand out their event.
        raise key_reused(first.idempotency_key, "")
    if (first.topic, first.payload, first.content_type) != (topic, payload, content_type):
        raise key_reused(first.idempotency_key, first.id)


def encode_cursor(seq: int) -> str:
    return encode_page_token(["seq", seq])


def decode_cursor(cursor: str) -> int | None:
    """The sequence a cursor stands after; None for an empty cursor."""
    if not cursor:
        return None
    invalid = InvalidArgument.field("cursor", "not a cursor that Subscribe returned")
    try:
        position = decode_page_token(cursor)
    except InvalidArgument:
        raise invalid from None
    if (
        isinstance(position, list)
        and len(position) == 2
        and position[0] == "seq"
        and isinstance(position[1], int)
        and position[1] >= 0
    ):
        return position[1]
    raise invalid


class Events:
    def __init__(
        self,
        store: EventStore,
        subscriptions: Subscriptions,
        bell: Bell,
        announcer: Announcer,
        *,
        poll_s: float = 1.0,
    ) -> None:
        self._store = store
        self._subscriptions = subscriptions
        self._bell = bell
        self._announcer = announcer
        self._poll_s = poll_s

    async def publish(
        self, topic: str, key: str, payload: bytes, content_type: str, publisher: str
    ) -> Published:
        check_publish(payload, key)
        content_type = content_type or DEFAULT_CONTENT_TYPE
        event = await self._store.publish(
            uuid.uuid4().hex, topic, payload, content_type, key, publisher
        )
        if event is not None:
            self._bell.ring()  # this process's worker and sequencer
            self._announcer.poke()  # everyone else's
            return Published(event, duplicate=False)
        first = await self._store.event_by_key(key)
        if first is None:  # pruned between the two statements; extremely unlikely
            raise FailedPrecondition(
                "the idempotency key's event was just removed by retention; publish again",
                reason="EVENT_PRUNED",
            )
        check_same(first, topic, payload, content_type, publisher)
        return Published(first, duplicate=True)

    async def publish_batch(self, requests: Sequence[Publish], publisher: str) -> list[Published]:
        """Publish each as `publish` would, in one transaction: all or nothing."""
        wanted: list[Publish] = []
        firsts: dict[str, Publish] = {}  # key: its first request in the batch
        for index, (topic, key, payload, content_type) in enumerate(requests):
            check_publish(payload, key, f"requests[{index}].")
            request = Publish(topic, key, payload, content_type or DEFAULT_CONTENT_TYPE)
            wanted.append(request)
            first = firsts.setdefault(key, request)
            if first is not request and first != request:
                raise key_reused(key, "")  # the same key twice, with another event

        def check(known: list[EventRow]) -> None:
            for event in known:
                request = firsts[event.idempotency_key]
                check_same(event, request.topic, request.payload, request.content_type, publisher)

        new, known = await self._store.publish_batch(
            [
                (uuid.uuid4().hex, r.topic, r.payload, r.content_type, r.key, publisher)
                for r in firsts.values()
            ],
            check,
        )
        if new:
            self._bell.ring()  # this process's worker and sequencer
            self._announcer.poke()  # everyone else's
        if len(new) + len(known) < len(firsts):  # pruned meanwhile; extremely unlikely
            raise FailedPrecondition(
                "an idempotency key's event was just removed by retention; publish again",
                reason="EVENT_PRUNED",
            )
        fresh = {event.idempotency_key: event for event in new}
        events = {event.idempotency_key: event for event in known} | fresh
        answered: set[str] = set()
        published: list[Published] = []
        for request in wanted:
            event = events[request.key]
            first_time = request.key in fresh and request.key not in answered
            answered.add(request.key)
            published.append(Published(event, duplicate=not first_time))
        return published

    async def stream(
        self, caller: Principal, name: str, cursor: str, *, alive: Callable[[], bool] = lambda: True
    ) -> AsyncGenerator[tuple[EventRow, str], None]:
        """Events after `cursor` (replay), then new ones as they commit (tail)."""
        row = await self._subscriptions.get(caller, name, "subscription")
        if row.kind != "stream":
            raise FailedPrecondition(
                f"{name} is a webhook subscription; its events are POSTed, not streamed",
                reason="NOT_A_STREAM",
                metadata={"name": name},
            )
        after = decode_cursor(cursor)
        position = after or 0
        pruned = await self._store.pruned_through()
        if after is not None and after < pruned:
            raise FailedPrecondition(
                "the cursor is older than the events kept; start again with an empty cursor",
                reason="CURSOR_EXPIRED",
                metadata={"cursor": cursor},
            )
        topics = row.topics
        while alive():
            seen = self._bell.generation  # before the query, so no commit slips between
            events = await self._store.events_after(position, row.start_pos, topics, STREAM_BATCH)
            for event in events:
                assert event.seq is not None  # only numbered events are read
                position = event.seq
                yield event, encode_cursor(event.seq)
            if len(events) == STREAM_BATCH:
                continue
            await self._bell.wait(seen, self._poll_s)
            # Picks up topic changes, and ends the stream if the subscription went.
            current = await self._subscriptions.by_id(row.id)
            if current is None:
                raise not_found(name)
            topics = current.topics

    async def prune(self, retention_days: float) -> int:
        return await self._store.prune_events(dt.timedelta(days=retention_days))
