"""The layout's import rules, read from the source (no module is imported).

- Contracts stop at the servicer: in a service package only the contract
  modules below may import generated code (`*_pb2`, `*_pb2_grpc`) or
  google.protobuf. Everything else there is domain or store, and works on the
  package's own types.
- A service never imports another service's package.
- The CLI is a client and a launcher: it imports no service package.
"""

from __future__ import annotations

import ast
from importlib.metadata import entry_points
from pathlib import Path

import pytest

SERVICES_DIR = Path(__file__).resolve().parents[2] / "services"
SERVICES = ("aimesh_user", "aimesh_search", "aimesh_recommend", "aimesh_chat", "aimesh_notify")
SERVICES_IN_START_ORDER = ("user", "search", "recommend", "chat", "notify")
# The servicer translates proto <-> domain; the server wires the servicer in.
CONTRACT_MODULES = frozenset({"servicer.py", "server.py"})
# Clients of another service's generated stub (a call out, translated at the edge).
DOWNSTREAM_CLIENTS = {"aimesh_chat": {"retrieval.py"}, "aimesh_recommend": {"content.py"}}


def imported(path: Path) -> set[str]:
    """Every module `path` imports, and every `from module import name` as module.name."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return names


def is_contract_code(module: str) -> bool:
    last = module.rsplit(".", 1)[-1]
    return last.endswith(("_pb2", "_pb2_grpc")) or module.startswith("google.protobuf")


def test_the_scan_sees_generated_imports() -> None:
    assert is_contract_code("aimesh.search.v1.search_service_pb2")
    assert is_contract_code("aimesh.search.v1.search_service_pb2_grpc")
    assert is_contract_code("google.protobuf.json_format")
    assert not is_contract_code("aimesh_search.filters")
    servicer = imported(SERVICES_DIR / "aimesh_search" / "servicer.py")
    assert any(is_contract_code(name) for name in servicer)


@pytest.mark.parametrize("service", SERVICES)
def test_only_contract_modules_import_generated_code(service: str) -> None:
    allowed = CONTRACT_MODULES | DOWNSTREAM_CLIENTS.get(service, set())
    offenders = {
        str(path.relative_to(SERVICES_DIR)): sorted(filter(is_contract_code, imported(path)))
        for path in sorted((SERVICES_DIR / service).rglob("*.py"))
        if path.name not in allowed
    }
    assert {path: found for path, found in offenders.items() if found} == {}


@pytest.mark.parametrize("service", SERVICES)
def test_a_service_imports_no_other_service(service: str) -> None:
    others = [other for other in SERVICES if other != service]
    offenders = {
        str(path.relative_to(SERVICES_DIR)): sorted(
            name for name in imported(path) if name.split(".")[0] in others
        )
        for path in sorted((SERVICES_DIR / service).rglob("*.py"))
    }
    assert {path: found for path, found in offenders.items() if found} == {}


def test_the_cli_imports_no_service_package() -> None:
    offenders = {
        str(path.relative_to(SERVICES_DIR)): sorted(
            name for name in imported(path) if name.split(".")[0] in SERVICES
        )
        for path in sorted((SERVICES_DIR / "aimesh_cli").rglob("*.py"))
    }
    assert {path: found for path, found in offenders.items() if found} == {}


def test_every_service_is_registered_for_the_monolith() -> None:
    """Named only: loading them imports every service (test_local_platform's
    monolith test starts them)."""
    from aimesh_cli.monolith import GROUP, ORDER

    points = {point.name: point.value for point in entry_points(group=GROUP)}
    assert ORDER == SERVICES_IN_START_ORDER
    assert points == {name: f"aimesh_{name}.server:SPEC" for name in ORDER}
