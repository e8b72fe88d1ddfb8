"""Wiring of the notify service. Its behaviour is built in issue #6; until then
every RPC of its contract answers UNIMPLEMENTED with a message saying so."""

from __future__ import annotations

from pathlib import Path

from aimesh.notify.v1 import notify_service_pb2, notify_service_pb2_grpc
from aimesh_runtime.unimplemented import unimplemented_spec

SPEC = unimplemented_spec(
    name="notify",
    service=notify_service_pb2.DESCRIPTOR.services_by_name["NotifyService"],
    base=notify_service_pb2_grpc.NotifyServiceServicer,
    add_to_server=notify_service_pb2_grpc.add_NotifyServiceServicer_to_server,
    migrations=Path(__file__).parent / "migrations",
    issue=6,
)
