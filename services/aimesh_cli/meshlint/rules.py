"""The mesh's rules. Each takes the loaded config and returns its findings; a
finding names the file and the rule, so one line says what to fix where."""

from __future__ import annotations

import fnmatch
import json
import re
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

from aimesh_cli.meshlint import contracts, openapi, sources
from aimesh_cli.meshlint.contracts import Method
from aimesh_cli.meshlint.sources import Mesh, Obj
from aimesh_runtime.config import SERVICE_PORTS

# Retry triggers that fire only when the request never reached a server, so
# they are safe for any method.
SAFE_RETRY_ON = {"connect-failure", "refused-stream", "reset-before-request"}
ISTIO_PROTOCOLS = ("grpc", "http", "http2", "https", "tcp", "tls", "mongo", "mysql", "redis", "udp")
GATEWAY = "gateway"


@dataclass(frozen=True, order=True)
class Finding:
    file: str
    rule: str
    message: str

    def __str__(self) -> str:
        return f"{self.file}: [{self.rule}] {self.message}"


Rule = Callable[[Mesh], Iterable[Finding]]


def _fqdn(host: str, namespace: str) -> str:
    return host if "." in host else f"{host}.{namespace}.svc.cluster.local"


def _service_of_host(host: str) -> str:
    return host.split(".")[0]


# --- which methods a route serves -------------------------------------------------


def _uri_matches(uri: dict[str, Any] | None, path: str) -> bool:
    if uri is None:
        return True
    if "exact" in uri:
        return bool(uri["exact"] == path)
    if "prefix" in uri:
        return path.startswith(str(uri["prefix"]))
    if "regex" in uri:
        return re.fullmatch(str(uri["regex"]), path) is not None
    return True


def _covered(
    routes: list[dict[str, Any]],
    methods: list[Method],
    clauses: Callable[[dict[str, Any]], list[tuple[dict[str, Any] | None, str]]],
) -> Iterator[tuple[int, dict[str, Any], list[Method]]]:
    """Each route with the methods it serves: first match wins, so a method
    goes to a later route only if no earlier route with the same or fewer
    other conditions (headers) took it already."""
    taken: list[tuple[dict[str, Any] | None, str]] = []
    for index, route in enumerate(routes):
        served: list[Method] = []
        for uri, conditions in clauses(route):
            for method in methods:
                if not _uri_matches(uri, method.path) or method in served:
                    continue
                shadowed = any(
                    _uri_matches(earlier_uri, method.path)
                    and (earlier_conditions == "" or earlier_conditions == conditions)
                    for earlier_uri, earlier_conditions in taken
                )
                if not shadowed:
                    served.append(method)
        taken += clauses(route)
        yield index, route, served


def _vs_clauses(route: dict[str, Any]) -> list[tuple[dict[str, Any] | None, str]]:
    matches = route.get("match") or [{}]
    out = []
    for match in matches:
        others = {k: v for k, v in match.items() if k not in ("uri", "name")}
        out.append((match.get("uri"), json.dumps(others, sort_keys=True) if others else ""))
    return out


def _envoy_clauses(route: dict[str, Any]) -> list[tuple[dict[str, Any] | None, str]]:
    match = route.get("match", {})
    uri: dict[str, Any] | None = None
    if "path" in match:
        uri = {"exact": match["path"]}
    elif "prefix" in match:
        uri = {"prefix": match["prefix"]}
    elif "safe_regex" in match:
        uri = {"regex": match["safe_regex"]["regex"]}
    others = {k: v for k, v in match.items() if k in ("headers", "query_parameters")}
    return [(uri, json.dumps(others, sort_keys=True) if others else "")]


# --- Envoy bootstrap walking ---------------------------------------------------------


def _envoy_route_configs(envoy: dict[str, Any]) -> Iterator[dict[str, Any]]:
    for listener in envoy.get("static_resources", {}).get("listeners", []):
        for chain in listener.get("filter_chains", []):
            for network_filter in chain.get("filters", []):
                config = network_filter.get("typed_config", {})
                if "route_config" in config:
                    yield config


def _envoy_routes(envoy: dict[str, Any]) -> Iterator[dict[str, Any]]:
    for manager in _envoy_route_configs(envoy):
        for host in manager["route_config"].get("virtual_hosts", []):
            yield from host.get("routes", [])


