"""`aimesh mesh lint` on what `kubectl apply -k` sends (test_mesh_lint checks the
committed deployments are clean): a small fixture service is clean, and each
rule fires on the fixture broken in just the way it guards against."""

from __future__ import annotations

import pathlib
import shutil

import pytest

from aimesh_cli.main import main
from aimesh_cli.meshlint import built
from tests.deploy.conftest import ROOT

FIXTURES = pathlib.Path(__file__).parent / "fixtures"
# fixture folder -> the one rule it must trip
BROKEN = {
    "namespace": "namespace",
    "reference": "reference",
    "reference-account": "reference",
    "cluster-dns": "cluster-dns",
    "selector": "selector",
    "image-dockerfile": "image-dockerfile",
    "mtls-strict": "mtls-strict",
    "probes": "probes",
    "resources": "resources",
    "security-context": "security-context",
    "outlier-detection": "outlier-detection",
}


def lint_fixture(name: str) -> list[str]:
    folder = (FIXTURES / name).relative_to(ROOT).as_posix()
    deploy = built.deployment(ROOT, name, built.build(ROOT, folder), built.load_config(ROOT))
    return [f"[{f.rule}] {f.message}" for rule in built.BUILT_RULES.values() for f in rule(deploy)]


def test_every_built_rule_has_a_broken_fixture() -> None:
    assert set(BROKEN.values()) == set(built.BUILT_RULES)


def test_good_fixture_is_clean() -> None:
    assert lint_fixture("good") == []


@pytest.mark.parametrize("fixture", sorted(BROKEN))
def test_rule_fires_on_its_broken_fixture(fixture: str) -> None:
    found = lint_fixture(fixture)
    assert found
    assert all(line.startswith(f"[{BROKEN[fixture]}]") for line in found), found


def test_an_overlay_without_its_namespace_is_caught(mesh_copy: pathlib.Path) -> None:
    """The regression of issue 19: dev's components' objects outside `aimesh`."""
    path = mesh_copy / "k8s" / "overlays" / "dev" / "kustomization.yaml"
    path.write_text(path.read_text().replace("namespace: aimesh\n", ""))
    docs = built.build(mesh_copy, "k8s/overlays/dev") + built.build(mesh_copy, "istio")
    deploy = built.deployment(mesh_copy, "dev", docs, built.load_config(mesh_copy))
    found = [str(f) for rule in built.BUILT_RULES.values() for f in rule(deploy)]
    assert "k8s/overlays/dev: [namespace] Secret default/user-db: lands in 'default' " in "\n".join(
        found
    )
    assert any(
        "[reference] StatefulSet aimesh/user-db: volume secrets: "
        "no Secret user-db in namespace aimesh" in line
        for line in found
    )


def test_an_overlay_patch_is_checked_by_the_source_rules(
    mesh_copy: pathlib.Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """An overlay's image override is no object of its own: only the build shows
    the GPU Deployment running the CPU image."""
    path = mesh_copy / "k8s" / "overlays" / "gpu" / "kustomization.yaml"
    path.write_text(
        path.read_text().replace(
            "{name: ghcr.io/aimesh/search-gpu, newTag: 0.1.0}",
            "{name: ghcr.io/aimesh/search-gpu, newName: ghcr.io/aimesh/search, newTag: 0.1.0}",
        )
    )
    assert main(["mesh", "lint", "--root", str(mesh_copy)]) == 1
    lines = capsys.readouterr().out.splitlines()
    assert lines
    assert all(
        line.startswith("k8s/overlays/gpu: [gpu-image] Deployment search-v1") for line in lines
    ), lines


def test_an_overlay_no_deployment_applies_is_a_finding(mesh_copy: pathlib.Path) -> None:
    shutil.copytree(mesh_copy / "k8s" / "overlays" / "prod", mesh_copy / "k8s" / "overlays" / "eu")
    config = built.load_config(mesh_copy)
    assert [str(f) for f in built.unlisted_overlays(mesh_copy, config)] == [
        "k8s/overlays/eu: [kustomize-build] no deployment of k8s/meshlint.yaml applies it"
    ]
    assert list(built.unlisted_overlays(ROOT, built.load_config(ROOT))) == []


def test_prod_secrets_made_by_hand_resolve_only_because_the_config_lists_them() -> None:
    config = built.load_config(ROOT)
    docs = built.build(ROOT, "k8s/overlays/prod")
    assert not list(built.references(built.deployment(ROOT, "prod", docs, config)))
    del config["external_secrets"]["prod"]["aimesh"]["notify-keys"]
    config["external_secrets"]["prod"]["aimesh"]["user-keys"] = ["another-key"]
    found = sorted(
        f.message for f in built.references(built.deployment(ROOT, "prod", docs, config))
    )
    assert found == [
        "Deployment aimesh/notify-v1: volume secrets: no Secret notify-keys in namespace aimesh",
        "Deployment aimesh/user-v1: volume secrets: Secret user-keys (created by hand) "
        "is not listed with key 'key-encryption-key'",
    ]


def test_a_target_that_does_not_build_is_a_finding(mesh_copy: pathlib.Path) -> None:
    (mesh_copy / "k8s" / "meshlint.yaml").write_text("deployments: {dev: [k8s/overlays/dev]}\n")
    path = mesh_copy / "k8s" / "overlays" / "dev" / "kustomization.yaml"
    path.write_text(
        path.read_text().replace("../../components/observability", "../../components/tracing")
    )
    found = [f for f in built.lint(mesh_copy) if f.file == "k8s/overlays/dev"]
    assert len(found) == 1 and found[0].rule == "kustomize-build", found
    assert "tracing" in found[0].message
