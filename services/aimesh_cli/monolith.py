"""All five services in one process on one port, each with its own database.

The same ServiceSpecs as the separate processes: start as a monolith, split
into services later, without changing service code. The services are found by
entry point (group `aimesh.services` in pyproject.toml), so the CLI imports no
service package.
"""

from __future__ import annotations

from importlib.metadata import entry_points

from aimesh_runtime.server import ServiceSpec, main

GROUP = "aimesh.services"
# User first: the others fetch its JWKS.
ORDER = ("user", "search", "recommend", "chat", "notify")


def specs() -> tuple[ServiceSpec, ...]:
    """The installed services' specs, in ORDER; SystemExit naming any missing."""
    found = {point.name: point for point in entry_points(group=GROUP)}
    missing = [name for name in ORDER if name not in found]
    if missing:
        raise SystemExit(
            f"aimesh: no {GROUP} entry point for {', '.join(missing)}; "
            "install the project (pip install -e .) so its entry points are registered"
        )
    loaded = []
    for name in ORDER:
        spec = found[name].load()
        if not isinstance(spec, ServiceSpec):
            raise SystemExit(f"aimesh: entry point {name} is {spec!r}, not a ServiceSpec")
        loaded.append(spec)
    return tuple(loaded)


if __name__ == "__main__":
    main(specs())