def _http_filter(envoy: dict[str, Any], name: str) -> dict[str, Any]:
    for manager in _envoy_route_configs(envoy):
        for http_filter in manager.get("http_filters", []):
            if http_filter.get("name") == name:
                return dict(http_filter.get("typed_config", {}))
    return {}


def _mesh_methods(mesh: Mesh, service: str) -> list[Method]:
    return [m for m in mesh.methods if m.short_service == service]


# --- the rules -------------------------------------------------------------------------


def virtual_service_subsets(mesh: Mesh) -> Iterator[Finding]:
    """Every VirtualService subset exists in a DestinationRule; weights sum to 100."""
    subsets: dict[str, set[str]] = {}
    for rule in mesh.of_kind("DestinationRule"):
        host = _fqdn(str(rule.spec.get("host", "")), mesh.namespace)
        subsets.setdefault(host, set()).update(s["name"] for s in rule.spec.get("subsets", []))
    for vs in mesh.of_kind("VirtualService"):
        for route in vs.spec.get("http", []):
            destinations = route.get("route", [])
            for destination in destinations:
                target = destination.get("destination", {})
                host = _fqdn(str(target.get("host", "")), mesh.namespace)
                subset = target.get("subset")
                if subset and subset not in subsets.get(host, set()):
                    yield Finding(
                        vs.file,
                        "vs-subset",
                        f"VirtualService {vs.name} route {route.get('name', '?')} sends to "
                        f"subset {subset} of {host}, which no DestinationRule defines",
                    )
            weights = [d.get("weight") for d in destinations]
            if len(destinations) > 1 or any(w is not None for w in weights):
                total = sum(int(w or 0) for w in weights)
                if total != 100:
                    yield Finding(
                        vs.file,
                        "vs-weights",
                        f"VirtualService {vs.name} route {route.get('name', '?')} "
                        f"weights sum to {total}, not 100",
                    )


def service_ports(mesh: Mesh) -> Iterator[Finding]:
    """gRPC ports are named grpc* or say appProtocol: grpc; every port names a protocol."""
    grpc_ports = set(SERVICE_PORTS.values())
    for service in mesh.of_kind("Service"):
        for port in service.spec.get("ports", []):
            name = str(port.get("name", ""))
            app_protocol = port.get("appProtocol")
            is_grpc = port.get("targetPort") == "grpc" or port.get("port") in grpc_ports
            if is_grpc and not (name.startswith("grpc") or app_protocol == "grpc"):
                yield Finding(
                    service.file,
                    "service-port-grpc",
                    f"Service {service.name} port {port.get('port')} carries gRPC but is "
                    f"named {name!r} without appProtocol: grpc (Istio would treat it as TCP)",
                )
            elif not (app_protocol or name.split("-")[0] in ISTIO_PROTOCOLS):
                yield Finding(
                    service.file,
                    "service-port-grpc",
                    f"Service {service.name} port {port.get('port')} ({name!r}) names no protocol",
                )


def _matches_grpc(match: dict[str, Any]) -> bool:
    """A route for gRPC calls: `grpc: {}`, or a content-type match that gRPC's passes."""
    if match.get("grpc") is not None:
        return True
    for header in match.get("headers", []):
        if str(header.get("name", "")).lower() != "content-type":
            continue
        wanted = header.get("string_match", {})
        prefix = wanted.get("prefix")
        if isinstance(prefix, str) and prefix and "application/grpc".startswith(prefix):
            return True
        if wanted.get("exact") == "application/grpc":
            return True
    return False


