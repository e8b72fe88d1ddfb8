"""A small HTTP/1.1 client for webhook POSTs, over asyncio protocols.

The worker only ever sends one kind of request: a POST with a body it holds in
memory, to a host the SSRF guard has checked, reading back a status and at
most a few KiB of answer. httpx did that at several times the CPU cost per
request: its pool checks every idle connection for readability on every
request, through anyio, which made the sender the worker's bottleneck. A
timer per request (asyncio.timeout) was next in the worker's profile, so each
connection here is a protocol with a plain buffer that one periodic sweep can
abort when its exchange runs late. This client keeps what a delivery needs and
nothing more:

- keep-alive connections, pooled per (scheme, address, port, TLS name), idle
  ones closed after IDLE_S; a request on a reused connection that the peer
  had closed (nothing read back) is sent once more on a fresh one;
- TLS with the system's trust store and the webhook's name for SNI and
  certificate checks, even when connecting to a checked address;
- responses with a content-length, chunked, or delimited by close; at most
  `max_body` bytes are read, and a connection whose answer was cut short, or
  that says "connection: close", is not reused;
- no redirects, no proxies, no cookies: a redirect could lead past the guard.

The caller bounds the whole exchange with a timeout (struck up to SWEEP_S
late); a connection in use when it strikes is closed, never reused.
"""

from __future__ import annotations

import asyncio
import ssl
import time
from collections import deque
from dataclasses import dataclass

IDLE_S = 5.0  # close keep-alive connections unused for this long
MAX_HEAD_BYTES = 64 * 1024  # status line and headers of an answer
MAX_BUFFERED = 4 * MAX_HEAD_BYTES  # unread bytes kept before reading from the peer pauses
# How often exchanges under way are checked against their deadlines: a timeout
# strikes up to this late. One check for all, instead of a timer each, which
# cost the worker more than the rest of an exchange's bookkeeping.
SWEEP_S = 0.02


class ProtocolError(Exception):
    """The peer did not answer with HTTP/1.x."""


@dataclass(frozen=True)
class Origin:
    scheme: str  # http or https
    address: str  # what to connect to: an IP literal, or a name to resolve
    port: int
    server_name: str  # TLS SNI and certificate name (https only)


class _TooLong(Exception):
    """A line or head ran past its limit."""


class _Ended(Exception):
    """The peer closed the connection (or it failed) before the bytes wanted came."""

    def __init__(self, partial: bool) -> None:
        super().__init__()
        self.partial = partial  # some of the bytes wanted had come


