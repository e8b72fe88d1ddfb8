"""Wiring of the search service. Its behaviour is built in issue #3; until then
every RPC of its contract answers UNIMPLEMENTED with a message saying so."""

from __future__ import annotations

from pathlib import Path

from aimesh.search.v1 import search_service_pb2, search_service_pb2_grpc
from aimesh_runtime.unimplemented import unimplemented_spec

SPEC = unimplemented_spec(
    name="search",
    service=search_service_pb2.DESCRIPTOR.services_by_name["SearchService"],
    base=search_service_pb2_grpc.SearchServiceServicer,
    add_to_server=search_service_pb2_grpc.add_SearchServiceServicer_to_server,
    migrations=Path(__file__).parent / "migrations",
    issue=3,
)