def envoy_routes(mesh: Mesh) -> Iterator[Finding]:
    """Every Envoy route's cluster exists; every public service has a route and is transcoded."""
    clusters = {c["name"] for c in mesh.envoy.get("static_resources", {}).get("clusters", [])}
    routes = list(_envoy_routes(mesh.envoy))
    for route in routes:
        cluster = route.get("route", {}).get("cluster")
        if cluster is not None and cluster not in clusters:
            yield Finding(
                sources.ENVOY,
                "envoy-route-cluster",
                f"route {json.dumps(route.get('match'))} sends to unknown cluster {cluster}",
            )
    edge_services = sorted({m.full_service for m in mesh.methods if m.edge})
    grpc_routes = [r for r in routes if _matches_grpc(r.get("match", {}))]
    for service in edge_services:
        path = next(m.path for m in mesh.methods if m.full_service == service)
        if not any(_uri_matches(_envoy_clauses(r)[0][0], path) for r in grpc_routes):
            yield Finding(sources.ENVOY, "envoy-service-route", f"no route serves {service}")
    transcoded = set(
        _http_filter(mesh.envoy, "envoy.filters.http.grpc_json_transcoder").get("services", [])
    )
    for service in edge_services:
        if service not in transcoded:
            yield Finding(
                sources.ENVOY,
                "envoy-service-route",
                f"{service} has REST mappings but grpc_json_transcoder does not list it",
            )
    # The token check exempts exactly the methods whose access option is public.
    rules = _http_filter(mesh.envoy, "envoy.filters.http.jwt_authn").get("rules", [])
    exempt = {r["match"]["path"] for r in rules if "requires" not in r and "path" in r["match"]}
    public = {m.path for m in mesh.methods if m.public}
    for path in sorted(exempt ^ public):
        state = "exempts from" if path in exempt else "demands"
        yield Finding(
            sources.ENVOY,
            "envoy-jwt-public",
            f"jwt_authn {state} a token for {path}, but its access option says "
            f"{'not ' if path in exempt else ''}public",
        )


def _service_accounts(mesh: Mesh) -> set[str]:
    return {
        f"cluster.local/ns/{mesh.namespace}/sa/{obj.name}" for obj in mesh.of_kind("ServiceAccount")
    }


def _principals(policy: Obj) -> Iterator[str]:
    for rule in policy.spec.get("rules", []):
        for source in rule.get("from", []):
            yield from source.get("source", {}).get("principals", [])


def authorization_principals(mesh: Mesh) -> Iterator[Finding]:
    """Every AuthorizationPolicy principal is a ServiceAccount of the deploy."""
    accounts = _service_accounts(mesh)
    for policy in mesh.of_kind("AuthorizationPolicy"):
        for principal in _principals(policy):
            if not any(fnmatch.fnmatchcase(account, principal) for account in accounts):
                yield Finding(
                    policy.file,
                    "authz-principal",
                    f"AuthorizationPolicy {policy.name} allows {principal}, "
                    "which matches no ServiceAccount",
                )


def _expected_grants(mesh: Mesh) -> dict[str, set[tuple[str, str]]]:
    """service -> {(caller, method path)} from the call graph and the contracts."""
    grants: dict[str, set[tuple[str, str]]] = {service: set() for service in SERVICE_PORTS}
    for method in mesh.methods:
        if method.edge:
            grants[method.short_service].add((GATEWAY, method.path))
    for call in mesh.callgraph.get("grpc", []):
        package = next(m.full_service for m in _mesh_methods(mesh, call["to"]))
        for caller in call["from"]:
            for name in call["methods"]:
                grants[call["to"]].add((caller, f"/{package}/{name}"))
    return grants


def authorization_callgraph(mesh: Mesh) -> Iterator[Finding]:
    """Each service's policy allows exactly its callers' methods; deny by default."""
    policies = mesh.of_kind("AuthorizationPolicy")
    if not any(p.spec == {} and p.body.get("spec") is not None for p in policies):
        yield Finding(
            "istio/authorization", "authz-callgraph", "no allow-nothing (deny-all) policy"
        )
    prefix = f"cluster.local/ns/{mesh.namespace}/sa/"
    for service, expected in _expected_grants(mesh).items():
        mine = [
            p
            for p in policies
            if p.spec.get("selector", {}).get("matchLabels", {}).get("app") == service
            and p.spec.get("action", "ALLOW") == "ALLOW"
        ]
        if not mine:
            yield Finding(
                "istio/authorization", "authz-callgraph", f"no ALLOW policy for {service}"
            )
            continue
        granted: set[tuple[str, str]] = set()
        for policy in mine:
            for rule in policy.spec.get("rules", []):
                principals = [
                    p.removeprefix(prefix)
                    for source in rule.get("from", [])
                    for p in source.get("source", {}).get("principals", [])
                ]
                paths = [
                    path
                    for target in rule.get("to", [])
                    for path in target.get("operation", {}).get("paths", [])
                ]
                if not rule.get("from"):
                    principals = ["*"]
                for path in paths:
                    if not path.startswith("/aimesh."):
                        continue  # HTTP side port paths (the public JWKS)
                    granted.update((caller, path) for caller in principals)
        for caller, path in sorted(granted - expected):
            yield Finding(
                mine[0].file,
                "authz-callgraph",
                f"{caller} may call {path}, which the call graph does not have",
            )
        for caller, path in sorted(expected - granted):
            yield Finding(
                mine[0].file,
                "authz-callgraph",
                f"{caller} calls {path} in the call graph, but no rule allows it",
            )


