"""Wiring of the recommend service. Its behaviour is built in issue #4; until then
every RPC of its contract answers UNIMPLEMENTED with a message saying so."""

from __future__ import annotations

from pathlib import Path

from aimesh.recommend.v1 import recommend_service_pb2, recommend_service_pb2_grpc
from aimesh_runtime.unimplemented import unimplemented_spec

SPEC = unimplemented_spec(
    name="recommend",
    service=recommend_service_pb2.DESCRIPTOR.services_by_name["RecommendService"],
    base=recommend_service_pb2_grpc.RecommendServiceServicer,
    add_to_server=recommend_service_pb2_grpc.add_RecommendServiceServicer_to_server,
    migrations=Path(__file__).parent / "migrations",
    issue=4,
)
