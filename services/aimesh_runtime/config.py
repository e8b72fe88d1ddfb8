"""Typed configuration read once from the environment.

Every setting is a dataclass field whose metadata names its variable and says
what it is for. A bad value raises ConfigError naming the variable; the entry
points turn that into a message and exit status 2.
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import os
import types
import typing
import urllib.parse
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, TypeVar

SERVICE_PORTS = {"user": 50051, "search": 50052, "recommend": 50053, "chat": 50054, "notify": 50055}
HTTP_PORT_OFFSET = 1000  # side port for /metrics and /.well-known: 51051 and so on


class ConfigError(ValueError):
    """A setting is missing or malformed; the message names the variable."""


def setting(env: str, doc: str, default: Any = dataclasses.MISSING) -> Any:
    """A field read from the environment variable `env`."""
    if default is dataclasses.MISSING:
        return field(metadata={"env": env, "doc": doc})
    return field(default=default, metadata={"env": env, "doc": doc})


def _parse_bool(raw: str) -> bool:
    lowered = raw.strip().lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise ValueError("expected true or false")


def _parse_port(raw: str) -> int:
    port = int(raw)
    if not 0 <= port <= 65535:
        raise ValueError("expected a port between 0 and 65535")
    return port


_PARSERS: dict[Any, Callable[[str], Any]] = {
    str: str,
    int: int,
    float: float,
    bool: _parse_bool,
}

T = TypeVar("T")


def load(cls: type[T], environ: Mapping[str, str] | None = None, **overrides: Any) -> T:
    """Build `cls` from the environment; `overrides` win over variables."""
    environ = os.environ if environ is None else environ
    hints = typing.get_type_hints(cls)
    values: dict[str, Any] = {}
    for item in dataclasses.fields(cls):  # type: ignore[arg-type]
        if item.name in overrides:
            values[item.name] = overrides[item.name]
            continue
        env = item.metadata.get("env")
        raw = None if env is None else _value(environ, env)
        if raw is None:
            if item.default is dataclasses.MISSING and item.default_factory is dataclasses.MISSING:
                raise ConfigError(f"{env} is required: {item.metadata.get('doc', '')}")
            continue
        kind = hints[item.name]
        optional = typing.get_origin(kind) in (typing.Union, types.UnionType)
        if optional:
            kind = next(arg for arg in typing.get_args(kind) if arg is not type(None))
        if optional and raw == "":
            values[item.name] = None
            continue
        parser = _PORT_FIELDS.get(item.name) or _PARSERS[kind]
        try:
            values[item.name] = parser(raw)
        except ValueError as error:
            raise ConfigError(f"{env}={raw!r} is invalid: {error}") from None
    instance = cls(**values)
    check = getattr(instance, "check", None)
    if check is not None:
        check()
    return instance


def _value(environ: Mapping[str, str], env: str) -> str | None:
    """`env`, or else the content of the file `env`_FILE names (secrets mounted as
    files stay out of the environment); a file that is not there counts as unset,
    as the kubelet leaves out an optional secret's missing key."""
    if env in environ:
        return environ[env]
    path = environ.get(f"{env}_FILE")
    if not path:
        return None
    try:
        with open(path, encoding="utf-8") as file:
            return file.read().rstrip("\n")
    except FileNotFoundError:
        return None


_PORT_FIELDS: dict[str, Callable[[str], Any]] = {"grpc_port": _parse_port, "http_port": _parse_port}