def _containers(obj: Obj) -> Iterator[dict[str, Any]]:
    template = obj.spec.get("template", {}).get("spec", {})
    yield from template.get("containers", []) or []


def gpu_images(mesh: Mesh) -> Iterator[Finding]:
    """nvidia.com/gpu only on GPU images, and GPU images always get a GPU."""
    for obj in mesh.objects:
        if obj.kind not in ("Deployment", "StatefulSet"):
            continue
        for container in _containers(obj):
            resources = container.get("resources", {})
            wants_gpu = any(
                "nvidia.com/gpu" in (resources.get(k) or {}) for k in ("limits", "requests")
            )
            image = str(container.get("image", ""))
            gpu_image = "-gpu" in image.rsplit("/", 1)[-1]
            if wants_gpu and not gpu_image:
                yield Finding(
                    obj.file,
                    "gpu-image",
                    f"{obj.kind} {obj.name} container {container.get('name')} asks for "
                    f"nvidia.com/gpu but runs the CPU image {image or '(unchanged)'}",
                )
            if gpu_image and not wants_gpu:
                yield Finding(
                    obj.file,
                    "gpu-image",
                    f"{obj.kind} {obj.name} runs GPU image {image} without an nvidia.com/gpu limit",
                )


def _unsafe_retry(retry_on: str) -> bool:
    return any(trigger.strip() not in SAFE_RETRY_ON for trigger in retry_on.split(","))


def retries_and_timeouts(mesh: Mesh) -> Iterator[Finding]:
    """No retries on non-idempotent methods; no timeout on streaming routes."""
    for vs in mesh.of_kind("VirtualService"):
        service = _service_of_host(str(vs.spec.get("hosts", [""])[0]))
        methods = _mesh_methods(mesh, service)
        for _, route, served in _covered(vs.spec.get("http", []), methods, _vs_clauses):
            label = f"VirtualService {vs.name} route {route.get('name', '?')}"
            retries = route.get("retries")
            unsafe = [m.name for m in served if not m.idempotent or m.streaming]
            if unsafe:
                if retries is None:
                    yield Finding(
                        vs.file,
                        "retry-idempotent",
                        f"{label} keeps Istio's default retries (on unavailable) for "
                        f"{', '.join(unsafe)}, which are not idempotent or stream",
                    )
                elif retries.get("attempts", 0) > 0 and _unsafe_retry(
                    str(retries.get("retryOn", ""))
                ):
                    yield Finding(
                        vs.file,
                        "retry-idempotent",
                        f"{label} retries on {retries.get('retryOn')} for "
                        f"{', '.join(unsafe)}, which are not idempotent or stream",
                    )
            streams = [m.name for m in served if m.streaming]
            if streams and route.get("timeout") not in (None, "0s"):
                yield Finding(
                    vs.file,
                    "timeout-streaming",
                    f"{label} sets timeout {route['timeout']} on streaming {', '.join(streams)}",
                )
    routes = list(_envoy_routes(mesh.envoy))
    for _, route, served in _covered(routes, mesh.methods, _envoy_clauses):
        action = route.get("route", {})
        label = f"route {json.dumps(route.get('match'))}"
        retry_on = str(action.get("retry_policy", {}).get("retry_on", ""))
        unsafe = [m.name for m in served if not m.idempotent or m.streaming]
        if unsafe and retry_on and _unsafe_retry(retry_on):
            yield Finding(
                sources.ENVOY,
                "retry-idempotent",
                f"{label} retries on {retry_on} for {', '.join(unsafe)}, "
                "which are not idempotent or stream",
            )
        streams = [m.name for m in served if m.streaming]
        # Envoy's default route timeout is 15 s: streams need an explicit 0s.
        if streams and action.get("timeout") != "0s":
            yield Finding(
                sources.ENVOY,
                "timeout-streaming",
                f"{label} has timeout {action.get('timeout', '15s (default)')} on "
                f"streaming {', '.join(streams)}; set 0s",
            )


