"""Wiring of the chat service: store, budgets, search client, model provider, servicer.

Which provider answers is decided once at start: with an API key, Claude
(recording each stream when AIMESH_CHAT_REPLAY_DIR is set); without one,
replayed recordings when that folder is set, else no model at all, so every
answer is the extractive fallback, flagged NO_API_KEY.
"""

from __future__ import annotations

import logging
from pathlib import Path

from aimesh.chat.v1 import chat_service_pb2, chat_service_pb2_grpc
from aimesh.search.v1 import search_service_pb2
from aimesh_chat.answering import Answering, AnswerLimits
from aimesh_chat.budgets import Budgets
from aimesh_chat.conversations import Conversations, not_found
from aimesh_chat.providers import (
    AnthropicProvider,
    ModelError,
    ModelProvider,
    RecordingProvider,
    ReplayProvider,
)
from aimesh_chat.retrieval import SearchRetriever
from aimesh_chat.servicer import ChatServicer
from aimesh_chat.settings import ChatSettings
from aimesh_chat.store import ChatStore
from aimesh_runtime.client import connect
from aimesh_runtime.metrics import ModelMetrics
from aimesh_runtime.ownership import OwnerResolver
from aimesh_runtime.resilience import CircuitBreaker
from aimesh_runtime.server import Mount, ServiceContext, ServiceSpec

log = logging.getLogger(__name__)
MODEL_CONNECT_TIMEOUT_S = 5.0


def _is_model_fault(error: BaseException) -> bool:
    if isinstance(error, ModelError):
        return error.transient
    return isinstance(error, TimeoutError)


def build_provider(settings: ChatSettings) -> tuple[ModelProvider | None, AnthropicProvider | None]:
    """The provider that answers, and the live client to close at stop (if any)."""
    replay_dir = Path(settings.replay_dir) if settings.replay_dir else None
    if settings.anthropic_api_key:
        live = AnthropicProvider(
            settings.anthropic_api_key,
            settings.anthropic_base_url or None,
            connect_timeout_s=MODEL_CONNECT_TIMEOUT_S,
            read_timeout_s=settings.first_token_timeout_s,
        )
        if replay_dir is not None:
            log.info("model %s, recording streams to %s", settings.model, replay_dir)
            return RecordingProvider(live, replay_dir), live
        log.info("model %s", settings.model)
        return live, live
    if replay_dir is not None:
        log.warning("no ANTHROPIC_API_KEY: replaying recorded streams from %s", replay_dir)
        return ReplayProvider(replay_dir), None
    log.warning("no ANTHROPIC_API_KEY: answers are extractive, flagged NO_API_KEY")
    return None, None


async def mount(context: ServiceContext) -> Mount:
    settings: ChatSettings = context.settings
    store = ChatStore(context.pool)
    conversations = Conversations(store)
    search_channel = connect(
        settings.search_address,
        search_service_pb2.DESCRIPTOR.services_by_name["SearchService"],
        tracer_provider=context.tracer_provider,
    )
    retriever = SearchRetriever(
        search_channel,
        CircuitBreaker("search"),
        timeout_s=settings.search_timeout_s,
        deadline_share=settings.search_deadline_share,
    )
    provider, live = build_provider(settings)
    answers = Answering(
        store,
        conversations,
        Budgets(settings.daily_token_budget),
        retriever,
        provider,
        CircuitBreaker(
            "anthropic",
            failure_threshold=settings.model_breaker_failures,
            reset_timeout_s=settings.model_breaker_reset_s,
            is_failure=_is_model_fault,
        ),
        AnswerLimits(
            model=settings.model,
            max_output_tokens=settings.max_output_tokens,
            max_message_tokens=settings.max_message_tokens,
            history_messages=settings.history_messages,
            first_token_timeout_s=settings.first_token_timeout_s,
        ),
        ModelMetrics.of(context.metrics_registry),
    )

    async def close() -> None:
        await answers.close()
        await search_channel.close()
        if live is not None:
            await live.close()

    return Mount(
        servicers=[
            (
                chat_service_pb2_grpc.add_ChatServiceServicer_to_server,
                ChatServicer(conversations, answers),
            )
        ],
        close=close,
        owners={"conversations": OwnerResolver(conversations.owner_of, not_found)},
    )


SPEC = ServiceSpec(
    name="chat",
    services=(chat_service_pb2.DESCRIPTOR.services_by_name["ChatService"],),
    migrations=Path(__file__).parent / "migrations",
    mount=mount,
    settings=ChatSettings,
)
