"""Run the platform on one machine: a database server, five processes, or one.

The database is the embedded PostgreSQL from the pgserver package, unless
AIMESH_DATABASE_URL names a server. Each service gets its own database and its
own login role, and other roles may not connect to it. Secrets for the dev
setup (the signing-key and webhook-secret encryption keys, the dev admin's
password, role passwords) are generated once into the state folder, which git
ignores.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlsplit, urlunsplit

import asyncpg
import grpc
import httpx
from grpc_health.v1 import health_pb2, health_pb2_grpc

from aimesh.user.v1 import user_service_pb2, user_service_pb2_grpc
from aimesh_runtime.config import HTTP_PORT_OFFSET, SERVICE_PORTS, database_env

SERVICES = tuple(SERVICE_PORTS)  # user first: the others fetch its JWKS
# Each has an account and API key of its own, which the user service bootstraps
# and only it may publish its topics with; the user service mints its own tokens.
KEYED_SERVICES = tuple(name for name in SERVICES if name != "user")
SHARED_DATABASES = ("postgres", "template1")  # template0 takes no connections at all
MONOLITH_PORT = 50050
# Recommend serving model v2 beside v1, for the edge's A/B split; and the edge's own ports.
EXTRA_PORTS = {"recommend-v2": 50056, "edge": 8080, "edge-admin": 9901, "edge-stats": 9902}
PROMETHEUS_PORT = 9090
DEV_ADMIN_EMAIL = "admin@aimesh.local"


def port_offset() -> int:
    """AIMESH_PORT_OFFSET shifts every local port, to run a second platform beside one."""
    raw = os.environ.get("AIMESH_PORT_OFFSET", "0")
    try:
        offset = int(raw)
    except ValueError:
        raise SystemExit(f"aimesh: AIMESH_PORT_OFFSET={raw!r} is not a whole number") from None
    if not 0 <= offset <= 10_000:
        raise SystemExit("aimesh: AIMESH_PORT_OFFSET must be between 0 and 10000")
    return offset


def free_port_offset(start: int = 3000) -> int:
    """An offset whose gRPC and HTTP ports are all free now (for tests and benchmarks)."""
    bases = [MONOLITH_PORT, *SERVICE_PORTS.values(), EXTRA_PORTS["recommend-v2"]]
    singles = [*EXTRA_PORTS.values(), PROMETHEUS_PORT]
    for offset in range(start, 10_000, 37):
        ports = [base + offset + side for base in bases for side in (0, HTTP_PORT_OFFSET)]
        ports += [single + offset for single in singles]
        if all(port_free(port) for port in ports):
            return offset
    raise RuntimeError("no free range of ports")


def port_free(port: int) -> bool:
    """Whether a server could bind the port now: nothing listens on it, and no
    client connection holds it as its local end (ports here are in the kernel's
    ephemeral range, which outgoing connections draw from)."""
    with socket.socket() as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as servers bind
        try:
            probe.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


def grpc_port(service: str) -> int:
    """The local port of a service, of recommend-v2, or of the edge's listeners."""
    if service == "monolith":
        base = MONOLITH_PORT
    elif service == "prometheus":
        base = PROMETHEUS_PORT
    else:
        base = SERVICE_PORTS.get(service) or EXTRA_PORTS[service]
    return base + port_offset()


def state_dir() -> Path:
    return Path(os.environ.get("AIMESH_STATE_DIR", ".aimesh")).resolve()


def load_secrets(folder: Path) -> dict[str, Any]:
    """The dev secrets, created on first use and reused after."""
    path = folder / "secrets.json"
    if path.exists():
        stored: dict[str, Any] = json.loads(path.read_text())
        added: dict[str, Callable[[], Any]] = {
            # State folders made before sealed webhook secrets, and before each service
            # had its own key (the shared "service_api_key" of older ones goes unused).
            "notify_secret_encryption_key": _new_key,
            "service_api_keys": _new_service_api_keys,
        }
        missing = {name: new() for name, new in added.items() if name not in stored}
        if missing:
            stored.update(missing)
            path.write_text(json.dumps(stored, indent=2))
        return stored
    folder.mkdir(parents=True, exist_ok=True)
    created = {
        "key_encryption_key": _new_key(),
        "notify_secret_encryption_key": _new_key(),
        "admin_email": DEV_ADMIN_EMAIL,
        "admin_password": secrets.token_urlsafe(18),
        "role_passwords": {name: secrets.token_hex(16) for name in SERVICES},
        "service_api_keys": _new_service_api_keys(),
    }
    path.touch(mode=0o600)
    path.write_text(json.dumps(created, indent=2))
    return created


def _new_key() -> str:
    return base64.urlsafe_b64encode(os.urandom(32)).decode()


def _new_service_api_keys() -> dict[str, str]:
    """Per service, the key it calls others with on its own behalf (its outbox relay)."""
    return {
        name: f"amk_{secrets.token_hex(4)}_{secrets.token_urlsafe(32)}" for name in KEYED_SERVICES
    }


