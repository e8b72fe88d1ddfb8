"""ChatService: proto in, domain call, proto out."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator

import grpc

from aimesh.chat.v1 import chat_service_pb2 as pb
from aimesh.chat.v1 import chat_service_pb2_grpc
from aimesh_chat import answering
from aimesh_chat.answering import Answering
from aimesh_chat.conversations import Conversations, conversation_name, message_name
from aimesh_chat.store import ConversationRow, MessageRow
from aimesh_runtime.context import principal as caller
from aimesh_runtime.pages import timestamp

ROLES = {"user": pb.MESSAGE_ROLE_USER, "assistant": pb.MESSAGE_ROLE_ASSISTANT}


def stop_reason(name: str | None) -> pb.StopReason.ValueType:
    return pb.StopReason.Value(f"STOP_REASON_{name}") if name else pb.STOP_REASON_UNSPECIFIED


def degraded_reason(name: str) -> pb.DegradedReason.ValueType:
    return pb.DegradedReason.Value(f"DEGRADED_REASON_{name}")


def conversation_proto(row: ConversationRow) -> pb.Conversation:
    return pb.Conversation(
        name=conversation_name(row.id),
        display_name=row.display_name,
        owner=f"users/{row.owner_id}",
        create_time=timestamp(row.create_time),
        update_time=timestamp(row.update_time),
    )


def message_proto(row: MessageRow) -> pb.Message:
    usage = None
    if row.role == "assistant" and row.input_tokens is not None:
        usage = pb.TokenUsage(input_tokens=row.input_tokens, output_tokens=row.output_tokens or 0)
    return pb.Message(
        name=message_name(row.conversation_id, row.id),
        role=ROLES[row.role],
        text=row.text,
        citations=list(row.citations),
        usage=usage,
        model=row.model,
        stop_reason=stop_reason(row.stop_reason),
        partial=row.partial,
        degraded_reasons=[degraded_reason(r) for r in row.degraded_reasons],
        create_time=timestamp(row.create_time),
        update_time=timestamp(row.update_time),
    )


def event_proto(event: answering.ChatEvent) -> pb.StreamChatResponse:
    if isinstance(event, answering.Text):
        return pb.StreamChatResponse(text_delta=event.text)
    if isinstance(event, answering.Started):
        return pb.StreamChatResponse(
            start=pb.ChatStart(
                user_message=event.user_message,
                assistant_message=event.assistant_message,
                model=event.model,
            )
        )
    if isinstance(event, answering.Citations):
        return pb.StreamChatResponse(citations=pb.ChatCitations(documents=event.documents))
    if isinstance(event, answering.Degraded):
        return pb.StreamChatResponse(
            degraded=pb.Degradation(reason=degraded_reason(event.reason), message=event.message)
        )
    if isinstance(event, answering.Usage):
        return pb.StreamChatResponse(
            usage=pb.TokenUsage(input_tokens=event.input_tokens, output_tokens=event.output_tokens)
        )
    return pb.StreamChatResponse(
        finish=pb.ChatFinish(stop_reason=stop_reason(event.stop_reason), partial=event.partial)
    )


class ChatServicer(chat_service_pb2_grpc.ChatServiceServicer):
    def __init__(self, conversations: Conversations, answers: Answering) -> None:
        self._conversations = conversations
        self._answers = answers

    async def CreateConversation(
        self, request: pb.CreateConversationRequest, context: grpc.aio.ServicerContext
    ) -> pb.CreateConversationResponse:
        row = await self._conversations.create(caller().subject, request.conversation.display_name)
        return pb.CreateConversationResponse(conversation=conversation_proto(row))

    async def GetConversation(
        self, request: pb.GetConversationRequest, context: grpc.aio.ServicerContext
    ) -> pb.GetConversationResponse:
        row = await self._conversations.get(caller().subject, request.name)
        return pb.GetConversationResponse(conversation=conversation_proto(row))

    async def ListConversations(
        self, request: pb.ListConversationsRequest, context: grpc.aio.ServicerContext
    ) -> pb.ListConversationsResponse:
        page = await self._conversations.list(
            caller().subject, request.page_size, request.page_token
        )
        return pb.ListConversationsResponse(
            conversations=[conversation_proto(row) for row in page.items],
            next_page_token=page.next_page_token,
        )

    async def ListMessages(
        self, request: pb.ListMessagesRequest, context: grpc.aio.ServicerContext
    ) -> pb.ListMessagesResponse:
        page = await self._conversations.messages(
            caller().subject, request.parent, request.page_size, request.page_token
        )
        return pb.ListMessagesResponse(
            messages=[message_proto(row) for row in page.items],
            next_page_token=page.next_page_token,
        )

    async def StreamChat(
        self, request: pb.StreamChatRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.StreamChatResponse]:
        events = self._answers.stream_chat(
            caller().subject,
            request.conversation,
            request.message,
            request.collection,
            request.top_k,
        )
        # Closing at once, not at garbage collection, is what closes the model's stream.
        async with contextlib.aclosing(events):
            async for event in events:
                yield event_proto(event)

    async def CancelChat(
        self, request: pb.CancelChatRequest, context: grpc.aio.ServicerContext
    ) -> pb.CancelChatResponse:
        row = await self._answers.cancel(caller().subject, request.name)
        return pb.CancelChatResponse(message=message_proto(row))

    async def PurgeUserData(
        self, request: pb.PurgeUserDataRequest, context: grpc.aio.ServicerContext
    ) -> pb.PurgeUserDataResponse:
        deleted = await self._conversations.purge(request.user)
        return pb.PurgeUserDataResponse(deleted_conversations=deleted)