class _Connection(asyncio.Protocol):
    """One keep-alive connection: what the peer sent waits in `_buffer` until read."""

    def __init__(self) -> None:
        self._transport: asyncio.Transport | None = None
        self._buffer = bytearray()
        self._ended = False  # EOF, or the connection is lost
        self._waiter: asyncio.Future[None] | None = None  # a read waiting for bytes
        self._drained: asyncio.Future[None] | None = None  # a write waiting for room
        self._paused = False
        self._reading_paused = False
        self.used_at = time.monotonic()
        self.deadline = 0.0  # loop time by which the exchange under way must end
        self.expired = False  # it did not: the connection was aborted

    # asyncio.Protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self._transport = transport

    def data_received(self, data: bytes) -> None:
        self._buffer += data
        if len(self._buffer) > MAX_BUFFERED and self._transport is not None:
            self._transport.pause_reading()  # a read that wants more resumes it
            self._reading_paused = True
        self._wake()

    def eof_received(self) -> bool:
        self._ended = True
        self._wake()
        return False  # close our side too

    def connection_lost(self, exc: Exception | None) -> None:
        self._ended = True
        self._wake()
        drained, self._drained = self._drained, None
        if drained is not None and not drained.done():
            drained.set_result(None)

    def pause_writing(self) -> None:
        self._paused = True

    def resume_writing(self) -> None:
        self._paused = False
        drained, self._drained = self._drained, None
        if drained is not None and not drained.done():
            drained.set_result(None)

    def _wake(self) -> None:
        waiter, self._waiter = self._waiter, None
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    # used by the client

    def alive(self, now: float) -> bool:
        transport = self._transport
        return (
            now - self.used_at < IDLE_S
            and not (self._ended and not self._buffer)
            and transport is not None
            and not transport.is_closing()
        )

    def close(self) -> None:
        if self._transport is not None:
            self._transport.close()

    def expire(self) -> None:
        """The exchange ran past its deadline: drop the connection, end its waits."""
        self.expired = True
        self._ended = True
        if self._transport is not None:
            self._transport.abort()
        self._wake()
        drained, self._drained = self._drained, None
        if drained is not None and not drained.done():
            drained.set_result(None)

    async def send(self, head: bytes, body: bytes) -> None:
        transport = self._transport
        if self._ended or transport is None or transport.is_closing():
            raise ConnectionResetError("the connection is closed")
        if len(body) < 16384:
            transport.write(head + body)  # one send for the usual small event
        else:
            transport.writelines((head, body))
        if self._paused:  # the peer reads slowly: wait until the buffer empties
            self._drained = asyncio.get_running_loop().create_future()
            await self._drained
            if self._ended:
                raise ConnectionResetError("the connection was lost while sending")

    async def _more(self) -> None:
        """Wait until the peer sends more, or the connection ends."""
        if self._reading_paused and self._transport is not None:
            self._reading_paused = False
            self._transport.resume_reading()
        self._waiter = asyncio.get_running_loop().create_future()
        await self._waiter

    async def readuntil(self, separator: bytes, limit: int) -> bytes:
        """Bytes up to and including `separator`; ProtocolError past `limit`."""
        start = 0
        while True:
            found = self._buffer.find(separator, start)
            if found >= 0:
                end = found + len(separator)
                if end > limit:
                    raise _TooLong()
                line = bytes(self._buffer[:end])
                del self._buffer[:end]
                return line
            if len(self._buffer) > limit:
                raise _TooLong()
            if self._ended:
                raise _Ended(bool(self._buffer))
            start = max(0, len(self._buffer) - len(separator) + 1)
            await self._more()

    async def readexactly(self, count: int) -> bytes:
        while len(self._buffer) < count:
            if self._ended:
                raise _Ended(True)
            await self._more()
        data = bytes(self._buffer[:count])
        del self._buffer[:count]
        return data

    async def read(self, most: int) -> bytes:
        """Up to `most` bytes; b"" once the peer has closed."""
        while not self._buffer:
            if self._ended:
                return b""
            await self._more()
        data = bytes(self._buffer[:most])
        del self._buffer[:most]
        return data


