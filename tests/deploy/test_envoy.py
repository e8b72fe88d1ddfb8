"""The gateway's bootstrap parses into Envoy's own typed protos (envoy-data-plane):
unknown fields, bad enum values and unregistered typed_config types fail."""

from __future__ import annotations

import contextlib
import importlib
import warnings
from collections.abc import Iterator
from typing import Any

import pytest
import yaml

from tests.deploy.conftest import ROOT

ENVOY = ROOT / "gateway_envoy" / "envoy.yaml"


def type_urls(node: Any) -> Iterator[str]:
    if isinstance(node, dict):
        if "@type" in node:
            yield str(node["@type"])
        for value in node.values():
            yield from type_urls(value)
    elif isinstance(node, list):
        for value in node:
            yield from type_urls(value)


def parse(config: dict[str, Any]) -> Any:
    """Bootstrap.from_dict, after importing the module of every typed_config so
    Any can resolve it; a type with no module stays unregistered and fails."""
    with warnings.catch_warnings():
        # envoy-data-plane's generated models use a pydantic idiom deprecated in 2.12.
        warnings.simplefilter("ignore", DeprecationWarning)
        for url in set(type_urls(config)):
            package = url.rsplit("/", 1)[-1].rsplit(".", 1)[0]
            # A type with no module stays unregistered, and from_dict refuses it.
            with contextlib.suppress(ModuleNotFoundError):
                importlib.import_module(f"envoy_data_plane.{package}")
        bootstrap = importlib.import_module("envoy_data_plane.envoy.config.bootstrap.v3")
    return bootstrap.Bootstrap.from_dict(config)


def config() -> dict[str, Any]:
    loaded: dict[str, Any] = yaml.safe_load(ENVOY.read_text())
    return loaded


def test_bootstrap_parses() -> None:
    bootstrap = parse(config())
    names = {cluster.name for cluster in bootstrap.static_resources.clusters}
    assert {"user", "search", "recommend", "chat", "notify", "user_jwks", "otel_collector"} <= names


@pytest.mark.parametrize(
    ("old", "new", "error"),
    [
        ("stat_prefix: edge_rate_limit", "stat_prefx: edge_rate_limit", KeyError),
        ("type: STRICT_DNS", "type: STRICT_DNZ", ValueError),
        ("jwt_authn.v3.JwtAuthentication", "jwt_authn.v3.JwtAuthenticator", TypeError),
        ("denominator: HUNDRED", "denominator: PERCENT", ValueError),
    ],
)
def test_mistakes_fail(old: str, new: str, error: type[Exception]) -> None:
    text = ENVOY.read_text()
    assert old in text
    with pytest.raises(error):
        parse(yaml.safe_load(text.replace(old, new, 1)))
