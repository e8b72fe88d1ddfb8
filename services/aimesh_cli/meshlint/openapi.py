"""The OpenAPI 3 document of the gateway's REST/JSON face, generated from the
contracts' google.api.http mappings (what Envoy's gRPC-JSON transcoder serves).
Never edited by hand: `aimesh mesh openapi` writes it, `--check` fails when stale."""

from __future__ import annotations

import re
from typing import Any

import yaml
from google.protobuf import descriptor_pb2

from aimesh_cli.meshlint.contracts import Method, methods

FieldProto = descriptor_pb2.FieldDescriptorProto
_SCALARS: dict[int, dict[str, Any]] = {
    FieldProto.TYPE_DOUBLE: {"type": "number", "format": "double"},
    FieldProto.TYPE_FLOAT: {"type": "number", "format": "float"},
    # proto3 JSON writes 64-bit integers as strings
    FieldProto.TYPE_INT64: {"type": "string", "format": "int64"},
    FieldProto.TYPE_UINT64: {"type": "string", "format": "uint64"},
    FieldProto.TYPE_SINT64: {"type": "string", "format": "int64"},
    FieldProto.TYPE_FIXED64: {"type": "string", "format": "uint64"},
    FieldProto.TYPE_SFIXED64: {"type": "string", "format": "int64"},
    FieldProto.TYPE_INT32: {"type": "integer", "format": "int32"},
    FieldProto.TYPE_SINT32: {"type": "integer", "format": "int32"},
    FieldProto.TYPE_SFIXED32: {"type": "integer", "format": "int32"},
    FieldProto.TYPE_UINT32: {"type": "integer", "format": "int64"},
    FieldProto.TYPE_FIXED32: {"type": "integer", "format": "int64"},
    FieldProto.TYPE_BOOL: {"type": "boolean"},
    FieldProto.TYPE_STRING: {"type": "string"},
    FieldProto.TYPE_BYTES: {"type": "string", "format": "byte"},
}
# Well-known types have their own JSON forms.
_WELL_KNOWN: dict[str, dict[str, Any]] = {
    "google.protobuf.Timestamp": {"type": "string", "format": "date-time"},
    "google.protobuf.Duration": {"type": "string", "example": "1.5s"},
    "google.protobuf.FieldMask": {"type": "string", "example": "display_name,scopes"},
    "google.protobuf.Struct": {"type": "object", "additionalProperties": True},
    "google.protobuf.Value": {},
    "google.protobuf.ListValue": {"type": "array", "items": {}},
    "google.protobuf.Empty": {"type": "object"},
    "google.protobuf.BoolValue": {"type": "boolean"},
    "google.protobuf.StringValue": {"type": "string"},
    "google.protobuf.Int32Value": {"type": "integer", "format": "int32"},
    "google.protobuf.Int64Value": {"type": "string", "format": "int64"},
    "google.protobuf.DoubleValue": {"type": "number", "format": "double"},
    "google.protobuf.FloatValue": {"type": "number", "format": "float"},
}
_VARIABLE = re.compile(r"\{([a-z_.]+)(?:=([^}]*))?\}")


class _Types:
    """Messages and enums of the descriptor set by full name, and their comments."""

    def __init__(self, descriptor_set: descriptor_pb2.FileDescriptorSet) -> None:
        self.messages: dict[str, descriptor_pb2.DescriptorProto] = {}
        self.enums: dict[str, descriptor_pb2.EnumDescriptorProto] = {}
        for file in descriptor_set.file:
            prefix = file.package
            for message in file.message_type:
                self._add_message(f"{prefix}.{message.name}", message)
            for enum in file.enum_type:
                self.enums[f"{prefix}.{enum.name}"] = enum

    def _add_message(self, name: str, message: descriptor_pb2.DescriptorProto) -> None:
        self.messages[name] = message
        for nested in message.nested_type:
            self._add_message(f"{name}.{nested.name}", nested)
        for enum in message.enum_type:
            self.enums[f"{name}.{enum.name}"] = enum


class _Builder:
    def __init__(self, types: _Types) -> None:
        self.types = types
        self.schemas: dict[str, Any] = {}

    def ref(self, full_name: str) -> dict[str, Any]:
        if full_name in _WELL_KNOWN:
            return dict(_WELL_KNOWN[full_name])
        if full_name not in self.schemas:
            self.schemas[full_name] = {}  # placeholder first: messages may recurse
            self.schemas[full_name] = self._message(self.types.messages[full_name])
        return {"$ref": f"#/components/schemas/{full_name}"}

    def _message(self, message: descriptor_pb2.DescriptorProto) -> dict[str, Any]:
        properties = {field.json_name: self.field(field) for field in message.field}
        return {"type": "object", "properties": properties}

    def field(self, field: descriptor_pb2.FieldDescriptorProto) -> dict[str, Any]:
        if field.type == FieldProto.TYPE_MESSAGE:
            name = field.type_name.lstrip(".")
            entry = self.types.messages.get(name)
            if entry is not None and entry.options.map_entry:
                return {"type": "object", "additionalProperties": self.field(entry.field[1])}
            schema = self.ref(name)
        elif field.type == FieldProto.TYPE_ENUM:
            enum = self.types.enums[field.type_name.lstrip(".")]
            schema = {"type": "string", "enum": [value.name for value in enum.value]}
        else:
            schema = dict(_SCALARS[field.type])
        if field.label == FieldProto.LABEL_REPEATED:
            return {"type": "array", "items": schema}
        return schema


