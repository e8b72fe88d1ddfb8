"""Starting a chat server against the fakes, and reading its streams."""

from __future__ import annotations

import re
from collections.abc import AsyncIterator
from typing import Any

import grpc

from aimesh.chat.v1 import chat_service_pb2 as pb
from aimesh.chat.v1 import chat_service_pb2_grpc
from tests.conftest import Running, start_server
from tests.fakes.anthropic_server import FakeAnthropic
from tests.fakes.search import FakeSearch

CANARY = re.compile(r"CANARY-[0-9a-f]{24}")  # drawn per request; read from the system prompt


def canary_of(system: str) -> str:
    found = CANARY.search(system)
    assert found is not None, "the system prompt carries no canary"
    return found.group(0)


async def start_chat(
    new_database: Any,
    user_server: Running,
    fake: FakeAnthropic | None,
    search: FakeSearch,
    **env: str,
) -> Running:
    from aimesh_chat.server import SPEC

    extra_env = {
        "AIMESH_JWKS_URL": f"http://127.0.0.1:{user_server.http_port}/.well-known/jwks.json",
        "AIMESH_USER_ADDRESS": user_server.address,
        "AIMESH_SEARCH_ADDRESS": search.address,
        "AIMESH_CHAT_FIRST_TOKEN_TIMEOUT_S": "5",
        **env,
    }
    if fake is not None:
        extra_env.setdefault("ANTHROPIC_API_KEY", "sk-test-fake")
        extra_env.setdefault("AIMESH_CHAT_ANTHROPIC_BASE_URL", fake.base_url)
    return await start_server([SPEC], new_database, extra_env=extra_env)


async def new_conversation(
    stub: chat_service_pb2_grpc.ChatServiceStub, metadata: Any, title: str = "t"
) -> str:
    reply = await stub.CreateConversation(
        pb.CreateConversationRequest(conversation=pb.Conversation(display_name=title)),
        metadata=metadata,
    )
    return str(reply.conversation.name)


async def collect(call: AsyncIterator[pb.StreamChatResponse]) -> list[pb.StreamChatResponse]:
    return [event async for event in call]


def kinds(events: list[pb.StreamChatResponse]) -> list[str]:
    """Event kinds in order, runs of text deltas folded into one."""
    found: list[str] = []
    for event in events:
        kind = event.WhichOneof("event") or ""
        if not (found and kind == found[-1] == "text_delta"):
            found.append(kind)
    return found


def text_of(events: list[pb.StreamChatResponse]) -> str:
    return "".join(e.text_delta for e in events if e.WhichOneof("event") == "text_delta")


def of_kind(events: list[pb.StreamChatResponse], kind: str) -> list[Any]:
    return [getattr(e, kind) for e in events if e.WhichOneof("event") == kind]


def status_details(error: grpc.aio.AioRpcError) -> dict[str, Any]:
    from google.rpc import error_details_pb2
    from grpc_status import rpc_status

    status = rpc_status.from_call(error)
    found: dict[str, Any] = {}
    for detail in status.details if status is not None else ():
        for kind in (
            error_details_pb2.ErrorInfo,
            error_details_pb2.BadRequest,
            error_details_pb2.RetryInfo,
        ):
            if detail.Is(kind.DESCRIPTOR):
                message = kind()
                detail.Unpack(message)
                found[kind.DESCRIPTOR.name] = message
    return found
