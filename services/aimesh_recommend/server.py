"""Wiring of the recommend service. Its behaviour is built in issue #4; until then
every RPC of the contract answers UNIMPLEMENTED with a message saying so."""

from __future__ import annotations

from pathlib import Path

from aimesh.recommend.v1 import recommend_service_pb2, recommend_service_pb2_grpc
from aimesh_runtime.server import Mount, ServiceContext, ServiceSpec
from aimesh_runtime.unimplemented import unimplemented_servicer

SERVICE = recommend_service_pb2.DESCRIPTOR.services_by_name["RecommendService"]


async def mount(context: ServiceContext) -> Mount:
    servicer = unimplemented_servicer(
        recommend_service_pb2_grpc.RecommendServiceServicer, SERVICE, "see issue #4"
    )
    return Mount(
        servicers=[(recommend_service_pb2_grpc.add_RecommendServiceServicer_to_server, servicer)]
    )


SPEC = ServiceSpec(
    name="recommend",
    services=(SERVICE,),
    migrations=Path(__file__).parent / "migrations",
    mount=mount,
)