def own_key_env(service: str) -> str:
    return f"AIMESH_{service.upper()}_SERVICE_API_KEY"


def bootstrap_key_env(service: str) -> str:
    return f"AIMESH_USER_BOOTSTRAP_{service.upper()}_SERVICE_API_KEY"


@contextlib.contextmanager
def database_server(folder: Path) -> Iterator[str]:
    """The admin URL of AIMESH_DATABASE_URL, or of an embedded server in `folder`."""
    external = os.environ.get("AIMESH_DATABASE_URL")
    if external:
        yield external
        return
    # pgserver keeps its lock and socket in the XDG runtime folder; give it one.
    runtime = folder / "run"
    runtime.mkdir(mode=0o700, parents=True, exist_ok=True)
    os.environ.setdefault("XDG_RUNTIME_DIR", str(runtime))
    from pgserver.postgres_server import get_server

    from aimesh_cli.embedded_pg import switch_users_after_exec

    switch_users_after_exec()  # see there: a forked user switch crashed beside gRPC

    data = folder / "pgdata"
    data.mkdir(parents=True, exist_ok=True)
    server = get_server(data, cleanup_mode="stop")
    try:
        yield server.get_uri("postgres")
    finally:
        server.cleanup()


def service_url(admin_url: str, service: str, password: str) -> str:
    """The URL for `service`'s own role and database on the admin URL's server."""
    parts = urlsplit(admin_url)
    host = parts.netloc.rpartition("@")[2]
    netloc = f"aimesh_{service}:{quote(password)}@{host}"
    return urlunsplit((parts.scheme, netloc, f"/aimesh_{service}", parts.query, ""))


async def provision(admin_url: str, role_passwords: Mapping[str, str]) -> dict[str, str]:
    """Create each service's role and database if missing; return their URLs."""
    connection = await asyncpg.connect(admin_url)
    try:
        for service in SERVICES:
            role = database = f"aimesh_{service}"
            password = role_passwords[service]
            # DDL takes no parameters; the password is hex we generated. ALTER on every
            # run keeps an existing role in step with the state folder's secrets.
            if not await connection.fetchval("SELECT 1 FROM pg_roles WHERE rolname = $1", role):
                await connection.execute(f"CREATE ROLE {role} LOGIN PASSWORD '{password}'")
            else:
                await connection.execute(f"ALTER ROLE {role} LOGIN PASSWORD '{password}'")
            if not await connection.fetchval(
                "SELECT 1 FROM pg_database WHERE datname = $1", database
            ):
                await connection.execute(f"CREATE DATABASE {database} OWNER {role}")
            await connection.execute(f"REVOKE ALL ON DATABASE {database} FROM PUBLIC")
        # Every role may connect to the shared databases and make temporary
        # tables there by default: a service role could then hold objects outside
        # its own database. Only superusers (the admin) need them.
        for shared in SHARED_DATABASES:
            await connection.execute(f"REVOKE CONNECT, TEMPORARY ON DATABASE {shared} FROM PUBLIC")
    finally:
        await connection.close()
    return {s: service_url(admin_url, s, role_passwords[s]) for s in SERVICES}


def service_environment(
    urls: Mapping[str, str], stored: Mapping[str, Any], base: Mapping[str, str]
) -> dict[str, str]:
    """Environment shared by the service processes of a local run."""
    env = dict(base)
    for service, url in urls.items():
        env[database_env(service)] = url
    user_port = grpc_port("user")
    env.setdefault(
        "AIMESH_JWKS_URL", f"http://127.0.0.1:{user_port + HTTP_PORT_OFFSET}/.well-known/jwks.json"
    )
    env.setdefault("AIMESH_USER_ADDRESS", f"127.0.0.1:{user_port}")
    for peer in ("search", "chat", "recommend", "notify"):  # the deletion saga and outbox relays
        env.setdefault(f"AIMESH_{peer.upper()}_ADDRESS", f"127.0.0.1:{grpc_port(peer)}")
    for service, key in stored["service_api_keys"].items():
        env.setdefault(bootstrap_key_env(service), key)  # the user service makes the account
        env.setdefault(own_key_env(service), key)  # the service's relay publishes with it
    # As in the cluster: behind the edge, the client address is the one the edge appends.
    env.setdefault("AIMESH_TRUST_FORWARDED_FOR", "1")
    # A laptop's webhook receivers listen on localhost; clusters keep the SSRF guard on.
    env.setdefault("AIMESH_NOTIFY_ALLOW_PRIVATE_WEBHOOKS", "1")
    env.setdefault("AIMESH_USER_KEY_ENCRYPTION_KEY", stored["key_encryption_key"])
    env.setdefault("AIMESH_NOTIFY_SECRET_ENCRYPTION_KEY", stored["notify_secret_encryption_key"])
    env.setdefault("AIMESH_USER_BOOTSTRAP_ADMIN_EMAIL", stored["admin_email"])
    env.setdefault("AIMESH_USER_BOOTSTRAP_ADMIN_PASSWORD", stored["admin_password"])
    return env


