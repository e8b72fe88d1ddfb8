"""The local edge config is the deployed one, and Envoy itself accepts both.

The comparison puts back, from the deployed file, exactly the fields the renderer may
change (addresses, ports, the JWKS URL, the descriptor path); anything else it changed
makes the two differ.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from aimesh_cli import edge
from tests.conftest import require

PORTS = edge.EdgePorts(
    listener=18080,
    admin=19901,
    stats=19902,
    upstreams={
        "user": 60051,
        "search": 60052,
        "recommend": 60053,
        "chat": 60054,
        "notify": 60055,
        "recommend_v2": 60056,
    },
    jwks_port=61051,
)


def envoy_or_skip() -> str:
    binary = edge.envoy_binary()
    problem = "no Envoy binary" if binary is None else edge.envoy_runs(binary)
    require(not problem, f"a runnable Envoy ({problem})")
    assert binary is not None
    return binary


def test_rendered_differs_from_deployed_only_in_addresses_and_paths() -> None:
    rendered = edge.render(PORTS)
    assert rendered != edge.deployed()
    assert edge.as_deployed(rendered) == edge.deployed()


def test_rendered_points_every_cluster_at_loopback() -> None:
    rendered = edge.render(PORTS)
    clusters = {c["name"]: c for c in rendered["static_resources"]["clusters"]}
    for name, port in PORTS.upstreams.items():
        address = clusters[name]["load_assignment"]["endpoints"][0]["lb_endpoints"][0]
        assert address["endpoint"]["address"]["socket_address"] == {
            "address": "127.0.0.1",
            "port_value": port,
        }
    provider = edge.http_filters(rendered)[edge.JWT_FILTER]["typed_config"]["providers"]
    assert provider["aimesh_user"]["remote_jwks"]["http_uri"]["uri"] == (
        "http://127.0.0.1:61051/.well-known/jwks.json"
    )
    text = yaml.safe_dump(rendered)
    assert "svc.cluster.local" not in text and "0.0.0.0" not in text


def test_a_renderer_that_changes_more_is_caught() -> None:
    rendered = edge.render(PORTS)
    edge.edge_routes(rendered)[-1]["route"]["timeout"] = "31s"
    assert edge.as_deployed(rendered) != edge.deployed()


def test_edge_variant_share_is_the_virtual_service_weight() -> None:
    """One source of truth: the v2 share the edge stamps is the virtual service's v2 weight."""
    weights = edge.variant_weights()
    assert sum(weights.values()) == 100
    recommend = [r for r in edge.edge_routes(edge.deployed()) if "recommend" in str(r["match"])]
    percents = {r["metadata"]["filter_metadata"]["ab_variant"]["v2_percent"] for r in recommend}
    assert percents == {weights["v2"]}


def test_jwks_cache_is_well_inside_the_key_publish_lead() -> None:
    import dataclasses

    from aimesh_user.settings import UserSettings

    lead_s = next(
        f.default for f in dataclasses.fields(UserSettings) if f.name == "key_publish_lead_s"
    )
    provider = edge.http_filters(edge.deployed())[edge.JWT_FILTER]["typed_config"]["providers"]
    cache = provider["aimesh_user"]["remote_jwks"]["cache_duration"]
    assert int(cache.rstrip("s")) * 4 <= lead_s


@pytest.mark.parametrize("which", ["deployed", "rendered"])
def test_envoy_validates_the_config(which: str, tmp_path: Path) -> None:
    binary = envoy_or_skip()
    config: dict[str, Any]
    if which == "deployed":
        # The container's descriptor path, mapped to the repository's copy; nothing else.
        text = edge.DEPLOYED.read_text()
        assert edge.DEPLOYED_DESCRIPTOR in text
        config = yaml.safe_load(text.replace(edge.DEPLOYED_DESCRIPTOR, str(edge.DESCRIPTOR)))
    else:
        config = edge.render(PORTS)
    checked = edge.validate(binary, edge.write_config(config, tmp_path))
    assert checked.returncode == 0, checked.stdout + checked.stderr
