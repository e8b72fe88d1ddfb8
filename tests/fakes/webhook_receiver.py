"""A real HTTP/1.1 webhook receiver on 127.0.0.1, with keep-alive.

It does what a careful receiver does, written independently of the service:
it checks the HMAC-SHA256 "v1=" and "v2=" signatures against the secrets it
was given for the path, and dedupes on the delivery id. It
counts every request, so tests see raw redeliveries as well as the deduped set.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field


@dataclass(frozen=True)
class Received:
    path: str
    headers: dict[str, str]
    body: bytes
    # Which of the path's secrets signed it (empty: none did).
    signed_by: tuple[str, ...]

    @property
    def delivery(self) -> str:
        return self.headers.get("aimesh-delivery", "")


def signed_by(secrets: list[str], headers: dict[str, str], body: bytes) -> tuple[str, ...]:
    """The secrets that signed the request, both ways notify signs: v1 over
    "{timestamp}.{body}", v2 over the timestamp, delivery id, event id and topic,
    a line each, then the body."""
    timestamp = headers.get("aimesh-timestamp", "")
    parts = [part.strip() for part in headers.get("aimesh-signature", "").split(",")]
    v1 = [part.removeprefix("v1=") for part in parts if part.startswith("v1=")]
    v2 = [part.removeprefix("v2=") for part in parts if part.startswith("v2=")]
    fields = ("aimesh-delivery", "aimesh-event-id", "aimesh-topic")
    v2_message = "\n".join([timestamp, *(headers.get(f, "") for f in fields)]).encode()
    found = []
    for secret in secrets:
        key = secret.encode()
        mac1 = hmac.new(key, timestamp.encode() + b"." + body, hashlib.sha256).hexdigest()
        mac2 = hmac.new(key, v2_message + b"\n" + body, hashlib.sha256).hexdigest()
        if any(hmac.compare_digest(mac1, s) for s in v1) and any(
            hmac.compare_digest(mac2, s) for s in v2
        ):
            found.append(secret)
    return tuple(found)


@dataclass
class WebhookReceiver:
    # Secrets per path; a request is accepted only if one of them signed it.
    secrets: dict[str, list[str]] = field(default_factory=dict)
    # Status to answer for a request (default 200 when verified, 401 when not).
    answer: Callable[[Received], int | None] = lambda _: None
    keep: bool = True  # keep each request (tests); a bench keeps only counts
    requests: list[Received] = field(default_factory=list)
    deliveries: Counter[str] = field(default_factory=Counter)
    accepted: set[str] = field(default_factory=set)
    total = 0
    unsigned = 0
    port = 0

    def __post_init__(self) -> None:
        self._server: asyncio.Server | None = None
        self._changed = asyncio.Event()
        self._writers: set[asyncio.StreamWriter] = set()

    async def start(self) -> WebhookReceiver:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0, backlog=512)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    @property
    def duplicates(self) -> int:
        """Accepted requests beyond the first for each delivery."""
        return sum(count - 1 for count in self.deliveries.values() if count > 1)

    async def wait_for(self, predicate: Callable[[], bool], timeout_s: float = 20.0) -> None:
        async with asyncio.timeout(timeout_s):
            while not predicate():
                self._changed.clear()
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(0.5):
                        await self._changed.wait()

    def _handle(self, path: str, headers: dict[str, str], body: bytes) -> int:
        by = signed_by(self.secrets.get(path, []), headers, body)
        request = Received(path, headers, body, by)
        self.total += 1
        if self.keep:
            self.requests.append(request)
        status = self.answer(request)
        if status is None:
            status = 200 if by else 401
        if not by:
            self.unsigned += 1
        elif 200 <= status < 300:
            self.deliveries[request.delivery] += 1
            self.accepted.add(request.delivery)
        self._changed.set()
        return status

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._writers.add(writer)
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                lines = head.decode("latin-1").split("\r\n")
                path = lines[0].split(" ")[1]
                headers: dict[str, str] = {}
                for line in lines[1:]:
                    if ":" in line:
                        name, value = line.split(":", 1)
                        headers[name.strip().lower()] = value.strip()
                body = await reader.readexactly(int(headers.get("content-length", "0")))
                status = self._handle(path, headers, body)
                writer.write(f"HTTP/1.1 {status} X\r\ncontent-length: 0\r\n\r\n".encode())
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError, asyncio.LimitOverrunError):
            pass
        finally:
            self._writers.discard(writer)
            writer.close()

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            for writer in list(self._writers):
                writer.close()  # the handler's read then ends
            await self._server.wait_closed()