@dataclass
class ServiceProcess:
    name: str
    port: int
    http_port: int
    process: subprocess.Popen[bytes]
    log_path: Path


def spawn(
    names: Sequence[str], env: Mapping[str, str], logs: Path, monolith: bool = False
) -> list[ServiceProcess]:
    logs.mkdir(parents=True, exist_ok=True)
    if monolith:
        plan = [("monolith", "aimesh_cli.monolith", grpc_port("monolith"))]
    else:
        plan = [(name, f"aimesh_{name}", grpc_port(name)) for name in names]
        if "recommend" in names:
            # Model v2 as a second process of the same service, for the edge's A/B split.
            plan.append(("recommend-v2", "aimesh_recommend", grpc_port("recommend-v2")))
    started = []
    for name, module, port in plan:
        log_path = logs / f"{name}.log"
        child_env = {
            **own_keys_only(name, env),
            "AIMESH_GRPC_PORT": str(port),
            "AIMESH_HTTP_PORT": str(port + HTTP_PORT_OFFSET),
        }
        if name == "recommend-v2":
            child_env["AIMESH_RECOMMEND_MODEL_VERSION"] = "v2"
        with log_path.open("ab") as log_file:
            process = subprocess.Popen(
                [sys.executable, "-m", module],
                env=child_env,
                stdout=log_file,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # Ctrl-C reaches us; we drain the children
            )
        started.append(ServiceProcess(name, port, port + HTTP_PORT_OFFSET, process, log_path))
    return started


def own_keys_only(process: str, env: Mapping[str, str]) -> dict[str, str]:
    """`env` less the service keys that `process` does not use: a service holds only
    its own, the user service only the bootstrap copies, the monolith all of them."""
    if process == "monolith":
        return dict(env)
    service = process.removesuffix("-v2")
    dropped = {own_key_env(name) for name in KEYED_SERVICES if name != service}
    if service != "user":
        dropped |= {bootstrap_key_env(name) for name in KEYED_SERVICES}
    return {name: value for name, value in env.items() if name not in dropped}


async def check_health(address: str, timeout_s: float = 1.0) -> str:
    """The overall health status name of the server at `address`."""
    async with grpc.aio.insecure_channel(address) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        try:
            reply = await stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=timeout_s)
        except grpc.aio.AioRpcError as error:
            return str(error.code().name)
        return str(health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status))


async def wait_serving(
    processes: Sequence[ServiceProcess],
    timeout_s: float = 90.0,
    interrupted: Callable[[], bool] = lambda: False,
) -> None:
    deadline = time.monotonic() + timeout_s
    pending = list(processes)
    while pending:
        if interrupted():
            raise RuntimeError("interrupted while starting")
        for item in list(pending):
            if item.process.poll() is not None:
                tail = item.log_path.read_text(errors="replace")[-2000:]
                raise RuntimeError(f"{item.name} exited with {item.process.returncode}:\n{tail}")
            if await check_health(f"127.0.0.1:{item.port}", 0.5) == "SERVING":
                pending.remove(item)
        if pending:
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"not SERVING after {timeout_s:.0f} s: {[p.name for p in pending]}"
                )
            await asyncio.sleep(0.05)


def stop(processes: Sequence[ServiceProcess], grace_s: float = 15.0) -> None:
    """SIGTERM every process (they drain), then SIGKILL what outlives the grace."""
    for item in processes:
        if item.process.poll() is None:
            item.process.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    for item in processes:
        try:
            item.process.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            item.process.kill()
            item.process.wait()


async def caller_token(explicit: str | None, host: str, monolith: bool) -> str:
    """The token a CLI command sends: --token, else $AIMESH_TOKEN, else the dev admin's."""
    token = explicit or os.environ.get("AIMESH_TOKEN")
    if token:
        return token
    stored = load_secrets(state_dir())
    port = grpc_port("monolith" if monolith else "user")
    return await login(f"{host}:{port}", stored["admin_email"], stored["admin_password"])


async def login(address: str, email: str, password: str) -> str:
    async with grpc.aio.insecure_channel(address) as channel:
        stub = user_service_pb2_grpc.UserServiceStub(channel)
        reply = await stub.Login(
            user_service_pb2.LoginRequest(email=email, password=password), timeout=10
        )
        return str(reply.access_token)


def wait_http_ready(
    process: subprocess.Popen[bytes],
    what: str,
    url: str,
    log_path: Path,
    timeout_s: float = 60.0,
    interval_s: float = 0.1,
) -> None:
    """Until `url` answers 200; the end of `log_path` if `process` exits first."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            tail = log_path.read_text(errors="replace")[-2000:]
            raise RuntimeError(f"{what} exited with {process.returncode}:\n{tail}")
        try:
            if httpx.get(url, timeout=1.0).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(interval_s)
    raise TimeoutError(f"{what} not ready after {timeout_s:.0f} s; see {log_path}")
