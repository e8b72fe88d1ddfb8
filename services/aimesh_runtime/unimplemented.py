"""Servicers for contracts whose behaviour is still to be built.

Each method answers UNIMPLEMENTED with a message naming the method and the
issue that builds it, instead of the generated base class's bare
NotImplementedError (which would surface as an internal error).
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import grpc
from google.protobuf.descriptor import MethodDescriptor, ServiceDescriptor

from aimesh_runtime.errors import Unimplemented
from aimesh_runtime.server import Mount, ServiceContext, ServiceSpec


def _method(descriptor: MethodDescriptor, note: str) -> Any:
    message = f"{descriptor.full_name} is not implemented yet ({note})"

    if descriptor.server_streaming:

        async def stream(
            self: Any, request: Any, context: grpc.aio.ServicerContext
        ) -> AsyncIterator[Any]:
            raise Unimplemented(message, metadata={"method": descriptor.full_name})
            yield  # pragma: no cover - makes this an async generator

        return stream

    async def unary(self: Any, request: Any, context: grpc.aio.ServicerContext) -> Any:
        raise Unimplemented(message, metadata={"method": descriptor.full_name})

    return unary


def unimplemented_servicer(base: type, service: ServiceDescriptor, note: str) -> Any:
    """An instance of `base` whose every RPC answers UNIMPLEMENTED."""
    methods = {m.name: _method(m, note) for m in service.methods}
    return type(f"Unimplemented{service.name}", (base,), methods)()


def unimplemented_spec(
    name: str,
    service: ServiceDescriptor,
    base: type,
    add_to_server: Callable[[Any, grpc.aio.Server], None],
    migrations: Path,
    issue: int,
) -> ServiceSpec:
    """A service that serves its contract before its behaviour exists: it starts,
    owns and migrates its database, and answers UNIMPLEMENTED naming `issue`."""

    async def mount(context: ServiceContext) -> Mount:
        servicer = unimplemented_servicer(base, service, f"see issue #{issue}")
        return Mount(servicers=[(add_to_server, servicer)])

    return ServiceSpec(name=name, services=(service,), migrations=migrations, mount=mount)
