"""What the deploy config needs to know about the contracts, read from the
generated descriptor set: every method's path, access, idempotency, streaming
and REST mapping."""

from __future__ import annotations

import pathlib
from dataclasses import dataclass

from google.api import annotations_pb2
from google.protobuf import descriptor_pb2

from aimesh.options.v1 import access_pb2

_IDEMPOTENT_LEVELS = (
    descriptor_pb2.MethodOptions.NO_SIDE_EFFECTS,
    descriptor_pb2.MethodOptions.IDEMPOTENT,
)
_HTTP_VERBS = ("get", "put", "post", "delete", "patch")


@dataclass(frozen=True)
class Method:
    """One RPC of an aimesh contract."""

    package: str  # aimesh.search.v1
    service: str  # SearchService
    name: str  # Search
    public: bool  # needs no credentials (the access option)
    scopes: tuple[str, ...]
    idempotent: bool  # NO_SIDE_EFFECTS or IDEMPOTENT: safe to retry
    client_streaming: bool
    server_streaming: bool
    http_verb: str  # "" when the method has no google.api.http mapping
    http_path: str
    http_body: str
    input_type: str  # fully qualified, no leading dot
    output_type: str

    @property
    def short_service(self) -> str:
        """The deployable that serves it: user, search, recommend, chat or notify."""
        return self.package.split(".")[1]

    @property
    def full_service(self) -> str:
        return f"{self.package}.{self.service}"

    @property
    def path(self) -> str:
        """The HTTP/2 :path of the gRPC call."""
        return f"/{self.full_service}/{self.name}"

    @property
    def streaming(self) -> bool:
        return self.client_streaming or self.server_streaming

    @property
    def edge(self) -> bool:
        """Exposed at the gateway: the contract gives it a REST mapping."""
        return bool(self.http_verb)


def default_descriptor_set(root: pathlib.Path) -> pathlib.Path:
    return root / "protos" / "aimesh" / "descriptor_set.binpb"


def load_descriptor_set(path: pathlib.Path) -> descriptor_pb2.FileDescriptorSet:
    return descriptor_pb2.FileDescriptorSet.FromString(path.read_bytes())


def methods(descriptor_set: descriptor_pb2.FileDescriptorSet) -> list[Method]:
    """Every method of every aimesh service, in contract order."""
    found: list[Method] = []
    for file in descriptor_set.file:
        if not file.package.startswith("aimesh.") or file.package.startswith("aimesh.options."):
            continue
        for service in file.service:
            for method in service.method:
                options = method.options
                access = options.Extensions[access_pb2.access]
                rule = options.Extensions[annotations_pb2.http]
                verb = next((v for v in _HTTP_VERBS if getattr(rule, v)), "")
                found.append(
                    Method(
                        package=file.package,
                        service=service.name,
                        name=method.name,
                        public=access.public,
                        scopes=tuple(access.scopes),
                        idempotent=options.idempotency_level in _IDEMPOTENT_LEVELS,
                        client_streaming=method.client_streaming,
                        server_streaming=method.server_streaming,
                        http_verb=verb,
                        http_path=getattr(rule, verb) if verb else "",
                        http_body=rule.body,
                        input_type=method.input_type.lstrip("."),
                        output_type=method.output_type.lstrip("."),
                    )
                )
    return found
