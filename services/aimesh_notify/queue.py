"""The durable delivery queue and the worker that drains it.

The queue is a table in notify's own PostgreSQL, drained with
FOR UPDATE SKIP LOCKED and woken by LISTEN/NOTIFY, over asyncpg:

- claim: one statement leases up to `claim_batch` due deliveries (status
  pending, or in flight with an expired lease) and returns everything the
  attempt needs. Workers skip each other's locked rows instead of waiting.
- lease: a claimed delivery is in flight until run_after = now + its webhook
  timeout + the visibility timeout. A worker killed mid-attempt simply never
  finishes it; once the lease runs out any worker takes it over. A finish is
  applied only with the lease that was issued, so a stalled worker cannot
  overwrite its successor's result.
- retry: a failed attempt is due again after a delay drawn uniformly from
  [0, min(cap, base * 2^(attempt-1))) (exponential backoff, full jitter).
- dead letter: after `max_attempts` attempts, including one whose worker died
  during it (a poison message that crashes workers cannot loop for ever). Dead
  letters wait for RedriveDeadLetters; they never hold up other deliveries,
  because claims take due rows in run_after order and skip the rest.
- acknowledgements are batched: finished attempts are written in one round
  trip per batch.
- a receiver that stops answering is paused: after a few attempts in a row
  got no answer (or 5xx, 429), the subscription's due deliveries move past a
  pause that doubles while it goes on (ReceiverPauses). Otherwise its backlog,
  each attempt holding a worker for the whole timeout, would keep every other
  subscription waiting.

Delivery is at least once: a worker killed after the receiver answered but
before the finish was written sends again. Receivers dedupe on the delivery
id header (a delivery is one event to one subscription).

Why not a kept library. pgmq is a PostgreSQL extension (CREATE EXTENSION
pgmq): the embedded PostgreSQL 16 that `aimesh up` and the tests run
(pgserver) ships no extension but plpgsql and pgvector, and managed databases
cannot always add one. procrastinate (3.10) depends on psycopg 3 and its
connectors are psycopg, aiopg and Django; there is none for asyncpg, so the
service would carry a second driver and pool. Its jobs are task calls rather
than rows we can join to subscriptions and events, and publish queues the
deliveries in the same statement that stores the event; we would still keep
our own attempts history beside it. The queue here is a few statements over
tables the service already owns.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import logging
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from urllib.parse import quote, urlsplit

from aimesh_notify.delivery_store import Claimed, DeliveryStore, Outcome
from aimesh_notify.events import Bell
from aimesh_notify.http1 import Http1Client, Origin, ProtocolError
from aimesh_notify.metrics import DeliveryMetrics
from aimesh_notify.netguard import DeniedUrl, NetworkGuard
from aimesh_notify.sealing import SealError, SecretBox
from aimesh_notify.settings import NotifySettings
from aimesh_notify.signing import Signed, signature_header

log = logging.getLogger(__name__)

MAX_RESPONSE_BYTES = 64 * 1024  # read at most this much of a receiver's answer
MAX_ERROR_CHARS = 500
LINGER_S = 0.005


def backoff_s(attempt: int, base_s: float, cap_s: float, draw: Callable[[], float]) -> float:
    """Delay before the attempt after `attempt` (1-based): full jitter."""
    ceiling = min(cap_s, base_s * 2 ** min(attempt - 1, 62))
    return float(draw() * ceiling)


def utcnow() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


@dataclass(frozen=True)
class _Route:
    """What a webhook URL turns into on the wire, computed once per URL."""

    target: bytes  # request target: path and query
    host: bytes  # Host header: the URL's host and port


def _route(url: str) -> _Route:
    parts = urlsplit(url)
    target = quote(parts.path or "/", safe=_SAFE)
    if parts.query:
        target += "?" + quote(parts.query, safe=_SAFE + "?")
    host = parts.netloc.rpartition("@")[2]  # the guard refuses credentials anyway
    return _Route(target.encode("ascii"), host.encode("idna" if not host.isascii() else "ascii"))


_SAFE = "/%:@!$&'()*+,;=-._~"
_ROUTES_KEPT = 4096


class WebhookSender:
    """POSTs deliveries over keep-alive HTTP/1.1 connections (see http1)."""

    def __init__(self, guard: NetworkGuard, max_connections: int) -> None:
        self._guard = guard
        self._client = Http1Client(max_connections)
        self._routes: dict[str, _Route] = {}

    async def send(
        self, claimed: Claimed, secrets: tuple[str, ...] | None = None
    ) -> tuple[int, str]:
        """The receiver's HTTP status (0 if none) and an error ("" on 2xx).
        `secrets`: the opened secrets to sign with (default: claimed.secrets)."""
        timeout_s = claimed.timeout_ms / 1000
        try:
            target = await self._guard.check(claimed.url)
        except DeniedUrl as error:
            return 0, f"denied: {error}"
        route = self._routes.get(claimed.url)
        if route is None:
            try:
                route = _route(claimed.url)
            except (ValueError, UnicodeError) as error:
                return 0, f"denied: not a valid URL: {error}"[:MAX_ERROR_CHARS]
            if len(self._routes) >= _ROUTES_KEPT:
                self._routes.clear()
            self._routes[claimed.url] = route
        # Connect to the address that was checked, not to a fresh lookup; the
        # Host header and TLS keep the name.
        origin = Origin(target.scheme, target.address or target.host, target.port, target.host)
        values = claimed.content_type + claimed.topic + claimed.publisher
        if "\r" in values or "\n" in values:
            return 0, "internal: a header value holds a line break"  # validated at publish
        timestamp = int(time.time())
        payload = claimed.payload
        signed = Signed(
            timestamp, str(claimed.id), claimed.event_id, claimed.topic, claimed.publisher
        )
        headers = (
            f"content-type: {claimed.content_type}\r\n"
            f"user-agent: aimesh-notify/1\r\n"
            f"aimesh-delivery: {claimed.id}\r\n"
            f"aimesh-event-id: {claimed.event_id}\r\n"
            f"aimesh-topic: {claimed.topic}\r\n"
            f"aimesh-publisher: {claimed.publisher}\r\n"
            f"aimesh-attempt: {claimed.attempt}\r\n"
            f"aimesh-timestamp: {timestamp}\r\n"
            f"aimesh-signature: {signature_header(secrets or claimed.secrets, signed, payload)}\r\n"
            f"content-length: {len(payload)}\r\n\r\n"
        )
        head = b"POST %s HTTP/1.1\r\nhost: %s\r\n" % (route.target, route.host) + headers.encode(
            "latin-1", "replace"
        )
        try:
            status, _ = await self._client.post(
                origin, head, payload, MAX_RESPONSE_BYTES, timeout_s
            )
        except TimeoutError:
            return 0, f"timed out after {timeout_s:g} s"
        except (OSError, ProtocolError) as error:
            return 0, f"{type(error).__name__}: {error}"[:MAX_ERROR_CHARS]
        if 200 <= status < 300:
            return status, ""
        return status, f"HTTP {status}"

    async def close(self) -> None:
        await self._client.close()


@dataclass
class _Pause:
    failures: int = 0  # attempts in a row without an answer
    length_s: float = 0.0  # of the last pause; the next one doubles it
    until: float = 0.0  # monotonic


class ReceiverPauses:
    """When to pause a subscription whose receiver stopped answering.

    `threshold` attempts in a row that got no answer, a 5xx or a 429 pause it
    for `first_s`; each pause after that, while failures go on, doubles, up to
    `max_s`. Any other answer ends it. Attempts that were under way when the
    pause began do not count again. This worker's view only: each worker
    pauses on what it sees, and the pause itself is in the database."""

    KEPT = 100_000  # subscriptions tracked at once; beyond, forget and start over

    def __init__(
        self,
        threshold: int,
        first_s: float,
        max_s: float,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._threshold = threshold
        self._first_s = first_s
        self._max_s = max_s
        self._clock = clock
        self._state: dict[str, _Pause] = {}

    def record(self, subscription_id: str, failed: bool) -> float:
        """Note an attempt's end; the pause to begin now, in seconds, or 0."""
        if not failed:
            self._state.pop(subscription_id, None)
            return 0.0
        if self._threshold <= 0:
            return 0.0
        state = self._state.get(subscription_id)
        if state is None:
            if len(self._state) >= self.KEPT:
                self._state.clear()
            state = self._state[subscription_id] = _Pause()
        now = self._clock()
        if now < state.until:
            return 0.0  # started before the pause: already counted in it
        state.failures += 1
        if state.failures < self._threshold:
            return 0.0
        state.failures = 0
        state.length_s = min(self._max_s, state.length_s * 2 or self._first_s)
        state.until = now + state.length_s
        return state.length_s

    def remaining_s(self, subscription_id: str) -> float:
        state = self._state.get(subscription_id)
        return 0.0 if state is None else max(0.0, state.until - self._clock())


