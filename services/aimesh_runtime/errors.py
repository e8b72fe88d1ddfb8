"""The error model: domain exceptions that map to a gRPC status with details.

Domain code raises these; the server pipeline turns them into a status code,
a google.rpc.ErrorInfo (reason, domain, metadata) and, where they apply,
BadRequest field violations or RetryInfo (AIP-193). Anything else that
escapes a handler becomes INTERNAL, never UNKNOWN.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import grpc
from google.protobuf import any_pb2, duration_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_status import rpc_status

ERROR_DOMAIN = "aimesh.dev"


@dataclass(frozen=True)
class FieldViolation:
    """One invalid request field, by its path ("user.email") and why."""

    field: str
    description: str


class ServiceError(Exception):
    """A failure with a known meaning for the caller."""

    code: grpc.StatusCode = grpc.StatusCode.INTERNAL
    reason: str = "INTERNAL"

    def __init__(
        self,
        message: str,
        *,
        reason: str | None = None,
        metadata: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        if reason is not None:
            self.reason = reason
        self.metadata = dict(metadata or {})

    def details(self) -> list[any_pb2.Any]:
        info = error_details_pb2.ErrorInfo(
            reason=self.reason, domain=ERROR_DOMAIN, metadata=self.metadata
        )
        packed = any_pb2.Any()
        packed.Pack(info)
        return [packed]

    def to_status(self) -> grpc.Status:
        proto = status_pb2.Status(
            code=self.code.value[0], message=self.message, details=self.details()
        )
        return rpc_status.to_status(proto)


class InvalidArgument(ServiceError):
    code = grpc.StatusCode.INVALID_ARGUMENT
    reason = "INVALID_ARGUMENT"

    def __init__(
        self,
        message: str,
        violations: Iterable[FieldViolation] = (),
        **kwargs: object,
    ) -> None:
        super().__init__(message, **kwargs)  # type: ignore[arg-type]
        self.violations = list(violations)

    @classmethod
    def field(cls, field: str, description: str) -> InvalidArgument:
        return cls(f"invalid {field}: {description}", [FieldViolation(field, description)])

    def details(self) -> list[any_pb2.Any]:
        details = super().details()
        if self.violations:
            bad_request = error_details_pb2.BadRequest(
                field_violations=[
                    error_details_pb2.BadRequest.FieldViolation(
                        field=v.field, description=v.description
                    )
                    for v in self.violations
                ]
            )
            packed = any_pb2.Any()
            packed.Pack(bad_request)
            details.append(packed)
        return details


class NotFound(ServiceError):
    code = grpc.StatusCode.NOT_FOUND
    reason = "NOT_FOUND"


class AlreadyExists(ServiceError):
    code = grpc.StatusCode.ALREADY_EXISTS
    reason = "ALREADY_EXISTS"


class Unauthenticated(ServiceError):
    code = grpc.StatusCode.UNAUTHENTICATED
    reason = "UNAUTHENTICATED"


class PermissionDenied(ServiceError):
    code = grpc.StatusCode.PERMISSION_DENIED
    reason = "PERMISSION_DENIED"


class FailedPrecondition(ServiceError):
    code = grpc.StatusCode.FAILED_PRECONDITION
    reason = "FAILED_PRECONDITION"


class Unavailable(ServiceError):
    code = grpc.StatusCode.UNAVAILABLE
    reason = "UNAVAILABLE"


class Unimplemented(ServiceError):
    code = grpc.StatusCode.UNIMPLEMENTED
    reason = "NOT_IMPLEMENTED_YET"


class ResourceExhausted(ServiceError):
    """Too many requests or a spent budget; RetryInfo says when to come back."""

    code = grpc.StatusCode.RESOURCE_EXHAUSTED
    reason = "RATE_LIMITED"

    def __init__(self, message: str, retry_after_s: float, **kwargs: object) -> None:
        super().__init__(message, **kwargs)  # type: ignore[arg-type]
        self.retry_after_s = retry_after_s

    def details(self) -> list[any_pb2.Any]:
        details = super().details()
        seconds = max(self.retry_after_s, 0.001)
        whole = math.floor(seconds)
        retry = error_details_pb2.RetryInfo(
            retry_delay=duration_pb2.Duration(
                seconds=whole, nanos=int((seconds - whole) * 1_000_000_000)
            )
        )
        packed = any_pb2.Any()
        packed.Pack(retry)
        details.append(packed)
        return details


def internal_status(request_id: str) -> grpc.Status:
    """Status for an unexpected failure: says nothing about internals."""
    proto = status_pb2.Status(
        code=code_pb2.INTERNAL, message=f"internal error; request id {request_id}"
    )
    return rpc_status.to_status(proto)
