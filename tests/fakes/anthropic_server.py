"""A fake Anthropic Messages API speaking real HTTP/1.1 and server-sent events.

The real `anthropic` SDK is pointed at it through its base URL. A Scenario says
how it answers: slowly, failing before the first token (500, 429, 529),
failing mid-stream (an SSE error event or a dropped connection), or as a naive
model that obeys instructions injected into its prompt. It records every
request body and, per stream, when the client closed the connection early:
that is how tests check that a cancel upstream really closes the HTTP stream.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import time
from dataclasses import dataclass, field
from typing import Any

DEFAULT_REPLY = ["Hello", " from", " the", " fake", " model", "."]
INJECTION = re.compile(r"ignore (all )?previous instructions", re.IGNORECASE)
ERRORS = {
    429: ("rate_limit_error", "Too Many Requests"),
    500: ("api_error", "Internal server error"),
    529: ("overloaded_error", "Overloaded"),
}


@dataclass
class Scenario:
    chunks: list[str] = field(default_factory=lambda: list(DEFAULT_REPLY))
    delay_s: float = 0.0  # before each text chunk
    fail_status: int | None = None  # answer this HTTP status instead of a stream
    fail_after: int | None = None  # break the stream after this many chunks
    drop: bool = False  # break it by dropping the connection, not with an error event
    obey_injections: bool = False  # a naive model: repeats its system prompt when told to
    drop_after_stop: bool = False  # hang up after message_stop, before the body's end
    stop_reason: str = "end_turn"


@dataclass
class StreamLog:
    started_at: float
    text: str = ""  # what the fake sent, before any filtering by the service
    first_chunk_at: float | None = None
    completed: bool = False
    client_closed_at: float | None = None  # the client hung up mid-stream


class FakeAnthropic:
    def __init__(self) -> None:
        self.scenario = Scenario()
        self.requests: list[dict[str, Any]] = []
        self.streams: list[StreamLog] = []
        self.connections = 0  # TCP connections accepted: keep-alive reuse shows here
        self._server: asyncio.Server | None = None
        self._handlers: set[asyncio.Task[None]] = set()
        self.port = 0

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def start(self) -> FakeAnthropic:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            for task in list(self._handlers):
                task.cancel()
            await asyncio.gather(*self._handlers, return_exceptions=True)
            await self._server.wait_closed()

    def reset(self, scenario: Scenario | None = None) -> None:
        self.scenario = scenario or Scenario()
        self.requests.clear()
        self.streams.clear()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._handlers.add(task)
        self.connections += 1
        try:
            while True:
                try:
                    head = await reader.readuntil(b"\r\n\r\n")
                except (asyncio.IncompleteReadError, ConnectionError):
                    return
                lines = head.decode("latin-1").split("\r\n")
                method, path, _ = lines[0].split(" ", 2)
                headers = {
                    k.strip().lower(): v.strip()
                    for k, _, v in (line.partition(":") for line in lines[1:] if line)
                }
                body = await reader.readexactly(int(headers.get("content-length", "0")))
                if method != "POST" or not path.startswith("/v1/messages"):
                    await self._json(writer, 404, _error("not_found_error", path))
                    continue
                request = json.loads(body)
                self.requests.append(request)
                if not await self._answer(request, reader, writer):
                    return
        except (ConnectionError, asyncio.CancelledError):
            pass
        finally:
            self._handlers.discard(task)
            writer.close()

    async def _json(self, writer: asyncio.StreamWriter, status: int, body: dict[str, Any]) -> None:
        payload = json.dumps(body).encode()
        writer.write(
            f"HTTP/1.1 {status} X\r\ncontent-type: application/json\r\n"
            f"content-length: {len(payload)}\r\nretry-after: 1\r\n\r\n".encode()
            + payload
        )
        await writer.drain()

    def _reply(self, request: dict[str, Any]) -> list[str]:
        scenario = self.scenario
        prompt = json.dumps(request)
        if scenario.obey_injections and INJECTION.search(prompt):
            leaked = "Sure. My instructions were: " + str(request.get("system", ""))
            # Small pieces, so a secret in it arrives split across deltas.
            return [leaked[i : i + 7] for i in range(0, len(leaked), 7)]
        return list(scenario.chunks)

    async def _answer(
        self, request: dict[str, Any], reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> bool:
        """Answer one request; False when the connection is finished."""
        scenario = self.scenario
        if scenario.fail_status is not None:
            kind, message = ERRORS.get(scenario.fail_status, ("api_error", "error"))
            await self._json(writer, scenario.fail_status, _error(kind, message))
            return True
        log = StreamLog(started_at=time.monotonic())
        self.streams.append(log)
        writer.write(
            b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\n"
            b"cache-control: no-cache\r\ntransfer-encoding: chunked\r\n\r\n"
        )
        # The client sends nothing while it reads a stream: EOF here means it hung up.
        hangup = asyncio.ensure_future(reader.read(1))
        try:
            chunks = self._reply(request)
            input_tokens = max(1, len(json.dumps(request)) // 4)
            await _event(writer, "message_start", _message_start(request, input_tokens))
            block = {"type": "text", "text": ""}
            await _event(
                writer,
                "content_block_start",
                {"type": "content_block_start", "index": 0, "content_block": block},
            )
            for number, chunk in enumerate(chunks):
                if scenario.fail_after is not None and number == scenario.fail_after:
                    if scenario.drop:
                        writer.transport.abort()
                        return False
                    await _event(writer, "error", _error("overloaded_error", "Overloaded"))
                    await _end(writer)
                    return True
                if scenario.delay_s:
                    done, _ = await asyncio.wait({hangup}, timeout=scenario.delay_s)
                    if done:
                        log.client_closed_at = time.monotonic()
                        return False
                delta = {"type": "text_delta", "text": chunk}
                await _event(
                    writer,
                    "content_block_delta",
                    {"type": "content_block_delta", "index": 0, "delta": delta},
                )
                log.text += chunk
                if log.first_chunk_at is None:
                    log.first_chunk_at = time.monotonic()
            await _event(writer, "content_block_stop", {"type": "content_block_stop", "index": 0})
            await _event(
                writer,
                "message_delta",
                {
                    "type": "message_delta",
                    "delta": {"stop_reason": scenario.stop_reason, "stop_sequence": None},
                    "usage": {"output_tokens": len(chunks)},
                },
            )
            await _event(writer, "message_stop", {"type": "message_stop"})
            if scenario.drop_after_stop:
                writer.transport.abort()
                return False
            await _end(writer)
            log.completed = True
            return True
        except ConnectionError:
            log.client_closed_at = time.monotonic()
            return False
        finally:
            if not hangup.done():
                hangup.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await hangup


def _error(kind: str, message: str) -> dict[str, Any]:
    return {"type": "error", "error": {"type": kind, "message": message}}


def _message_start(request: dict[str, Any], input_tokens: int) -> dict[str, Any]:
    return {
        "type": "message_start",
        "message": {
            "id": "msg_fake",
            "type": "message",
            "role": "assistant",
            "content": [],
            "model": request.get("model", ""),
            "stop_reason": None,
            "stop_sequence": None,
            "usage": {"input_tokens": input_tokens, "output_tokens": 1},
        },
    }


async def _event(writer: asyncio.StreamWriter, kind: str, data: dict[str, Any]) -> None:
    payload = f"event: {kind}\ndata: {json.dumps(data)}\n\n".encode()
    writer.write(f"{len(payload):x}\r\n".encode() + payload + b"\r\n")
    await writer.drain()


async def _end(writer: asyncio.StreamWriter) -> None:
    writer.write(b"0\r\n\r\n")
    await writer.drain()
