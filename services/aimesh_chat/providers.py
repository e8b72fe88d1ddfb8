"""Where answers come from: Claude through the anthropic SDK, or a recording.

A provider turns a ModelRequest into an async generator of ModelEvents. The
generator owns the upstream HTTP stream: closing it (aclose, or a cancel that
unwinds through it) closes the connection, which is how a client's cancel
reaches Anthropic. Failures come out as ModelError, classified so the caller
can tell overload from other faults and transient faults (which count against
the breaker) from configuration ones.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
from collections.abc import AsyncGenerator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, cast

import anthropic
from anthropic import types
from anthropic.types import (
    MessageParam,
    RawContentBlockDeltaEvent,
    RawMessageDeltaEvent,
    RawMessageStartEvent,
    RawMessageStopEvent,
)

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ModelRequest:
    model: str
    system: str
    messages: list[dict[str, str]]  # [{"role": "user" | "assistant", "content": "..."}]
    max_tokens: int
    # Names the request for recording and replay: model, collection and question.
    replay_key: str


@dataclass(frozen=True)
class ModelStarted:
    input_tokens: int


@dataclass(frozen=True)
class TextDelta:
    text: str


@dataclass(frozen=True)
class ModelFinished:
    stop_reason: str  # Anthropic's: end_turn, max_tokens, stop_sequence, refusal, ...
    output_tokens: int


ModelEvent = ModelStarted | TextDelta | ModelFinished


class ModelError(Exception):
    """The model failed; `overloaded` for 429 and 529, `transient` if it may pass."""

    def __init__(self, message: str, *, overloaded: bool = False, transient: bool = True) -> None:
        super().__init__(message)
        self.overloaded = overloaded
        self.transient = transient


class NoRecording(ModelError):
    """Replay has nothing recorded for this request."""

    def __init__(self, key: str) -> None:
        super().__init__(f"no recorded stream for {key}", transient=False)


class ModelProvider(Protocol):
    # True when answers are replayed rather than live; the service says so.
    replayed: bool

    def stream(self, request: ModelRequest) -> AsyncGenerator[ModelEvent, None]: ...


def replay_key(model: str, collection: str, question: str) -> str:
    raw = json.dumps([model, collection, " ".join(question.split()).lower()])
    return hashlib.sha256(raw.encode()).hexdigest()[:32]


def _classify(error: Exception) -> ModelError:
    if isinstance(error, anthropic.APIStatusError):
        kind = ""
        if isinstance(error.body, dict):
            inner = error.body.get("error")
            kind = str(inner.get("type", "")) if isinstance(inner, dict) else ""
        overloaded = error.status_code in (429, 529) or kind in (
            "overloaded_error",
            "rate_limit_error",
        )
        # A 4xx other than 408/429 is our request or key at fault: retrying will not help.
        transient = overloaded or error.status_code >= 500 or error.status_code in (200, 408)
        return ModelError(
            f"model answered {error.status_code} {kind}".strip(),
            overloaded=overloaded,
            transient=transient,
        )
    if isinstance(error, anthropic.APITimeoutError):
        return ModelError("model request timed out")
    if isinstance(error, anthropic.APIConnectionError):
        return ModelError(f"model connection failed: {type(error).__name__}")
    if isinstance(error, anthropic.APIError):
        return ModelError(f"model answered badly: {type(error).__name__}", transient=False)
    # The SDK does not wrap transport errors raised while a stream is read
    # (a dropped connection, a malformed chunk): the upstream is at fault.
    return ModelError(f"model stream broke: {type(error).__name__}")


class AnthropicProvider:
    """Claude, streamed with the SDK's async client."""

    replayed = False

    def __init__(
        self, api_key: str, base_url: str | None, *, connect_timeout_s: float, read_timeout_s: float
    ) -> None:
        self._client = anthropic.AsyncAnthropic(
            api_key=api_key,
            base_url=base_url or None,
            # No SDK retries: a retry before the first token would spend the
            # caller's deadline; the extractive fallback answers instead.
            max_retries=0,
            timeout=anthropic.Timeout(read_timeout_s, connect=connect_timeout_s),
        )

    async def close(self) -> None:
        await self._client.close()

    async def stream(self, request: ModelRequest) -> AsyncGenerator[ModelEvent, None]:
        finished: ModelFinished | None = None
        try:
            stream = await self._client.messages.create(
                model=request.model,
                system=request.system,
                messages=cast("list[MessageParam]", request.messages),
                max_tokens=request.max_tokens,
                stream=True,
            )
            # Leaving this block any way, a cancel included, closes the HTTP response.
            async with stream:
                output_tokens = 0
                stop_reason = "end_turn"
                async for event in stream:
                    if finished is not None:
                        continue  # nothing follows message_stop but the end of the body
                    if isinstance(event, RawContentBlockDeltaEvent):
                        if isinstance(event.delta, types.TextDelta):
                            yield TextDelta(event.delta.text)
                    elif isinstance(event, RawMessageStartEvent):
                        yield ModelStarted(event.message.usage.input_tokens)
                    elif isinstance(event, RawMessageDeltaEvent):
                        output_tokens = event.usage.output_tokens
                        stop_reason = event.delta.stop_reason or stop_reason
                    elif isinstance(event, RawMessageStopEvent):
                        # Read to the end of the body before saying so: a response
                        # closed half-read takes its keep-alive connection with it,
                        # and the next answer would pay for a new one.
                        finished = ModelFinished(stop_reason, output_tokens)
        except ModelError:
            raise
        except Exception as error:
            if finished is None:
                raise _classify(error) from error
            # The answer was whole; only the end of its body was lost.
            log.info("model stream broke after message_stop: %s", type(error).__name__)
        if finished is None:
            raise ModelError("model stream ended without message_stop")
        yield finished