@dataclass(frozen=True)
class RuntimeConfig:
    """Settings every aimesh server shares. Service-specific ones extend it."""

    service: str = setting("AIMESH_SERVICE", "Which service this process serves.", "")
    grpc_port: int = setting("AIMESH_GRPC_PORT", "gRPC listen port; 0 picks a free one.", -1)
    http_port: int = setting(
        "AIMESH_HTTP_PORT", "HTTP side port for /metrics and /.well-known; 0 picks one.", -1
    )
    host: str = setting("AIMESH_HOST", "Address to listen on.", "127.0.0.1")
    environment: str = setting(
        "AIMESH_ENV", "dev or prod; prod turns reflection off unless asked for.", "dev"
    )
    reflection: bool | None = setting(
        "AIMESH_REFLECTION", "Serve gRPC reflection; default on in dev, off in prod.", None
    )
    max_message_bytes: int = setting(
        "AIMESH_MAX_MESSAGE_BYTES", "Largest request or response message.", 4 * 1024 * 1024
    )
    lame_duck_seconds: float = setting(
        "AIMESH_LAME_DUCK_SECONDS",
        "After SIGTERM, health says NOT_SERVING but new RPCs are still answered this"
        " long, so callers and load balancers move away before the port closes.",
        1.0,
    )
    drain_seconds: float = setting(
        "AIMESH_DRAIN_SECONDS", "Grace for in-flight RPCs on SIGTERM.", 10.0
    )
    jwt_issuer: str = setting("AIMESH_JWT_ISSUER", "The iss of access tokens.", "aimesh-user")
    jwt_audience: str = setting("AIMESH_JWT_AUDIENCE", "The aud of access tokens.", "aimesh")
    jwt_max_lifetime_s: int = setting(
        "AIMESH_JWT_MAX_LIFETIME_S", "Reject tokens whose exp - iat exceeds this.", 3600
    )
    jwks_url: str = setting(
        "AIMESH_JWKS_URL",
        "Where to fetch the user service's JWKS; empty in the user service itself.",
        "",
    )
    revocation_max_stale_s: float = setting(
        "AIMESH_REVOCATION_MAX_STALE_S",
        "Refuse tokens (UNAVAILABLE) when the users' not-before list is older than this; "
        "the user deletion saga waits this long for revocation. The same value everywhere. "
        "30 s rides out a user-service restart without refusing every token.",
        30.0,
    )
    user_address: str = setting(
        "AIMESH_USER_ADDRESS", "host:port of the user service, to exchange API keys.", ""
    )
    notify_address: str = setting(
        "AIMESH_NOTIFY_ADDRESS",
        "host:port of the notify service; when set, each service relays its outbox there.",
        "",
    )
    service_api_key: str = setting(
        "AIMESH_SERVICE_API_KEY",
        "Retired: the one key every service once shared. A key that names no service may "
        "publish none of the platform's topics, so a relay that has only this refuses to "
        "start; each service sends its own AIMESH_<SERVICE>_SERVICE_API_KEY instead.",
        "",
    )
    outbox_poll_s: float = setting(
        "AIMESH_OUTBOX_POLL_S",
        "How often the outbox relay looks for rows it was not woken for.",
        2.0,
    )
    outbox_batch: int = setting(
        "AIMESH_OUTBOX_BATCH", "Outbox rows the relay claims and publishes per transaction.", 100
    )
    rate_limit_rps: float = setting(
        "AIMESH_RATE_LIMIT_RPS", "Sustained requests per second per principal.", 200.0
    )
    rate_limit_burst: int = setting(
        "AIMESH_RATE_LIMIT_BURST", "Requests a principal may send at once.", 400
    )
    rate_limit_anonymous_rps: float = setting(
        "AIMESH_RATE_LIMIT_ANONYMOUS_RPS",
        "Requests per second per client address without credentials (login, register).",
        10.0,
    )
    rate_limit_anonymous_burst: int = setting(
        "AIMESH_RATE_LIMIT_ANONYMOUS_BURST", "Such requests a client address may send at once.", 30
    )
    trust_forwarded_for: bool = setting(
        "AIMESH_TRUST_FORWARDED_FOR",
        "Take the client address from X-Forwarded-For (only behind a trusted gateway).",
        False,
    )
    trusted_proxy_hops: int = setting(
        "AIMESH_TRUSTED_PROXY_HOPS",
        "Proxies in front of the service that append to X-Forwarded-For (the edge: 1); the "
        "client address is the entry this many from the right.",
        1,
    )
    otlp_endpoint: str = setting(
        "AIMESH_OTLP_ENDPOINT", "OTLP gRPC endpoint for traces; empty exports none.", ""
    )
    trace_sample_ratio: float = setting(
        "AIMESH_TRACE_SAMPLE_RATIO", "Share of root traces sampled, 0 to 1.", 1.0
    )
    log_level: str = setting("AIMESH_LOG_LEVEL", "DEBUG, INFO, WARNING or ERROR.", "INFO")
    slow_call_s: float = setting(
        "AIMESH_SLOW_CALL_S", "Successful calls slower than this are logged.", 1.0
    )
    health_probe_s: float = setting(
        "AIMESH_HEALTH_PROBE_S", "How often the database is probed for health.", 0.5
    )

    def check(self) -> None:
        if self.environment not in ("dev", "prod"):
            raise ConfigError(f"AIMESH_ENV={self.environment!r} is invalid: expected dev or prod")
        if not 0.0 <= self.trace_sample_ratio <= 1.0:
            raise ConfigError("AIMESH_TRACE_SAMPLE_RATIO must be between 0 and 1")
        if self.log_level.upper() not in ("DEBUG", "INFO", "WARNING", "ERROR"):
            raise ConfigError(f"AIMESH_LOG_LEVEL={self.log_level!r} is invalid")
        if self.trusted_proxy_hops < 1:
            raise ConfigError("AIMESH_TRUSTED_PROXY_HOPS must be at least 1")
        if self.rate_limit_rps <= 0 or self.rate_limit_burst < 1:
            raise ConfigError("AIMESH_RATE_LIMIT_RPS and AIMESH_RATE_LIMIT_BURST must be positive")
        if self.rate_limit_anonymous_rps <= 0 or self.rate_limit_anonymous_burst < 1:
            raise ConfigError(
                "AIMESH_RATE_LIMIT_ANONYMOUS_RPS and _ANONYMOUS_BURST must be positive"
            )
        if not 0.5 <= self.revocation_max_stale_s <= 300:
            raise ConfigError("AIMESH_REVOCATION_MAX_STALE_S must be between 0.5 and 300")
        if self.max_message_bytes < 1024:
            raise ConfigError("AIMESH_MAX_MESSAGE_BYTES must be at least 1024")
        if self.health_probe_s < 0.1:
            raise ConfigError("AIMESH_HEALTH_PROBE_S must be at least 0.1")
        if self.lame_duck_seconds < 0:
            raise ConfigError("AIMESH_LAME_DUCK_SECONDS must not be negative")
        if self.drain_seconds < 0:
            raise ConfigError("AIMESH_DRAIN_SECONDS must not be negative")
        if self.outbox_poll_s <= 0 or not 1 <= self.outbox_batch <= 10_000:
            raise ConfigError(
                "AIMESH_OUTBOX_POLL_S must be positive and AIMESH_OUTBOX_BATCH in 1..10000"
            )
        if not 60 <= self.jwt_max_lifetime_s <= 86_400:
            raise ConfigError("AIMESH_JWT_MAX_LIFETIME_S must be between 60 and 86400")

    @property
    def reflection_enabled(self) -> bool:
        return self.environment == "dev" if self.reflection is None else self.reflection

    def ports_for(self, service: str) -> tuple[int, int]:
        """The gRPC and HTTP ports, with the service's defaults where unset."""
        default = SERVICE_PORTS.get(service, 50050)
        grpc_port = default if self.grpc_port < 0 else self.grpc_port
        http_port = default + HTTP_PORT_OFFSET if self.http_port < 0 else self.http_port
        return grpc_port, http_port


