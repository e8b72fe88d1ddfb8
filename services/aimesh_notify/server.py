"""Wiring of the notify service. Its behaviour is built in issue #6; until then
every RPC of the contract answers UNIMPLEMENTED with a message saying so."""

from __future__ import annotations

from pathlib import Path

from aimesh.notify.v1 import notify_service_pb2, notify_service_pb2_grpc
from aimesh_runtime.server import Mount, ServiceContext, ServiceSpec
from aimesh_runtime.unimplemented import unimplemented_servicer

SERVICE = notify_service_pb2.DESCRIPTOR.services_by_name["NotifyService"]


async def mount(context: ServiceContext) -> Mount:
    servicer = unimplemented_servicer(
        notify_service_pb2_grpc.NotifyServiceServicer, SERVICE, "see issue #6"
    )
    return Mount(
        servicers=[(notify_service_pb2_grpc.add_NotifyServiceServicer_to_server, servicer)]
    )


SPEC = ServiceSpec(
    name="notify",
    services=(SERVICE,),
    migrations=Path(__file__).parent / "migrations",
    mount=mount,
)