class RecordingProvider:
    """Passes a live provider through and saves each finished stream to a file."""

    replayed = False

    def __init__(self, inner: ModelProvider, folder: Path) -> None:
        self._inner = inner
        self._folder = folder
        folder.mkdir(parents=True, exist_ok=True)

    async def stream(self, request: ModelRequest) -> AsyncGenerator[ModelEvent, None]:
        events: list[dict[str, Any]] = []
        async for event in self._inner.stream(request):
            events.append({"kind": type(event).__name__, **event.__dict__})
            if isinstance(event, ModelFinished):  # saved first: the reader stops at the end
                self._save(request, events)
            yield event

    def _save(self, request: ModelRequest, events: list[dict[str, Any]]) -> None:
        record = {"key": request.replay_key, "model": request.model, "events": events}
        handle, temporary = tempfile.mkstemp(dir=self._folder, suffix=".tmp")
        with os.fdopen(handle, "w") as file:
            json.dump(record, file)
        os.replace(temporary, self._folder / f"{request.replay_key}.json")
        log.info("recorded model stream %s", request.replay_key)


class ReplayProvider:
    """Replays recorded streams: demos and `aimesh up` work without a key."""

    replayed = True

    def __init__(self, folder: Path) -> None:
        self._folder = folder

    async def stream(self, request: ModelRequest) -> AsyncGenerator[ModelEvent, None]:
        path = self._folder / f"{request.replay_key}.json"
        try:
            record = json.loads(path.read_text())
        except FileNotFoundError:
            raise NoRecording(request.replay_key) from None
        except (OSError, ValueError) as error:
            raise ModelError(
                f"unreadable recording {path.name}: {error}", transient=False
            ) from None
        kinds: dict[str, type[ModelStarted] | type[TextDelta] | type[ModelFinished]] = {
            "ModelStarted": ModelStarted,
            "TextDelta": TextDelta,
            "ModelFinished": ModelFinished,
        }
        for item in record["events"]:
            fields = dict(item)
            yield kinds[fields.pop("kind")](**fields)
