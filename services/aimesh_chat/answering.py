"""StreamChat's domain: one turn, from checks to a stored, fully accounted answer.

The order is fixed and every exit is defined:
  checks (conversation, size, budget), retrieval (NOT_FOUND for an unknown
  collection) -> both messages stored -> start -> degraded notes -> text and
  citations -> stored outcome and usage -> usage -> finish.
Before start a failure is a status; after it, it is an event: an extractive
answer when the model is unavailable before its first token, a partial
answer with MODEL_ERROR after it, CANCELLED for CancelChat. A client cancel
or expired deadline unwinds through the model stream, which closes the
upstream HTTP connection, and the partial answer is still stored.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncGenerator, AsyncIterator, Coroutine, Sequence
from dataclasses import dataclass, field
from typing import Any

from aimesh_chat.budgets import Budgets
from aimesh_chat.conversations import (
    Conversations,
    message_name,
    new_id,
    not_found,
    parse_conversation,
)
from aimesh_chat.prompting import (
    CanaryGuard,
    Passage,
    cited,
    estimate_tokens,
    extractive_answer,
    new_boundary,
    new_canary,
    system_prompt,
)
from aimesh_chat.providers import (
    ModelError,
    ModelEvent,
    ModelFinished,
    ModelProvider,
    ModelRequest,
    ModelStarted,
    NoRecording,
    TextDelta,
    replay_key,
)
from aimesh_chat.retrieval import Retrieval, SearchRetriever
from aimesh_chat.store import AnswerOutcome, ChatStore, MessageRow, Said, TurnContext
from aimesh_runtime.errors import FieldViolation, InvalidArgument
from aimesh_runtime.metrics import ModelMetrics
from aimesh_runtime.resilience import BreakerOpen, CircuitBreaker

log = logging.getLogger(__name__)

# Anthropic's stop reasons, as StopReason names; others (tool_use...) end the turn.
STOP_REASONS = {
    "end_turn": "END_TURN",
    "max_tokens": "MAX_TOKENS",
    "stop_sequence": "STOP_SEQUENCE",
    "refusal": "REFUSAL",
}
CANCEL_WAIT_S = 5.0


@dataclass(frozen=True)
class Started:
    user_message: str
    assistant_message: str
    model: str


@dataclass(frozen=True)
class Text:
    text: str


@dataclass(frozen=True)
class Citations:
    documents: list[str]


@dataclass(frozen=True)
class Degraded:
    reason: str  # a DegradedReason name without its prefix
    message: str


@dataclass(frozen=True)
class Usage:
    input_tokens: int
    output_tokens: int


@dataclass(frozen=True)
class Finished:
    stop_reason: str  # a StopReason name without its prefix
    partial: bool


ChatEvent = Started | Text | Citations | Degraded | Usage | Finished


@dataclass(frozen=True)
class AnswerLimits:
    model: str
    max_output_tokens: int
    max_message_tokens: int
    history_messages: int
    first_token_timeout_s: float


class _CancelRequested(Exception):
    """CancelChat stopped the answer."""


@dataclass
class _Running:
    """An answer being streamed by this process, so CancelChat can reach it."""

    task: asyncio.Task[object] | None
    cancel_requested: bool = False
    reading: bool = False  # awaiting the model: the only place a cancel may land
    done: asyncio.Event = field(default_factory=asyncio.Event)

    def request_cancel(self) -> None:
        if self.cancel_requested:
            return
        self.cancel_requested = True
        if self.reading and self.task is not None:
            self.task.cancel()


@dataclass
class _Answer:
    model: str
    text: str = ""
    citations: list[str] = field(default_factory=list)
    degraded: list[str] = field(default_factory=list)
    input_tokens: int = 0
    output_tokens: int = 0
    stop_reason: str = ""
    partial: bool = False
    sources: list[str] = field(default_factory=list)

    def stop(self, reason: str, *, partial: bool = False) -> None:
        if not self.stop_reason:
            self.stop_reason, self.partial = reason, partial

    def outcome(self) -> AnswerOutcome:
        output = self.output_tokens
        if output == 0 and self.text and self.model:
            output = estimate_tokens(self.text)  # cut short before the model's count
        return AnswerOutcome(
            text=self.text,
            citations=self.citations,
            input_tokens=self.input_tokens,
            output_tokens=output,
            model=self.model,
            stop_reason=self.stop_reason,
            partial=self.partial,
            degraded_reasons=self.degraded,
            sources=self.sources,
        )


def conversation_turns(history: Sequence[Said | MessageRow], message: str) -> list[dict[str, str]]:
    """Earlier messages plus the new one, as the alternating turns the API wants."""
    turns: list[dict[str, str]] = []
    for row in [*history, None]:
        role, text = ("user", message) if row is None else (row.role, row.text)
        if not text:
            continue
        if not turns and role != "user":
            continue
        if turns and turns[-1]["role"] == role:
            turns[-1]["content"] += "\n\n" + text
        else:
            turns.append({"role": role, "content": text})
    return turns


class Answering:
    def __init__(
        self,
        store: ChatStore,
        conversations: Conversations,
        budgets: Budgets,
        retriever: SearchRetriever,
        provider: ModelProvider | None,
        breaker: CircuitBreaker,
        limits: AnswerLimits,
        model_metrics: ModelMetrics | None = None,
    ) -> None:
        self._store = store
        self._conversations = conversations
        self._budgets = budgets
        self._retriever = retriever
        self._provider = provider
        self._breaker = breaker
        self._limits = limits
        self._model_metrics = model_metrics
        self._running: dict[str, _Running] = {}
        self._pending: set[asyncio.Task[None]] = set()

    async def close(self) -> None:
        """Wait for answers being stored after their stream went away."""
        if self._pending:
            await asyncio.gather(*self._pending, return_exceptions=True)

    async def stream_chat(
        self, owner_id: str, conversation: str, message: str, collection: str, top_k: int
    ) -> AsyncGenerator[ChatEvent, None]:
        estimate = estimate_tokens(message)
        if estimate > self._limits.max_message_tokens:
            description = f"about {estimate} tokens; the limit is {self._limits.max_message_tokens}"
            raise InvalidArgument(
                f"message is too long: {description}",
                [FieldViolation("message", description)],
                reason="MESSAGE_TOO_LONG",
            )
        # The checks are one round trip, run beside retrieval; failures are then
        # reported in a fixed order (the conversation first, so nobody learns
        # anything about someone else's conversation).
        checks = self._store.turn_context(
            parse_conversation(conversation, "conversation"),
            owner_id,
            self._budgets.today(),
            self._limits.history_messages,
        )
        context: TurnContext | BaseException
        retrieved: Retrieval | BaseException
        if collection:
            context, retrieved = await asyncio.gather(
                checks, self._retriever.retrieve(collection, message, top_k), return_exceptions=True
            )
        else:  # nothing to retrieve: no tasks to schedule on the way to the first token
            context, retrieved = await checks, Retrieval()
        if isinstance(context, BaseException):
            raise context
        if context.conversation is None:
            raise not_found(conversation)
        self._budgets.enforce(context.used_tokens, estimate)
        if isinstance(retrieved, BaseException):
            raise retrieved
        row, retrieval, history = context.conversation, retrieved, context.history
        user_id, answer_id = new_id(), new_id()
        model = self._limits.model
        # Stored while the model thinks: it is off the time to first token.
        turn = asyncio.ensure_future(
            self._store.start_turn(row.id, user_id, message, answer_id, model)
        )
        canary = new_canary()  # per request: one leaked answer tells nothing of the next
        request = ModelRequest(
            model=model,
            system=system_prompt(canary, retrieval.passages, new_boundary()),
            messages=conversation_turns(history, message),
            max_tokens=self._limits.max_output_tokens,
            replay_key=replay_key(model, collection, message),
        )
        answer = _Answer(model=model, sources=[p.document for p in retrieval.passages])
        running = _Running(asyncio.current_task())
        self._running[answer_id] = running
        finished = False
        try:
            yield Started(message_name(row.id, user_id), message_name(row.id, answer_id), model)
            if retrieval.unavailable is not None:
                answer.degraded.append("SEARCH_UNAVAILABLE")
                yield Degraded(
                    "SEARCH_UNAVAILABLE",
                    f"{retrieval.unavailable}; answering without your documents",
                )
            async with contextlib.aclosing(
                self._generate(answer, running, request, retrieval.passages, canary)
            ) as events:
                async for event in events:
                    yield event
            await turn
            await self._store.finish_answer(
                answer_id,
                owner_id,
                self._budgets.today(),
                answer.outcome(),
                self._budgets.daily,
            )
            finished = True
            output_tokens = answer.outcome().output_tokens
            if self._model_metrics is not None:
                self._model_metrics.add_tokens(self._limits.model, "input", answer.input_tokens)
                self._model_metrics.add_tokens(self._limits.model, "output", output_tokens)
            yield Usage(answer.input_tokens, output_tokens)
            yield Finished(answer.stop_reason, answer.partial)
        finally:
            self._running.pop(answer_id, None)
            if finished:
                running.done.set()
            else:
                # The client went away (cancel, deadline) or storing failed: the
                # model stream is already closed; store what there is, unawaited,
                # since this task is being cancelled.
                answer.stop("CANCELLED", partial=True)
                self._spawn(self._store_late(turn, answer_id, owner_id, answer, running))

    async def _store_late(
        self,
        turn: asyncio.Future[None],
        answer_id: str,
        owner_id: str,
        answer: _Answer,
        running: _Running,
    ) -> None:
        try:
            await turn
            await self._store.finish_answer(
                answer_id,
                owner_id,
                self._budgets.today(),
                answer.outcome(),
                self._budgets.daily,
            )
        except Exception:
            log.exception("could not store the cut-short answer %s", answer_id)
        finally:
            running.done.set()

    def _spawn(self, coroutine: Coroutine[Any, Any, None]) -> None:
        task = asyncio.create_task(coroutine)
        self._pending.add(task)
        task.add_done_callback(self._pending.discard)

    async def cancel(self, owner_id: str, name: str) -> MessageRow:
        row = await self._conversations.message(owner_id, name)
        if row.role != "assistant":
            raise InvalidArgument.field(
                "name", "names a user message; only answers can be cancelled"
            )
        running = self._running.get(row.id)
        if running is None:  # finished, or streamed by another replica
            return row
        running.request_cancel()
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(CANCEL_WAIT_S):
                await running.done.wait()
        return await self._conversations.message(owner_id, name)

    async def _read(self, upstream: AsyncIterator[ModelEvent], running: _Running) -> ModelEvent:
        if running.cancel_requested:
            raise _CancelRequested
        running.reading = True
        try:
            return await anext(upstream)
        except asyncio.CancelledError:
            task = running.task
            if running.cancel_requested and task is not None and task.uncancel() == 0:
                raise _CancelRequested from None
            raise
        finally:
            running.reading = False

    async def _first(
        self, upstream: AsyncIterator[ModelEvent], running: _Running, answer: _Answer
    ) -> ModelEvent:
        """The first text (or the end) of the answer, within the first-token timeout."""
        async with asyncio.timeout(self._limits.first_token_timeout_s):
            event = await self._read(upstream, running)
            while isinstance(event, ModelStarted):
                answer.input_tokens = event.input_tokens
                event = await self._read(upstream, running)
            return event

    async def _generate(
        self,
        answer: _Answer,
        running: _Running,
        request: ModelRequest,
        passages: Sequence[Passage],
        canary: str,
    ) -> AsyncGenerator[ChatEvent, None]:
        provider = self._provider
        if provider is None:
            async for item in self._extractive(
                answer, passages, "NO_API_KEY", "no Anthropic API key is configured"
            ):
                yield item
            return
        async with contextlib.aclosing(provider.stream(request)) as upstream:
            fallback: tuple[str, str] | None = None
            try:
                event = await self._breaker.call(lambda: self._first(upstream, running, answer))
            except _CancelRequested:
                answer.stop("CANCELLED", partial=True)
                return
            except BreakerOpen as error:
                fallback = (
                    "BREAKER_OPEN",
                    f"the model is failing; retrying in {error.retry_after_s:.0f} s",
                )
            except NoRecording:
                fallback = "NO_API_KEY", "no API key is set and this question has no recording"
            except ModelError as error:
                fallback = ("MODEL_OVERLOADED" if error.overloaded else "MODEL_ERROR"), str(error)
            except TimeoutError:
                fallback = (
                    "MODEL_ERROR",
                    (f"no first token within {self._limits.first_token_timeout_s:g} s"),
                )
            if fallback is not None:
                log.warning("model unavailable before its first token: %s", fallback[1])
                async for item in self._extractive(answer, passages, *fallback):
                    yield item
                return
            if provider.replayed:
                answer.degraded.append("REPLAY")
                yield Degraded(
                    "REPLAY", "no API key is set: this answer is replayed from a recording"
                )
            guard = CanaryGuard(canary)
            try:
                while True:
                    if isinstance(event, TextDelta):
                        for item in self._text(answer, guard.feed(event.text), passages):
                            yield item
                    elif isinstance(event, ModelStarted):
                        answer.input_tokens = event.input_tokens
                    elif isinstance(event, ModelFinished):
                        answer.output_tokens = event.output_tokens
                        answer.stop(STOP_REASONS.get(event.stop_reason, "END_TURN"))
                        break
                    event = await self._read(upstream, running)
            except _CancelRequested:
                answer.stop("CANCELLED", partial=True)
            except ModelError as error:
                if error.transient:
                    self._breaker.record_failure()
                log.warning("model failed mid-stream: %s", error)
                answer.stop("MODEL_ERROR", partial=True)
            for item in self._text(answer, guard.flush(), passages):
                yield item
            if guard.leaks:
                log.warning("redacted %d canary leak(s) from an answer", guard.leaks)

    def _text(self, answer: _Answer, text: str, passages: Sequence[Passage]) -> list[ChatEvent]:
        if not text:
            return []
        # Markers may straddle deltas: look a few characters back.
        window = answer.text[-3:] + text
        answer.text += text
        events: list[ChatEvent] = [Text(text)]
        new = [d for d in cited(window, passages) if d not in answer.citations]
        if new:
            answer.citations.extend(new)
            events.append(Citations(new))
        return events

    async def _extractive(
        self, answer: _Answer, passages: Sequence[Passage], reason: str, why: str
    ) -> AsyncGenerator[ChatEvent, None]:
        answer.degraded.append(reason)
        answer.model = ""  # no model wrote it
        answer.input_tokens = answer.output_tokens = 0
        yield Degraded(reason, f"{why}; answering with passages from your documents")
        text, documents = extractive_answer(passages, why)
        answer.text = text
        yield Text(text)
        if documents:
            answer.citations = documents
            yield Citations(documents)
        answer.stop("END_TURN")