class Http1Client:
    def __init__(self, max_idle_per_origin: int) -> None:
        self._max_idle = max(1, max_idle_per_origin)
        self._idle: dict[Origin, deque[_Connection]] = {}
        self._tls: ssl.SSLContext | None = None
        self._busy: set[_Connection] = set()  # exchanges under way, with deadlines
        self._sweeper: asyncio.TimerHandle | None = None

    async def post(
        self, origin: Origin, head: bytes, body: bytes, max_body: int, timeout_s: float
    ) -> tuple[int, bytes]:
        """Send a request (its head, CRLF-terminated, and its body); the status
        and up to `max_body` bytes of the answer. TimeoutError once `timeout_s`
        have passed (connecting included), up to SWEEP_S late."""
        deadline = asyncio.get_running_loop().time() + timeout_s
        connection = self._reuse(origin)
        if connection is not None:
            try:
                return await self._exchange(origin, connection, head, body, max_body, deadline)
            except _ClosedBeforeAnswer:
                pass  # the peer closed it while idle: once more on a fresh one
        async with asyncio.timeout_at(deadline):
            connection = await self._connect(origin)
        try:
            return await self._exchange(origin, connection, head, body, max_body, deadline)
        except _ClosedBeforeAnswer:
            raise ConnectionError("the receiver closed the connection without answering") from None

    async def close(self) -> None:
        if self._sweeper is not None:
            self._sweeper.cancel()
            self._sweeper = None
        for idle in self._idle.values():
            for connection in idle:
                connection.close()
        self._idle.clear()

    def _reuse(self, origin: Origin) -> _Connection | None:
        idle = self._idle.get(origin)
        if not idle:
            return None
        now = time.monotonic()
        while idle:
            connection = idle.pop()  # the most recently used: the likeliest alive
            if connection.alive(now):
                return connection
            connection.close()
        return None

    def _watch(self, connection: _Connection, deadline: float) -> None:
        connection.deadline = deadline
        self._busy.add(connection)
        if self._sweeper is None:
            self._sweeper = asyncio.get_running_loop().call_later(SWEEP_S, self._sweep)

    def _sweep(self) -> None:
        self._sweeper = None
        now = asyncio.get_running_loop().time()
        late = [connection for connection in self._busy if connection.deadline <= now]
        for connection in late:
            self._busy.discard(connection)
            connection.expire()
        if self._busy:
            self._sweeper = asyncio.get_running_loop().call_later(SWEEP_S, self._sweep)

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
        loop = asyncio.get_running_loop()
        if origin.scheme == "https":
            if self._tls is None:
                self._tls = ssl.create_default_context()
            _, connection = await loop.create_connection(
                _Connection,
                origin.address,
                origin.port,
                ssl=self._tls,
                server_hostname=origin.server_name,
            )
        else:
            _, connection = await loop.create_connection(_Connection, origin.address, origin.port)
        return connection

    async def _exchange(
        self,
        origin: Origin,
        connection: _Connection,
        head: bytes,
        body: bytes,
        max_body: int,
        deadline: float,
    ) -> tuple[int, bytes]:
        reusable = False
        self._watch(connection, deadline)
        try:
            try:
                await connection.send(head, body)
                answer_head = await connection.readuntil(b"\r\n\r\n", MAX_HEAD_BYTES)
            except _Ended as error:
                if error.partial:
                    raise ProtocolError("the answer ended within its headers") from None
                raise _ClosedBeforeAnswer() from None
            except ConnectionError:
                raise _ClosedBeforeAnswer() from None
            except _TooLong:
                raise ProtocolError("the answer's headers are too long") from None
            try:
                status, reusable, answer = await _read_response(connection, answer_head, max_body)
            except _Ended:
                raise ProtocolError("the answer ended early") from None
            except _TooLong:
                raise ProtocolError("an answer line is too long") from None
        except (_ClosedBeforeAnswer, ProtocolError):
            if connection.expired:  # what ended it was the deadline
                raise TimeoutError() from None
            raise
        finally:
            self._busy.discard(connection)
            if connection.expired:
                reusable = False
            if reusable:
                self._release(origin, connection)
            else:
                connection.close()
        return status, answer


class _ClosedBeforeAnswer(Exception):
    pass


async def _read_response(
    reader: _Connection, head: bytes, max_body: int
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
            head = await reader.readuntil(b"\r\n\r\n", MAX_HEAD_BYTES)
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


async def _read_chunked(reader: _Connection, max_body: int) -> tuple[bytes, bool]:
    """The body, and whether it was read to its end (and so the connection is reusable)."""
    parts: list[bytes] = []
    read = 0
    while True:
        line = await reader.readuntil(b"\r\n", MAX_HEAD_BYTES)
        try:
            size = int(line.split(b";", 1)[0].strip(), 16)
        except ValueError:
            raise ProtocolError("a bad chunk size") from None
        if size == 0:
            while (await reader.readuntil(b"\r\n", MAX_HEAD_BYTES)) != b"\r\n":
                pass  # trailers
            return b"".join(parts), True
        if read + size > max_body:
            return b"".join(parts), False
        parts.append(await reader.readexactly(size))
        read += size
        if await reader.readexactly(2) != b"\r\n":
            raise ProtocolError("a chunk without its CRLF")
