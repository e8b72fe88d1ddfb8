"""Chat servers configured differently: no API key, a tripped breaker, a spent
budget, and recording then replaying model streams."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import pytest

from aimesh.chat.v1 import chat_service_pb2 as pb
from aimesh.chat.v1 import chat_service_pb2_grpc
from tests.conftest import Running, bearer, register_and_login
from tests.fakes.anthropic_server import FakeAnthropic, Scenario
from tests.fakes.chat_harness import (
    collect,
    kinds,
    new_conversation,
    of_kind,
    start_chat,
    status_details,
    text_of,
)
from tests.fakes.search import FakeSearch, SearchScenario

Stub = chat_service_pb2_grpc.ChatServiceStub


@pytest.fixture(scope="module")
async def fake() -> AsyncIterator[FakeAnthropic]:
    server = await FakeAnthropic().start()
    yield server
    await server.stop()


@pytest.fixture(scope="module")
async def search() -> AsyncIterator[FakeSearch]:
    server = await FakeSearch().start()
    server.reset(SearchScenario(documents=[("d1", "Passage one."), ("d2", "Passage two.")]))
    yield server
    await server.stop()


async def _session(users: Any, running: Running) -> tuple[Stub, Any, str, grpc.aio.Channel]:
    _, token = await register_and_login(users)
    channel = running.channel()
    stub = Stub(channel)
    md = bearer(token)
    return stub, md, await new_conversation(stub, md), channel


def ask(name: str, message: str = "Tell me about passages") -> pb.StreamChatRequest:
    return pb.StreamChatRequest(conversation=name, message=message, collection="collections/c")


async def test_without_a_key_answers_are_extractive_and_flagged(
    new_database: Any, user_server: Running, search: FakeSearch, users: Any
) -> None:
    running = await start_chat(new_database, user_server, None, search)
    try:
        stub, md, name, channel = await _session(users, running)
        async with channel:
            events = await collect(stub.StreamChat(ask(name), metadata=md))
    finally:
        await running.server.stop(0.5)
    assert kinds(events) == ["start", "degraded", "text_delta", "citations", "usage", "finish"]
    assert of_kind(events, "degraded")[0].reason == pb.DEGRADED_REASON_NO_API_KEY
    assert "[1] Passage one." in text_of(events) and "[2] Passage two." in text_of(events)
    usage = of_kind(events, "usage")[0]
    assert (usage.input_tokens, usage.output_tokens) == (0, 0)


async def test_breaker_opens_after_failures_and_skips_the_model(
    new_database: Any, user_server: Running, fake: FakeAnthropic, search: FakeSearch, users: Any
) -> None:
    fake.reset(Scenario(fail_status=500))
    running = await start_chat(
        new_database, user_server, fake, search, AIMESH_CHAT_MODEL_BREAKER_FAILURES="2"
    )
    try:
        stub, md, name, channel = await _session(users, running)
        async with channel:
            reasons = []
            for _ in range(3):
                events = await collect(stub.StreamChat(ask(name), metadata=md))
                reasons.append(of_kind(events, "degraded")[0].reason)
            fake.reset()  # the model is back, but the breaker stays open for its reset time
            events = await collect(stub.StreamChat(ask(name), metadata=md))
    finally:
        await running.server.stop(0.5)
    assert reasons == [pb.DEGRADED_REASON_MODEL_ERROR] * 2 + [pb.DEGRADED_REASON_BREAKER_OPEN]
    assert of_kind(events, "degraded")[0].reason == pb.DEGRADED_REASON_BREAKER_OPEN
    assert not fake.requests  # nothing reached the model once the breaker opened


async def test_spent_budget_is_resource_exhausted_with_retry_info(
    new_database: Any, user_server: Running, fake: FakeAnthropic, search: FakeSearch, users: Any
) -> None:
    fake.reset()
    running = await start_chat(
        new_database, user_server, fake, search, AIMESH_CHAT_DAILY_TOKEN_BUDGET="100"
    )
    try:
        stub, md, name, channel = await _session(users, running)
        async with channel:
            events = await collect(stub.StreamChat(ask(name), metadata=md))
            usage = of_kind(events, "usage")[0]
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await collect(stub.StreamChat(ask(name), metadata=md))
            # Someone else still has a budget.
            _, md_other, other_name, other_channel = await _session(users, running)
            async with other_channel:
                other = await collect(
                    Stub(other_channel).StreamChat(ask(other_name), metadata=md_other)
                )
    finally:
        await running.server.stop(0.5)
    assert usage.input_tokens + usage.output_tokens > 100  # one answer spent it all
    assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    details = status_details(caught.value)
    assert details["ErrorInfo"].reason == "TOKEN_BUDGET_EXHAUSTED"
    assert (
        int(details["ErrorInfo"].metadata["used_tokens"])
        == usage.input_tokens + usage.output_tokens
    )
    assert 0 < details["RetryInfo"].retry_delay.seconds <= 24 * 3600
    assert len(fake.requests) == 2 and kinds(other)[-1] == "finish"


async def test_streams_recorded_with_a_key_replay_without_one(
    new_database: Any,
    user_server: Running,
    fake: FakeAnthropic,
    search: FakeSearch,
    users: Any,
    tmp_path: Path,
) -> None:
    fake.reset(Scenario(chunks=["Recorded", " answer", " [1]."]))
    replay_dir = str(tmp_path / "replays")
    recording = await start_chat(
        new_database, user_server, fake, search, AIMESH_CHAT_REPLAY_DIR=replay_dir
    )
    try:
        stub, md, name, channel = await _session(users, recording)
        async with channel:
            live = await collect(stub.StreamChat(ask(name, "What is  recorded?"), metadata=md))
    finally:
        await recording.server.stop(0.5)
    assert len(list(Path(replay_dir).glob("*.json"))) == 1
    fake.reset()
    replaying = await start_chat(
        new_database, user_server, None, search, AIMESH_CHAT_REPLAY_DIR=replay_dir
    )
    try:
        stub, md, name, channel = await _session(users, replaying)
        async with channel:
            replayed = await collect(stub.StreamChat(ask(name, "what is recorded?"), metadata=md))
            unknown = await collect(stub.StreamChat(ask(name, "never asked"), metadata=md))
    finally:
        await replaying.server.stop(0.5)
    assert not fake.requests
    assert kinds(replayed) == ["start", "degraded", "text_delta", "citations", "usage", "finish"]
    assert of_kind(replayed, "degraded")[0].reason == pb.DEGRADED_REASON_REPLAY
    assert text_of(replayed) == text_of(live) == "Recorded answer [1]."
    assert of_kind(replayed, "usage") == of_kind(live, "usage")
    # A question with no recording falls back to an extractive answer, flagged.
    assert of_kind(unknown, "degraded")[0].reason == pb.DEGRADED_REASON_NO_API_KEY
