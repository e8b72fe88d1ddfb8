"""Wiring of the chat service. Its behaviour is built in issue #5; until then
every RPC of the contract answers UNIMPLEMENTED with a message saying so."""

from __future__ import annotations

from pathlib import Path

from aimesh.chat.v1 import chat_service_pb2, chat_service_pb2_grpc
from aimesh_runtime.server import Mount, ServiceContext, ServiceSpec
from aimesh_runtime.unimplemented import unimplemented_servicer

SERVICE = chat_service_pb2.DESCRIPTOR.services_by_name["ChatService"]


async def mount(context: ServiceContext) -> Mount:
    servicer = unimplemented_servicer(
        chat_service_pb2_grpc.ChatServiceServicer, SERVICE, "see issue #5"
    )
    return Mount(servicers=[(chat_service_pb2_grpc.add_ChatServiceServicer_to_server, servicer)])


SPEC = ServiceSpec(
    name="chat",
    services=(SERVICE,),
    migrations=Path(__file__).parent / "migrations",
    mount=mount,
)