def receiver_failed(http_status: int, error: str) -> bool:
    """No answer (timeout, refused, reset), a server error, or too many requests."""
    if not error or error.startswith("internal:"):
        return False
    return http_status == 0 or http_status >= 500 or http_status == 429


class DeliveryWorker:
    """Claims due deliveries in batches, runs up to `concurrency` attempts at
    once, and writes their outcomes back in batches."""

    def __init__(
        self,
        store: DeliveryStore,
        sender: WebhookSender,
        bell: Bell,
        settings: NotifySettings,
        box: SecretBox,
        *,
        concurrency: int,
        draw: Callable[[], float] = random.random,
        drain_s: float = 5.0,
        metrics: DeliveryMetrics | None = None,
    ) -> None:
        self._store = store
        self._sender = sender
        self._bell = bell
        self._settings = settings
        self._box = box
        self._concurrency = concurrency
        self._draw = draw
        self._drain_s = drain_s
        self._metrics = metrics
        self._pauses = ReceiverPauses(
            settings.pause_after_failures, settings.pause_first_s, settings.pause_max_s
        )
        self._pausing: set[asyncio.Task[None]] = set()
        self._running: set[asyncio.Task[None]] = set()
        self._outcomes: list[Outcome] = []
        self._has_outcomes = asyncio.Event()
        self.delivered = 0  # attempts that succeeded, for logs and tests

    async def run(self) -> None:
        flusher = asyncio.create_task(self._flush_forever(), name="notify-acks")
        try:
            await self._claim_forever()
        finally:
            await self._drain()
            flusher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await flusher
            await self._flush()

    async def _claim_forever(self) -> None:
        settings = self._settings
        delay = 0.1
        # Under load, wait until this many attempts are free before claiming
        # again: one claim of many rows costs little more than a claim of one.
        low_water = max(1, min(settings.claim_batch, self._concurrency) // 2)
        busy = False  # the last claim was full: the queue has more due
        while True:
            free = self._concurrency - len(self._running)
            if free <= 0 or (busy and free < low_water):
                await asyncio.wait(self._running, return_when=asyncio.FIRST_COMPLETED)
                continue
            wanted = min(settings.claim_batch, free)
            seen = self._bell.generation
            try:
                claimed, dead = await self._store.claim(
                    wanted, settings.max_attempts, settings.visibility_timeout_s
                )
                lost = [(c.id, c.attempt - 1) for c in claimed if c.took_over] + dead
                if lost:
                    await self._store.record_lost_attempts(
                        [i for i, _ in lost], [a for _, a in lost]
                    )
                    if self._metrics is not None:
                        self._metrics.record_lost(len(lost))
            except Exception as error:  # the database may be away
                log.warning("claiming deliveries failed (%s); retrying", error)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 5.0)
                continue
            delay = 0.1
            for delivery in claimed:
                task = asyncio.create_task(self._attempt(delivery))
                self._running.add(task)
                task.add_done_callback(self._running.discard)
            busy = len(claimed) + len(dead) == wanted
            if not busy:
                await self._bell.wait(seen, settings.poll_s)
                # Publishes come in bursts: let a few more commit, then claim them together.
                await asyncio.sleep(LINGER_S)

    async def _attempt(self, delivery: Claimed) -> None:
        started = utcnow()
        try:
            opened = tuple(self._box.open(delivery.subscription_id, s) for s in delivery.secrets)
            http_status, error = await self._sender.send(delivery, opened)
        except SealError as failure:  # never sign with what a wrong key made of it
            log.error("delivery %s not sent: %s", delivery.id, failure)
            http_status, error = 0, "internal: the webhook secret does not open"
        except Exception as failure:  # never let one delivery kill the worker
            log.exception("delivery %s failed unexpectedly", delivery.id)
            http_status, error = 0, f"internal: {type(failure).__name__}"
        ended = utcnow()
        settings = self._settings
        retry_in = 0.0
        if not error:
            status = "succeeded"
            self.delivered += 1
        elif delivery.attempt >= settings.max_attempts:
            status = "dead_letter"
        else:
            status = "pending"
            retry_in = backoff_s(
                delivery.attempt, settings.backoff_base_s, settings.backoff_cap_s, self._draw
            )
        subscription_id = delivery.subscription_id
        pause_s = self._pauses.record(subscription_id, receiver_failed(http_status, error))
        if pause_s:
            task = asyncio.create_task(self._pause(subscription_id, pause_s))
            self._pausing.add(task)
            task.add_done_callback(self._pausing.discard)
        if status == "pending":
            retry_in = max(retry_in, self._pauses.remaining_s(subscription_id))
        if self._metrics is not None:
            outcome = "retry" if status == "pending" else status
            self._metrics.record_attempt(outcome, (ended - started).total_seconds())
        self._outcomes.append(
            Outcome(
                delivery.id,
                delivery.lease,
                delivery.attempt,
                http_status,
                error,
                started,
                ended,
                status,
                retry_in,
            )
        )
        self._has_outcomes.set()

    async def _pause(self, subscription_id: str, pause_s: float) -> None:
        try:
            moved = await self._store.pause_subscription(subscription_id, pause_s)
        except Exception as error:  # its deliveries just keep coming due meanwhile
            log.warning("pausing subscriptions/%s failed: %s", subscription_id, error)
            return
        log.warning(
            "subscriptions/%s: %d attempts in a row got no answer or a server error; "
            "its %d due deliveries wait %g s",
            subscription_id,
            self._settings.pause_after_failures,
            moved,
            pause_s,
        )
        if self._metrics is not None:
            self._metrics.record_pause()

    async def _flush_forever(self) -> None:
        while True:
            await self._has_outcomes.wait()
            self._has_outcomes.clear()
            await self._flush()

    async def _flush(self) -> None:
        if not self._outcomes:
            return
        batch, self._outcomes = self._outcomes, []
        try:
            await self._store.complete(batch)
        except asyncio.CancelledError:
            self._outcomes = batch + self._outcomes
            raise
        except Exception as error:
            # Leases keep the deliveries safe: unwritten ones are simply sent again.
            log.warning("writing %d delivery outcomes failed (%s); retrying", len(batch), error)
            self._outcomes = batch + self._outcomes
            await asyncio.sleep(0.2)
            self._has_outcomes.set()

    async def _drain(self) -> None:
        """Let attempts under way finish briefly; the rest are redelivered by lease."""
        if self._running:
            _, late = await asyncio.wait(set(self._running), timeout=self._drain_s)
            for task in late:
                task.cancel()
            if late:
                await asyncio.wait(late)
