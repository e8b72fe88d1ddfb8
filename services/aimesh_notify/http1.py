"""A small HTTP/1.1 client for webhook POSTs, over asyncio streams.

The worker only ever sends one kind of request: a POST with a body it holds in
memory, to a host the SSRF guard has checked, reading back a status and at
most a few KiB of answer. httpx did that at several times the CPU cost per
request: its pool checks every idle connection for readability on every
request, through anyio, which made the sender the worker's bottleneck. This
client keeps what a delivery needs and nothing more:

- keep-alive connections, pooled per (scheme, address, port, TLS name), idle
  ones closed after IDLE_S; a request on a reused connection that the peer
  had closed (nothing read back) is sent once more on a fresh one;
- TLS with the system's trust store and the webhook's name for SNI and
  certificate checks, even when connecting to a checked address;
- responses with a content-length, chunked, or delimited by close; at most
  `max_body` bytes are read, and a connection whose answer was cut short, or
  that says "connection: close", is not reused;
- no redirects, no proxies, no cookies: a redirect could lead past the guard.

The caller bounds the whole exchange with a timeout; a connection in use when
the timeout strikes is closed, never reused.
"""

from __future__ import annotations

import asyncio
import ssl
import time
from collections import deque
from dataclasses import dataclass

IDLE_S = 5.0  # close keep-alive connections unused for this long
MAX_HEAD_BYTES = 64 * 1024  # status line and headers of an answer


class ProtocolError(Exception):
    """The peer did not answer with HTTP/1.x."""


@dataclass(frozen=True)
class Origin:
    scheme: str  # http or https
    address: str  # what to connect to: an IP literal, or a name to resolve
    port: int
    server_name: str  # TLS SNI and certificate name (https only)


class _Connection:
    __slots__ = ("reader", "used_at", "writer")

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self.used_at = time.monotonic()

    def alive(self, now: float) -> bool:
        return (
            now - self.used_at < IDLE_S
            and not self.reader.at_eof()
            and not self.writer.is_closing()
        )

    def close(self) -> None:
        self.writer.close()


class Http1Client:
    def __init__(self, max_idle_per_origin: int) -> None:
        self._max_idle = max(1, max_idle_per_origin)
        self._idle: dict[Origin, deque[_Connection]] = {}
        self._tls: ssl.SSLContext | None = None

    async def post(
        self, origin: Origin, head: bytes, body: bytes, max_body: int
    ) -> tuple[int, bytes]:
        """Send a request (its head, CRLF-terminated, and its body); the status
        and up to `max_body` bytes of the answer."""
        connection = self._reuse(origin)
        if connection is not None:
            try:
                return await self._exchange(origin, connection, head, body, max_body)
            except _ClosedBeforeAnswer:
                pass  # the peer closed it while idle: once more on a fresh one
        connection = await self._connect(origin)
        try:
            return await self._exchange(origin, connection, head, body, max_body)
        except _ClosedBeforeAnswer:
            raise ConnectionError("the receiver closed the connection without answering") from None

    async def close(self) -> None:
        for idle in self._idle.values():
            for connection in idle:
                connection.close()
        self._idle.clear()

    def _reuse(self, origin: Origin) -> _Connection | None:
        idle = self._idle.get(origin)
        now = time.monotonic()
        while idle:
            connection = idle.pop()  # the most recently used: the likeliest alive
            if connection.alive(now):
                return connection
            connection.close()
        return None

    def _release(self, origin: Origin, connection: _Connection) -> None:
        idle = self._idle.get(origin)
        if idle is None:
            idle = self._idle[origin] = deque()
        now = time.monotonic()
        while idle and not idle[0].alive(now):
            idle.popleft().close()  # the least recently used go first
        if len(idle) >= self._max_idle:
            connection.close()
            return
        connection.used_at = now
        idle.append(connection)

    async def _connect(self, origin: Origin) -> _Connection:
        if origin.scheme == "https":
            if self._tls is None:
                self._tls = ssl.create_default_context()
            reader, writer = await asyncio.open_connection(
                origin.address,
                origin.port,
                ssl=self._tls,
                server_hostname=origin.server_name,
                limit=MAX_HEAD_BYTES,
            )
        else:
            reader, writer = await asyncio.open_connection(
                origin.address, origin.port, limit=MAX_HEAD_BYTES
            )
        return _Connection(reader, writer)

    async def _exchange(
        self, origin: Origin, connection: _Connection, head: bytes, body: bytes, max_body: int
    ) -> tuple[int, bytes]:
        reusable = False
        try:
            try:
                if len(body) < 16384:
                    connection.writer.write(head + body)
                else:
                    connection.writer.writelines((head, body))
                await connection.writer.drain()
                answer_head = await connection.reader.readuntil(b"\r\n\r\n")
            except asyncio.IncompleteReadError as error:
                if error.partial:
                    raise ProtocolError("the answer ended within its headers") from None
                raise _ClosedBeforeAnswer() from None
            except ConnectionError:
                raise _ClosedBeforeAnswer() from None
            except asyncio.LimitOverrunError:
                raise ProtocolError("the answer's headers are too long") from None
            try:
                status, reusable, answer = await _read_response(
                    connection.reader, answer_head, max_body
                )
            except asyncio.IncompleteReadError:
                raise ProtocolError("the answer ended early") from None
            except asyncio.LimitOverrunError:
                raise ProtocolError("an answer line is too long") from None
        finally:
            if reusable:
                self._release(origin, connection)
            else:
                connection.close()
        return status, answer


