"""`aimesh mesh lint`: clean on the committed config, and each rule fires on a
fixture broken in just the way it guards against."""

from __future__ import annotations

import pathlib
from collections.abc import Callable

import pytest

from aimesh_cli.main import main
from aimesh_cli.meshlint import rules, sources

Edit = Callable[[str, str, str], None]


def findings(root: pathlib.Path) -> list[rules.Finding]:
    return rules.lint(sources.load(root))


def test_committed_config_is_clean(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["mesh", "lint"]) == 0
    assert capsys.readouterr().out == ""


def test_broken_config_exits_nonzero_one_line_per_finding(
    mesh_copy: pathlib.Path, edit: Edit, capsys: pytest.CaptureFixture[str]
) -> None:
    edit("istio/virtual-services/recommend.yaml", "weight: 10}", "weight: 20}")
    assert main(["mesh", "lint", "--root", str(mesh_copy)]) == 1
    lines = capsys.readouterr().out.splitlines()
    assert lines
    assert all(
        line.startswith("istio/virtual-services/recommend.yaml: [vs-weights]") for line in lines
    )


# (file, old, new, rule, file the finding names)
BROKEN = {
    "vs-subset": (
        "istio/virtual-services/recommend.yaml",
        "subset: v2}, weight: 10}",
        "subset: v3}, weight: 10}",
        "istio/virtual-services/recommend.yaml",
    ),
    "vs-weights": (
        "istio/virtual-services/recommend.yaml",
        "weight: 90}",
        "weight: 80}",
        "istio/virtual-services/recommend.yaml",
    ),
    "service-port-grpc": (
        "k8s/base/search.yaml",
        "{name: grpc, port: 50052",
        "{name: main, port: 50052",
        "k8s/base/search.yaml",
    ),
    "envoy-route-cluster": (
        "gateway_envoy/envoy.yaml",
        "route: {cluster: chat, timeout: 0s}",
        "route: {cluster: chatbot, timeout: 0s}",
        "gateway_envoy/envoy.yaml",
    ),
    "envoy-service-route": (
        "gateway_envoy/envoy.yaml",
        "- match: {prefix: /aimesh.notify.v1., headers: [*grpc_content]}",
        "- match: {prefix: /aimesh.notify.v2., headers: [*grpc_content]}",
        "gateway_envoy/envoy.yaml",
    ),
    "envoy-jwt-public": (
        "gateway_envoy/envoy.yaml",
        "- match: {path: /aimesh.user.v1.UserService/Login}",
        "- match: {path: /aimesh.user.v1.UserService/ListUsers}",
        "gateway_envoy/envoy.yaml",
    ),
    "authz-principal": (
        "istio/authorization/databases.yaml",
        "principals: [cluster.local/ns/aimesh/sa/chat]",
        "principals: [cluster.local/ns/aimesh/sa/chatbot]",
        "istio/authorization/databases.yaml",
    ),
    "authz-callgraph": (
        "istio/authorization/search.yaml",
        "              - cluster.local/ns/aimesh/sa/chat\n",
        "              - cluster.local/ns/aimesh/sa/chat\n"
        "              - cluster.local/ns/aimesh/sa/notify\n",
        "istio/authorization/search.yaml",
    ),
    "gpu-image": (
        "k8s/components/gpu/search.yaml",
        "image: ghcr.io/aimesh/search-gpu:0.1.0",
        "image: ghcr.io/aimesh/search:0.1.0",
        "k8s/components/gpu/search.yaml",
    ),
    "retry-idempotent": (
        "istio/virtual-services/chat.yaml",
        'retries: {attempts: 2, retryOn: "connect-failure,refused-stream"}',
        'retries: {attempts: 2, retryOn: "unavailable"}',
        "istio/virtual-services/chat.yaml",
    ),
    "timeout-streaming": (
        "istio/virtual-services/chat.yaml",
        "      retries: {attempts: 0}",
        "      retries: {attempts: 0}\n      timeout: 30s",
        "istio/virtual-services/chat.yaml",
    ),
    "networkpolicy-call": (
        "k8s/components/network-policies/search.yaml",
        "recommend, chat]}]}",  # search's ingress: chat's calls dropped
        "recommend]}]}",
        "k8s/components/network-policies",
    ),
    "generated-stale": (
        "gateway_envoy/openapi.yaml",
        "title: aimesh REST/JSON API",
        "title: hand-edited",
        "gateway_envoy/openapi.yaml",
    ),
}


@pytest.mark.parametrize("rule", sorted(BROKEN))
def test_rule_fires_on_broken_fixture(rule: str, mesh_copy: pathlib.Path, edit: Edit) -> None:
    file, old, new, named = BROKEN[rule]
    edit(file, old, new)
    found = findings(mesh_copy)
    assert any(f.rule == rule and f.file == named for f in found), [str(f) for f in found]


def test_envoy_retry_on_gRPC_codes_for_a_non_idempotent_package_fires(
    mesh_copy: pathlib.Path, edit: Edit
) -> None:
    edit(
        "gateway_envoy/envoy.yaml",
        'retry_on: "connect-failure,refused-stream"',
        'retry_on: "unavailable"',
    )
    found = findings(mesh_copy)
    assert any(f.rule == "retry-idempotent" and f.file == "gateway_envoy/envoy.yaml" for f in found)


def test_envoy_stream_without_explicit_zero_timeout_fires(
    mesh_copy: pathlib.Path, edit: Edit
) -> None:
    edit(
        "gateway_envoy/envoy.yaml", "route: {cluster: chat, timeout: 0s}", "route: {cluster: chat}"
    )
    found = findings(mesh_copy)
    assert any(f.rule == "timeout-streaming" and "StreamChat" in f.message for f in found)


def test_istio_default_retries_on_a_side_effect_route_fire(
    mesh_copy: pathlib.Path, edit: Edit
) -> None:
    edit(
        "istio/virtual-services/search.yaml",
        '      retries: {attempts: 2, retryOn: "connect-failure,refused-stream"}\n',
        "",
    )
    found = findings(mesh_copy)
    assert any(f.rule == "retry-idempotent" and "default retries" in f.message for f in found)