def selects(selector: dict[str, Any] | None, labels: dict[str, str]) -> bool:
    """Label selector semantics; None selects nothing, {} selects everything."""
    if selector is None:
        return False
    for key, value in (selector.get("matchLabels") or {}).items():
        if labels.get(key) != value:
            return False
    for expression in selector.get("matchExpressions") or []:
        key, operator = expression["key"], expression["operator"]
        values = expression.get("values") or []
        if operator == "In" and labels.get(key) not in values:
            return False
        if operator == "NotIn" and labels.get(key) in values:
            return False
        if operator == "Exists" and key not in labels:
            return False
        if operator == "DoesNotExist" and key in labels:
            return False
    return True


def _allows(policy: Obj, direction: str, own: str, peer: str, port: int) -> bool:
    """Whether `policy` lets pods labelled app=own talk to app=peer on port."""
    spec = policy.spec
    if not selects(spec.get("podSelector"), {"app": own}):
        return False
    if direction.capitalize() not in spec.get("policyTypes", ["Ingress"]):
        return False
    peers_key = "from" if direction == "ingress" else "to"
    for rule in spec.get(direction, []) or []:
        peers = rule.get(peers_key)
        peer_ok = peers is None or any(
            "namespaceSelector" not in p
            and "ipBlock" not in p
            and selects(p.get("podSelector"), {"app": peer})
            for p in peers
        )
        ports = rule.get("ports")
        port_ok = ports is None or any(p.get("port") == port for p in ports)
        if peer_ok and port_ok:
            return True
    return False


def network_policies(mesh: Mesh) -> Iterator[Finding]:
    """A NetworkPolicy, both ways, for each allowed call."""
    policies = mesh.of_kind("NetworkPolicy")
    folder = "k8s/components/network-policies"
    calls: set[tuple[str, str, int]] = {(GATEWAY, s, p) for s, p in SERVICE_PORTS.items()}
    for call in mesh.callgraph.get("grpc", []):
        calls.update((caller, call["to"], SERVICE_PORTS[call["to"]]) for caller in call["from"])
    for call in mesh.callgraph.get("http", []):
        calls.update((caller, call["to"], int(call["port"])) for caller in call["from"])
    for caller, callee, port in sorted(calls):
        if not any(_allows(p, "ingress", callee, caller, port) for p in policies):
            yield Finding(
                folder,
                "networkpolicy-call",
                f"no NetworkPolicy lets {callee} accept {caller} on port {port}",
            )
        if not any(_allows(p, "egress", caller, callee, port) for p in policies):
            yield Finding(
                folder,
                "networkpolicy-call",
                f"no NetworkPolicy lets {caller} reach {callee} on port {port}",
            )


def generated_files(mesh: Mesh) -> Iterator[Finding]:
    """The OpenAPI document and the gateway's descriptor copy match the contracts."""
    descriptor_set = contracts.load_descriptor_set(contracts.default_descriptor_set(mesh.root))
    expected = openapi.render(descriptor_set)
    path = mesh.root / sources.OPENAPI
    if not path.exists() or path.read_text() != expected:
        yield Finding(sources.OPENAPI, "generated-stale", "stale; run `aimesh mesh gen`")
    copy = mesh.root / sources.DESCRIPTOR_COPY
    if not copy.exists() or copy.read_bytes() != mesh.descriptor_bytes:
        yield Finding(sources.DESCRIPTOR_COPY, "generated-stale", "stale; run `aimesh mesh gen`")


def yaml_problems(mesh: Mesh) -> Iterator[Finding]:
    for file, message in mesh.problems:
        yield Finding(file, "yaml", message)


RULES: list[Rule] = [
    yaml_problems,
    virtual_service_subsets,
    service_ports,
    envoy_routes,
    authorization_principals,
    authorization_callgraph,
    gpu_images,
    retries_and_timeouts,
    network_policies,
    generated_files,
]


def lint(mesh: Mesh) -> list[Finding]:
    return sorted(finding for rule in RULES for finding in rule(mesh))
