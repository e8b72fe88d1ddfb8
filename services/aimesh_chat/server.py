"""Wiring of the chat service. Its behaviour is built in issue #5; until then
every RPC of its contract answers UNIMPLEMENTED with a message saying so."""

from __future__ import annotations

from pathlib import Path

from aimesh.chat.v1 import chat_service_pb2, chat_service_pb2_grpc
from aimesh_runtime.unimplemented import unimplemented_spec

SPEC = unimplemented_spec(
    name="chat",
    service=chat_service_pb2.DESCRIPTOR.services_by_name["ChatService"],
    base=chat_service_pb2_grpc.ChatServiceServicer,
    add_to_server=chat_service_pb2_grpc.add_ChatServiceServicer_to_server,
    migrations=Path(__file__).parent / "migrations",
    issue=5,
)
