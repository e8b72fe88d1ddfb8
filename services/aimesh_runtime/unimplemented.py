"""Servicers for contracts whose behaviour is still to be built.

Each method answers UNIMPLEMENTED with a message naming the method and the
issue that builds it, instead of the generated base class's bare
NotImplementedError (which would surface as an internal error).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import grpc
from google.protobuf.descriptor import MethodDescriptor, ServiceDescriptor

from aimesh_runtime.errors import Unimplemented


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
