"""Wiring of the search service. Its behaviour is built in issue #3; until then
every RPC of the contract answers UNIMPLEMENTED with a message saying so."""

from __future__ import annotations

from pathlib import Path

from aimesh.search.v1 import search_service_pb2, search_service_pb2_grpc
from aimesh_runtime.server import Mount, ServiceContext, ServiceSpec
from aimesh_runtime.unimplemented import unimplemented_servicer

SERVICE = search_service_pb2.DESCRIPTOR.services_by_name["SearchService"]


async def mount(context: ServiceContext) -> Mount:
    servicer = unimplemented_servicer(
        search_service_pb2_grpc.SearchServiceServicer, SERVICE, "see issue #3"
    )
    return Mount(
        servicers=[(search_service_pb2_grpc.add_SearchServiceServicer_to_server, servicer)]
    )


SPEC = ServiceSpec(
    name="search",
    services=(SERVICE,),
    migrations=Path(__file__).parent / "migrations",
    mount=mount,
)
