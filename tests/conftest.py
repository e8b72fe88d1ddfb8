"""Shared fixtures: an embedded PostgreSQL, fresh databases, servers on port 0."""

from __future__ import annotations

import base64
import gc
import os
import secrets
import sys
import tempfile
import uuid
import warnings
from collections.abc import AsyncIterator, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import asyncpg
import grpc
import pytest

# pgserver keeps its lock and sockets in the XDG runtime folder.
_runtime = Path(tempfile.gettempdir()) / f"aimesh-runtime-{os.getuid()}"
_runtime.mkdir(mode=0o700, exist_ok=True)
os.environ.setdefault("XDG_RUNTIME_DIR", str(_runtime))

from aimesh.user.v1 import user_service_pb2 as user_pb  # noqa: E402
from aimesh.user.v1 import user_service_pb2_grpc  # noqa: E402
from aimesh_cli.embedded_pg import switch_users_after_exec  # noqa: E402
from aimesh_runtime.config import (  # noqa: E402
    RuntimeConfig,
    database_env,
    load,
    service_api_key_env,
)
from aimesh_runtime.server import AimeshServer, ServiceSpec  # noqa: E402

# pg_ctl as pgserver's user from this process, busy with gRPC threads, must not
# fork a Python child to switch users: it crashed (issue 17, item 7).
switch_users_after_exec()

# A process the tests start that crashes fails the run (issue 17, item 7).
pytest_plugins = ("tests.crashwatch",)

ROOT = Path(__file__).resolve().parent.parent
ADMIN_EMAIL = "admin@example.com"
ADMIN_PASSWORD = "admin-password-long-enough"
# Each platform service's own account key: user servers bootstrap the accounts,
# the services' outbox relays publish with them (as `aimesh up` and the cluster do).
PLATFORM_SERVICES = ("search", "recommend", "chat", "notify")
SERVICE_API_KEYS = {
    name: f"amk_{secrets.token_hex(4)}_{secrets.token_urlsafe(32)}" for name in PLATFORM_SERVICES
}


@pytest.fixture(scope="session", autouse=True)
def report_sockets_left_at_session_end() -> Iterator[None]:
    """Sockets still unclosed when the whole session ends go to stderr (-s shows them), not fatal.

    Each test's own leaks still fail it (warnings are errors). What only the last
    collection finds, after the session's loop and servers are gone, cannot be
    pinned on a test; one such pair, seen only when test_interop and test_edge run
    together, is still being traced."""
    yield
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ResourceWarning)
        gc.collect()
    for warning in caught:
        print(f"\nleft at session end: {warning.message}", file=sys.stderr)


@pytest.fixture(scope="session")
def pg_admin_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """An embedded PostgreSQL for the whole run."""
    import pgserver

    server = pgserver.get_server(tmp_path_factory.mktemp("pgdata"), cleanup_mode="stop")
    try:
        yield server.get_uri("postgres")
    finally:
        server.cleanup()


@pytest.fixture(scope="session")
def new_database(pg_admin_url: str) -> Any:
    """Factory: create an empty database and return its URL."""

    async def create(prefix: str = "t") -> str:
        name = f"{prefix}_{uuid.uuid4().hex[:12]}"
        connection = await asyncpg.connect(pg_admin_url)
        try:
            await connection.execute(f"CREATE DATABASE {name}")
        finally:
            await connection.close()
        return pg_admin_url.replace("/postgres?", f"/{name}?")

    return create


def under_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() in ("1", "true", "yes")


def require(available: bool, what: str) -> None:
    """Skip a test whose prerequisite is missing here; with CI=true fail instead,
    so a CI machine that lost the prerequisite cannot pass by skipping."""
    if available:
        return
    if under_ci():
        pytest.fail(f"missing prerequisite under CI=true: {what}", pytrace=False)
    pytest.skip(f"missing prerequisite: {what} (a failure under CI=true)")


def kek() -> str:
    return base64.urlsafe_b64encode(os.urandom(32)).decode()


@dataclass
class Running:
    server: AimeshServer
    address: str
    http_port: int
    environ: dict[str, str]

    def channel(self) -> grpc.aio.Channel:
        return grpc.aio.insecure_channel(self.address)