class _ClosedBeforeAnswer(Exception):
    pass


async def _read_response(
    reader: asyncio.StreamReader, head: bytes, max_body: int
) -> tuple[int, bool, bytes]:
    """Status, whether the connection may be reused, and the answer's start."""
    while True:
        lines = head.decode("latin-1").split("\r\n")
        version, _, rest = lines[0].partition(" ")
        if not version.startswith("HTTP/1.") or len(rest) < 3 or not rest[:3].isdigit():
            raise ProtocolError(f"not an HTTP/1.x answer: {lines[0][:80]!r}")
        status = int(rest[:3])
        if 100 <= status < 200 and status != 101:
            # An interim answer (100 Continue, 103 Early Hints); the real one follows.
            head = await reader.readuntil(b"\r\n\r\n")
            continue
        break
    length: int | None = None
    chunked = False
    close = version == "HTTP/1.0"
    for line in lines[1:]:
        name, sep, value = line.partition(":")
        if not sep:
            continue
        name = name.strip().lower()
        if name == "content-length":
            try:
                length = int(value.strip())
            except ValueError:
                raise ProtocolError("a bad content-length") from None
            if length < 0:
                raise ProtocolError("a bad content-length")
        elif name == "transfer-encoding":
            chunked = value.strip().lower().endswith("chunked")
        elif name == "connection":
            tokens = {token.strip().lower() for token in value.split(",")}
            if "close" in tokens:
                close = True
            elif "keep-alive" in tokens:
                close = False
    if status in (204, 304) or status == 101:
        return status, not close and status != 101, b""
    if chunked:
        answer, complete = await _read_chunked(reader, max_body)
        return status, complete and not close, answer
    if length is not None:
        if length <= max_body:
            return status, not close, await reader.readexactly(length)
        return status, False, await reader.readexactly(max_body)
    # Delimited by the end of the connection.
    parts: list[bytes] = []
    read = 0
    while read < max_body:
        part = await reader.read(max_body - read)
        if not part:
            break
        parts.append(part)
        read += len(part)
    return status, False, b"".join(parts)


async def _read_chunked(reader: asyncio.StreamReader, max_body: int) -> tuple[bytes, bool]:
    """The body, and whether it was read to its end (and so the connection is reusable)."""
    parts: list[bytes] = []
    read = 0
    while True:
        line = await reader.readuntil(b"\r\n")
        try:
            size = int(line.split(b";", 1)[0].strip(), 16)
        except ValueError:
            raise ProtocolError("a bad chunk size") from None
        if size == 0:
            while (await reader.readuntil(b"\r\n")) != b"\r\n":
                pass  # trailers
            return b"".join(parts), True
        if read + size > max_body:
            return b"".join(parts), False
        parts.append(await reader.readexactly(size))
        read += size
        if await reader.readexactly(2) != b"\r\n":
            raise ProtocolError("a chunk without its CRLF")
