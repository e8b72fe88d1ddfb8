"""The deploy config as the lint sees it: every Kubernetes and Istio object in
k8s/, istio/ and gateway_envoy/ with the file it came from, the Envoy bootstrap,
the call graph and the contracts."""

from __future__ import annotations

import pathlib
from dataclasses import dataclass, field
from typing import Any

import yaml

from aimesh_cli.meshlint import contracts

FOLDERS = ("k8s", "istio", "gateway_envoy")
# YAML that is not a cluster object.
NOT_OBJECTS = {
    "kustomization.yaml",
    "envoy.yaml",
    "openapi.yaml",
    "callgraph.yaml",
    "meshlint.yaml",
}
ENVOY = "gateway_envoy/envoy.yaml"
CALLGRAPH = "istio/callgraph.yaml"
OPENAPI = "gateway_envoy/openapi.yaml"
DESCRIPTOR_COPY = "gateway_envoy/descriptor_set.binpb"


@dataclass(frozen=True)
class Obj:
    """One object of a YAML file; patches count too (they carry kind and name)."""

    file: str  # relative to the repository root
    body: dict[str, Any]

    @property
    def kind(self) -> str:
        return str(self.body.get("kind", ""))

    @property
    def name(self) -> str:
        return str(self.body.get("metadata", {}).get("name", ""))

    @property
    def spec(self) -> dict[str, Any]:
        spec = self.body.get("spec") or {}
        return spec if isinstance(spec, dict) else {}


@dataclass
class Mesh:
    root: pathlib.Path
    namespace: str
    objects: list[Obj]
    envoy: dict[str, Any]
    callgraph: dict[str, Any]
    methods: list[contracts.Method]
    descriptor_bytes: bytes
    problems: list[tuple[str, str]] = field(default_factory=list)  # (file, message)

    def of_kind(self, kind: str) -> list[Obj]:
        return [obj for obj in self.objects if obj.kind == kind]


def _yaml_files(root: pathlib.Path) -> list[pathlib.Path]:
    found: list[pathlib.Path] = []
    for folder in FOLDERS:
        found += sorted((root / folder).rglob("*.yaml"))
    return [path for path in found if path.name not in NOT_OBJECTS]


def load(root: pathlib.Path) -> Mesh:
    objects: list[Obj] = []
    problems: list[tuple[str, str]] = []
    for path in _yaml_files(root):
        relative = path.relative_to(root).as_posix()
        try:
            documents = list(yaml.safe_load_all(path.read_text()))
        except yaml.YAMLError as error:
            problems.append((relative, f"not YAML: {error}"))
            continue
        for document in documents:
            # JSON 6902 patches are lists; only objects with a kind are checked.
            if isinstance(document, dict) and "kind" in document:
                objects.append(Obj(relative, document))
    base = yaml.safe_load((root / "k8s" / "base" / "kustomization.yaml").read_text())
    descriptor_path = contracts.default_descriptor_set(root)
    descriptor_set = contracts.load_descriptor_set(descriptor_path)
    return Mesh(
        root=root,
        namespace=str(base.get("namespace", "default")),
        objects=objects,
        envoy=yaml.safe_load((root / ENVOY).read_text()),
        callgraph=yaml.safe_load((root / CALLGRAPH).read_text()),
        methods=contracts.methods(descriptor_set),
        descriptor_bytes=descriptor_path.read_bytes(),
        problems=problems,
    )