async def start_server(
    specs: Sequence[ServiceSpec],
    new_database: Any,
    extra_env: dict[str, str] | None = None,
    **config_overrides: Any,
) -> Running:
    environ = {
        "AIMESH_USER_KEY_ENCRYPTION_KEY": kek(),
        "AIMESH_NOTIFY_SECRET_ENCRYPTION_KEY": kek(),
        "AIMESH_USER_BOOTSTRAP_ADMIN_EMAIL": ADMIN_EMAIL,
        "AIMESH_USER_BOOTSTRAP_ADMIN_PASSWORD": ADMIN_PASSWORD,
        # Every test registers from 127.0.0.1: lift Register's per-client limit too.
        "AIMESH_USER_REGISTER_PER_CLIENT_PER_HOUR": "1000000",
        # Every test logs in from 127.0.0.1, and some fail logins on purpose: only
        # a test about it throttles the address.
        "AIMESH_USER_LOGIN_ADDRESS_FREE_FAILURES": "1000000",
        **{
            f"AIMESH_USER_BOOTSTRAP_{n.upper()}_SERVICE_API_KEY": k
            for n, k in SERVICE_API_KEYS.items()
        },
        **{service_api_key_env(name): key for name, key in SERVICE_API_KEYS.items()},
        **(extra_env or {}),
    }
    for spec in specs:
        environ.setdefault(database_env(spec.name), await new_database(spec.name))
    # Tests register and log in far faster than a person: lift the anonymous limit
    # unless a test is about it.
    config_overrides.setdefault("rate_limit_anonymous_rps", 10_000.0)
    config_overrides.setdefault("rate_limit_anonymous_burst", 10_000)
    # Deletion sagas wait this out before purging: keep it short, not flaky.
    config_overrides.setdefault("revocation_max_stale_s", 1.0)
    config_overrides.setdefault("grpc_port", 0)  # a test restarting a server passes its port
    config_overrides.setdefault("http_port", 0)
    config = load(RuntimeConfig, environ, **config_overrides)
    server = AimeshServer(specs, config, environ)
    await server.start()
    return Running(server, f"127.0.0.1:{server.grpc_port}", server.http_port, environ)


@pytest.fixture(scope="session")
async def user_server(new_database: Any) -> AsyncIterator[Running]:
    from aimesh_user.server import SPEC

    running = await start_server([SPEC], new_database)
    yield running
    await running.server.stop(0.5)


@pytest.fixture(scope="session")
async def user_channel(user_server: Running) -> AsyncIterator[grpc.aio.Channel]:
    async with user_server.channel() as channel:
        yield channel


@pytest.fixture(scope="session")
def users(user_channel: grpc.aio.Channel) -> user_service_pb2_grpc.UserServiceStub:
    return user_service_pb2_grpc.UserServiceStub(user_channel)


async def register_and_login(
    users: user_service_pb2_grpc.UserServiceStub, password: str = "a-long-password-1"
) -> tuple[user_pb.User, str]:
    email = f"u{uuid.uuid4().hex[:10]}@example.com"
    registered = await users.Register(user_pb.RegisterRequest(email=email, password=password))
    login = await users.Login(user_pb.LoginRequest(email=email, password=password))
    return registered.user, login.access_token


async def admin_token(users: user_service_pb2_grpc.UserServiceStub) -> str:
    login = await users.Login(user_pb.LoginRequest(email=ADMIN_EMAIL, password=ADMIN_PASSWORD))
    return str(login.access_token)


async def service_token(users: user_service_pb2_grpc.UserServiceStub) -> str:
    """A token of a fresh service account (role "service", granted by the admin)."""
    password = "a-long-password-svc"
    user, _ = await register_and_login(users, password)
    admin = bearer(await admin_token(users))
    await users.UpdateUser(
        user_pb.UpdateUserRequest(
            user=user_pb.User(name=user.name, roles=[user_pb.ROLE_SERVICE]),
            update_mask={"paths": ["roles"]},
        ),
        metadata=admin,
    )
    login = await users.Login(user_pb.LoginRequest(email=user.email, password=password))
    return str(login.access_token)


async def platform_service_token(users: user_service_pb2_grpc.UserServiceStub, service: str) -> str:
    """A token of `service`'s own account, from the key the user server bootstrapped."""
    reply = await users.ExchangeApiKey(
        user_pb.ExchangeApiKeyRequest(api_key=SERVICE_API_KEYS[service])
    )
    return str(reply.access_token)


def bearer(token: str) -> tuple[tuple[str, str]]:
    return (("authorization", f"Bearer {token}"),)