def key_bytes(value: str, variable: str) -> bytes:
    """A 32-byte key given as base64url (padding optional), or a ConfigError naming it."""
    try:
        key = base64.urlsafe_b64decode(value + "=" * (-len(value) % 4))
    except (binascii.Error, ValueError):
        raise ConfigError(f"{variable} is not base64url") from None
    if len(key) != 32:
        raise ConfigError(f"{variable} must decode to 32 bytes")
    return key


def database_env(service: str) -> str:
    """The variable holding a service's own database URL."""
    return f"AIMESH_{service.upper()}_DATABASE_URL"


def database_url(service: str, environ: Mapping[str, str] | None = None) -> str:
    """A service's own database URL; required, since each owns its database."""
    environ = os.environ if environ is None else environ
    name = database_env(service)
    url = environ.get(name, "")
    if not url:
        raise ConfigError(f"{name} is required: the PostgreSQL URL of the {service} database")
    if not url.startswith(("postgresql://", "postgres://")):
        raise ConfigError(f"{name} is invalid: expected a postgresql:// URL")
    # The password may come apart from the URL, as a mounted secret file
    # (AIMESH_<SERVICE>_DATABASE_PASSWORD_FILE); it replaces the URL's own.
    password = _value(environ, name.removesuffix("_URL") + "_PASSWORD")
    if password is not None:
        parts = urllib.parse.urlsplit(url)
        user_info, _, host = parts.netloc.rpartition("@")
        user = user_info.partition(":")[0]
        netloc = f"{user}:{urllib.parse.quote(password, safe='')}@{host}"
        url = urllib.parse.urlunsplit(parts._replace(netloc=netloc))
    return url


def service_api_key_env(service: str) -> str:
    """The variable holding a service's own API key (its account, "mesh.service.<service>")."""
    return f"AIMESH_{service.upper()}_SERVICE_API_KEY"


def service_api_key(service: str, environ: Mapping[str, str] | None = None) -> str:
    """A service's own API key, for calls on its own behalf (the outbox relay's Publish),
    from the variable or its _FILE; "" when unset. Per service, not in RuntimeConfig,
    because one process may serve several (the monolith), each with its own key."""
    environ = os.environ if environ is None else environ
    return _value(environ, service_api_key_env(service)) or ""