def _singular(segment: str) -> str:
    return segment[:-1] if segment.endswith("s") else segment


def openapi_path(template: str) -> tuple[str, list[dict[str, Any]]]:
    """`/v1/{name=collections/*}` -> `/v1/collections/{collection}` and its parameters."""
    parameters: list[dict[str, Any]] = []

    def expand(match: re.Match[str]) -> str:
        field, pattern = match.group(1), match.group(2) or "*"
        parts = pattern.split("/")
        out = []
        for index, part in enumerate(parts):
            if part == "*":
                name = _singular(parts[index - 1]) if index else field.replace(".", "_")
                parameters.append(
                    {
                        "name": name,
                        "in": "path",
                        "required": True,
                        "description": f"A segment of `{field}` ({pattern}).",
                        "schema": {"type": "string"},
                    }
                )
                out.append("{" + name + "}")
            else:
                out.append(part)
        return "/".join(out)

    return _VARIABLE.sub(expand, template), parameters


def _operation(method: Method, builder: _Builder) -> dict[str, Any]:
    path, parameters = openapi_path(method.http_path)
    bound = {m.group(1).split(".")[0] for m in _VARIABLE.finditer(method.http_path)}
    request = builder.types.messages[method.input_type]
    if not method.http_body:
        # Without a body, the remaining top-level scalar fields are query parameters.
        for field in request.field:
            if field.json_name in bound or field.name in bound:
                continue
            if (
                field.type == FieldProto.TYPE_MESSAGE
                and field.type_name != ".google.protobuf.FieldMask"
            ):
                continue
            parameters.append(
                {"name": field.json_name, "in": "query", "schema": builder.field(field)}
            )
    operation: dict[str, Any] = {
        "operationId": f"{method.service}_{method.name}",
        "tags": [method.full_service],
        "summary": f"{method.full_service}/{method.name}",
    }
    if parameters:
        operation["parameters"] = parameters
    if method.http_body:
        if method.http_body == "*":
            body = builder.ref(method.input_type)
        else:
            field = next(f for f in request.field if f.name == method.http_body)
            body = builder.field(field)
        if method.client_streaming:
            body = {"type": "array", "items": body}
        operation["requestBody"] = {
            "required": True,
            "content": {"application/json": {"schema": body}},
        }
    response = builder.ref(method.output_type)
    if method.server_streaming:
        response = {"type": "array", "items": response}
    operation["responses"] = {
        "200": {
            "description": "OK"
            + (" (a JSON array of messages as they stream)" if method.server_streaming else ""),
            "content": {"application/json": {"schema": response}},
        },
        "default": {
            "description": "A google.rpc.Status (code, message, details).",
            "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Status"}}},
        },
    }
    if method.public:
        operation["security"] = []
    return {"path": path, "verb": method.http_verb, "operation": operation}


def build(descriptor_set: descriptor_pb2.FileDescriptorSet) -> dict[str, Any]:
    builder = _Builder(_Types(descriptor_set))
    paths: dict[str, dict[str, Any]] = {}
    for method in methods(descriptor_set):
        if not method.edge:
            continue
        entry = _operation(method, builder)
        paths.setdefault(entry["path"], {})[entry["verb"]] = entry["operation"]
    schemas = dict(sorted(builder.schemas.items()))
    schemas["Status"] = {
        "type": "object",
        "properties": {
            "code": {"type": "integer", "format": "int32"},
            "message": {"type": "string"},
            "details": {"type": "array", "items": {"type": "object"}},
        },
    }
    return {
        "openapi": "3.0.3",
        "info": {
            "title": "aimesh REST/JSON API",
            "version": "v1",
            "description": (
                "Generated from protos/ by `aimesh mesh openapi`; do not edit. "
                "Served by the Envoy gateway's gRPC-JSON transcoder."
            ),
        },
        "servers": [{"url": "http://localhost:8080"}],
        "security": [{"bearer": []}, {"apiKey": []}],
        "paths": dict(sorted(paths.items())),
        "components": {
            "securitySchemes": {
                "bearer": {"type": "http", "scheme": "bearer", "bearerFormat": "JWT"},
                "apiKey": {"type": "apiKey", "in": "header", "name": "x-api-key"},
            },
            "schemas": schemas,
        },
    }


def render(descriptor_set: descriptor_pb2.FileDescriptorSet) -> str:
    header = "# Generated by `aimesh mesh openapi` from protos/; do not edit.\n"
    return header + yaml.safe_dump(build(descriptor_set), sort_keys=False, width=100)
