"""Every overlay builds with kustomize, and every object it yields passes the
real schemas: Kubernetes' own (kubernetes-validate, strict) and Istio's CRDs."""

from __future__ import annotations

import copy
import functools
import json
import pathlib
import shutil
import subprocess
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml

from tests.deploy.conftest import ROOT

KUBECTL = shutil.which("kubectl", path=str(ROOT / ".venv" / "bin")) or "kubectl"
KUBERNETES_VERSION = "1.33.0"  # the oldest release aimesh supports (native gRPC probes are GA)
TARGETS = [
    "k8s/overlays/dev",
    "k8s/overlays/prod",
    "k8s/overlays/gpu",
    "istio",
    "k8s/overlays/istio-chaos",
]
ISTIO_GROUPS = ("networking.istio.io", "security.istio.io", "telemetry.istio.io")
SCHEMAS = pathlib.Path(__file__).parent / "schemas" / "istio"


@functools.cache
def build(target: str) -> list[dict[str, Any]]:
    result = subprocess.run(
        [KUBECTL, "kustomize", str(ROOT / target)], capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stderr
    return [doc for doc in yaml.safe_load_all(result.stdout) if doc]


def closed(schema: Any) -> Any:
    """The schema with unknown fields refused wherever it lists properties."""
    if isinstance(schema, dict):
        out = {key: closed(value) for key, value in schema.items()}
        if "properties" in out and "additionalProperties" not in out:
            out["additionalProperties"] = False
        return out
    if isinstance(schema, list):
        return [closed(item) for item in schema]
    return schema


@functools.cache
def istio_validator(api_version: str, kind: str) -> jsonschema.protocols.Validator:
    path = SCHEMAS / f"{api_version.replace('/', '_')}_{kind}.json"
    assert path.exists(), f"no vendored schema for {api_version} {kind}"
    schema = closed(json.loads(path.read_text()))
    return jsonschema.Draft7Validator(schema)


def is_istio(doc: dict[str, Any]) -> bool:
    return str(doc.get("apiVersion", "")).split("/")[0] in ISTIO_GROUPS


def istio_errors(doc: dict[str, Any]) -> list[str]:
    validator = istio_validator(doc["apiVersion"], doc["kind"])
    name = f"{doc['kind']}/{doc['metadata']['name']}"
    return [
        f"{name} {'/'.join(map(str, e.absolute_path))}: {e.message}"
        for e in validator.iter_errors(doc)
    ]


@pytest.mark.parametrize("target", TARGETS)
def test_overlay_builds_and_validates(target: str) -> None:
    docs = build(target)
    assert docs
    errors: list[str] = []
    for doc in docs:
        if is_istio(doc):
            errors += istio_errors(doc)
            continue
        try:
            kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)
        except kubernetes_validate.ValidationError as error:
            errors.append(f"{doc['kind']}/{doc['metadata']['name']}: {error.message}")
    assert not errors, "\n".join(errors)


@pytest.mark.parametrize("target", TARGETS)
def test_every_namespaced_object_lands_in_aimesh(target: str) -> None:
    """What `kubectl apply -k` creates, component objects included, is all in the
    namespace the README works in, whatever the context's namespace is."""
    outside = [
        f"{doc['kind']}/{doc['metadata']['name']}"
        for doc in build(target)
        if doc["kind"] != "Namespace" and doc["metadata"].get("namespace") != "aimesh"
    ]
    assert outside == []


def test_overlays_hold_what_they_promise() -> None:
    kinds = {(d["kind"], d["metadata"]["name"]) for d in build("k8s/overlays/prod")}
    for service in ("user", "search", "recommend", "chat", "notify"):
        for kind, name in [
            ("Deployment", f"{service}-v1"),
            ("Service", service),
            ("ServiceAccount", service),
            ("ConfigMap", f"{service}-config"),
            ("PodDisruptionBudget", service),
            ("HorizontalPodAutoscaler", f"{service}-v1"),
            ("StatefulSet", f"{service}-db"),
        ]:
            assert (kind, name) in kinds
    assert ("Deployment", "recommend-v2") in kinds
    assert ("NetworkPolicy", "default-deny") in kinds
    assert not any(kind == "Secret" for kind, _ in kinds)  # prod secrets come from outside
    gpu = [d for d in build("k8s/overlays/gpu") if d["kind"] == "Deployment"]
    with_gpu = {
        d["metadata"]["name"]
        for d in gpu
        if "nvidia.com/gpu" in d["spec"]["template"]["spec"]["containers"][0]["resources"]["limits"]
    }
    assert with_gpu == {"search-v1", "recommend-v1", "recommend-v2"}


def test_strict_validation_refuses_unknown_fields() -> None:
    deployment = next(d for d in build("k8s/overlays/prod") if d["kind"] == "Deployment")
    broken = copy.deepcopy(deployment)
    broken["spec"]["template"]["spec"]["containers"][0]["livenesProbe"] = {}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, KUBERNETES_VERSION, strict=True)
    vs = next(d for d in build("istio") if d["kind"] == "VirtualService")
    broken = copy.deepcopy(vs)
    broken["spec"]["http"][0]["retry"] = {"attempts": 3}
    assert istio_errors(broken)
    broken = copy.deepcopy(vs)
    broken["spec"]["http"][0]["route"][0]["weight"] = "ninety"
    assert istio_errors(broken)


def test_readme_rollout_patch_targets_the_weighted_routes() -> None:
    """The README's `v2_share` patches /spec/http/4 and /5: both must split v1/v2."""
    vs = next(
        d
        for d in build("istio")
        if d["kind"] == "VirtualService" and d["metadata"]["name"] == "recommend"
    )
    readme = (ROOT / "README.md").read_text()
    for index in (4, 5):
        assert f"/spec/http/{index}/route/1/weight" in readme
        route = vs["spec"]["http"][index]["route"]
        assert [r["destination"]["subset"] for r in route] == ["v1", "v2"]
        assert [r["weight"] for r in route] == [90, 10]
    forced = vs["spec"]["http"][0]
    assert forced["match"][0]["headers"] == {"x-aimesh-variant": {"exact": "v2"}}
