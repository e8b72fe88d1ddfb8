"""Server assembly: one grpc.aio server hosting one service, or all five.

A service package describes itself with a ServiceSpec (its contract, its
migrations, and a mount function that builds its servicers over its own pool).
AimeshServer opens each service's own database, migrates it, mounts the
servicers behind the pipeline, serves health and reflection, and drains on
SIGTERM: health goes NOT_SERVING first, then in-flight RPCs get a grace period,
then pools close.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import sys
from collections.abc import Awaitable, Callable, Coroutine, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import asyncpg
import grpc
from google.protobuf.descriptor import ServiceDescriptor
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import _async as reflection_aio
from grpc_reflection.v1alpha import reflection, reflection_pb2_grpc
from opentelemetry.trace import NoOpTracerProvider, TracerProvider
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

from aimesh.notify.v1 import notify_service_pb2
from aimesh.user.v1 import user_service_pb2
from aimesh_runtime import db
from aimesh_runtime.apikeys import ExchangedApiKeys
from aimesh_runtime.auth import (
    ApiKeyAuthenticator,
    JwksFetcher,
    TokenVerifier,
    http_jwks_fetcher,
    policies_for,
)
from aimesh_runtime.client import connect
from aimesh_runtime.collector import settle_collector
from aimesh_runtime.config import (
    ConfigError,
    RuntimeConfig,
    database_url,
    load,
    service_api_key,
    service_api_key_env,
)
from aimesh_runtime.faults import fault_interceptors
from aimesh_runtime.httpside import Route, SideServer
from aimesh_runtime.metrics import RpcMetrics
from aimesh_runtime.outbox import Credentials, OutboxRelay
from aimesh_runtime.ownership import OwnerResolver, OwnershipGuard, rules_for
from aimesh_runtime.pipeline import ServerPipeline
from aimesh_runtime.ratelimit import RateLimiter
from aimesh_runtime.revocation import Revocations
from aimesh_runtime.telemetry import configure_logging, tracer_provider

log = logging.getLogger(__name__)

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


@dataclass
class ServiceContext:
    """What a service gets to build its servicers."""

    name: str
    config: RuntimeConfig
    settings: Any  # the service's own settings object, from ServiceSpec.settings
    pool: asyncpg.Pool
    environ: Mapping[str, str]
    tracer_provider: TracerProvider
    metrics_registry: CollectorRegistry


@dataclass
class Mount:
    """What a service contributes to the server it runs in."""

    # (add_XServicer_to_server, servicer) pairs
    servicers: list[tuple[Callable[[Any, grpc.aio.Server], None], Any]]
    # The user service verifies tokens with its own keys and checks API keys itself.
    jwks: JwksFetcher | None = None
    api_keys: ApiKeyAuthenticator | None = None
    routes: dict[str, Route] = field(default_factory=dict)
    background: list[Callable[[], Coroutine[Any, Any, None]]] = field(default_factory=list)
    ready: Callable[[], bool] | None = None
    close: Callable[[], Awaitable[None]] | None = None
    # Metadata for calls made on the service's own behalf (the outbox relay's);
    # the user service mints tokens, others send AIMESH_<SERVICE>_SERVICE_API_KEY.
    credentials: Callable[[], Sequence[tuple[str, str]]] | None = None
    # "Who owns this name" for the ownership rules, by kind of name (see ownership.py).
    owners: dict[str, OwnerResolver] = field(default_factory=dict)


@dataclass(frozen=True)
class ServiceSpec:
    name: str
    services: tuple[ServiceDescriptor, ...]
    migrations: Path
    mount: Callable[[ServiceContext], Awaitable[Mount]]
    # A dataclass of the service's own settings, loaded and checked at start.
    settings: type | None = None

    def load_settings(self, environ: Mapping[str, str]) -> Any:
        return None if self.settings is None else load(self.settings, environ)


class PipelinedServer:
    """The server as the generated `add_*_to_server` functions see it: each
    service's handlers are wrapped in the pipeline once, as they are
    registered, so nothing runs per call that a grpc.aio interceptor would add
    (a coroutine and a handler lookup on every call)."""

    def __init__(self, server: grpc.aio.Server, pipeline: ServerPipeline) -> None:
        self._server = server
        self._pipeline = pipeline

    def add_generic_rpc_handlers(self, handlers: Sequence[grpc.GenericRpcHandler]) -> None:
        for handler in handlers:
            service = getattr(handler, "_name", None)
            by_path = getattr(handler, "_method_handlers", None)
            if not isinstance(service, str) or not isinstance(by_path, dict):
                raise TypeError(f"cannot put the pipeline in front of {handler!r}")
            by_name = {path.rsplit("/", 1)[1]: h for path, h in by_path.items()}
            wrapped = self._pipeline.wrap_handlers(service, by_name)
            self._server.add_generic_rpc_handlers(
                (grpc.method_handlers_generic_handler(service, wrapped),)
            )

    def add_registered_method_handlers(
        self, service: str, handlers: Mapping[str, grpc.RpcMethodHandler]
    ) -> None:
        self._server.add_registered_method_handlers(
            service, self._pipeline.wrap_handlers(service, handlers)
        )


@dataclass
class _Running:
    spec: ServiceSpec
    pool: asyncpg.Pool
    mount: Mount
    probe: db.DatabaseProbe


class AimeshServer:
    def __init__(
        self,
        specs: Sequence[ServiceSpec],
        config: RuntimeConfig,
        environ: Mapping[str, str],
        *,
        label: str | None = None,
    ) -> None:
        self.specs = list(specs)
        self.config = config
        self.environ = environ
        self.label = label or (specs[0].name if len(specs) == 1 else "monolith")
        self.metrics_registry = CollectorRegistry()
        self.tracer_provider = tracer_provider(
            self.label, config.otlp_endpoint, config.trace_sample_ratio
        )
        self.health = health.aio.HealthServicer()
        self.grpc_port = 0
        self.http_port = 0
        self._running: list[_Running] = []
        self._tasks: list[asyncio.Task[None]] = []
        self._channels: list[grpc.aio.Channel] = []
        self._server: grpc.aio.Server | None = None
        self._side: SideServer | None = None
        self._verifier: TokenVerifier | None = None

    async def start(self) -> None:
        config = self.config
        descriptors = [d for spec in self.specs for d in spec.services]
        # A method without an ownership rule: refuse to start, before touching a database.
        ownership_rules = rules_for(descriptors)
        for spec in self.specs:
            url = database_url(spec.name, self.environ)
            pool = await db.create_pool(url)
            try:
                await db.migrate(pool, spec.migrations)
                mount = await spec.mount(self._context(spec, pool))
            except BaseException:  # a refused start (a missing key) leaves nothing open
                await pool.close()
                await self._close_mounted()
                raise
            self._running.append(_Running(spec, pool, mount, db.DatabaseProbe(url)))
        try:
            relay_credentials = self._relay_credentials()
        except BaseException:
            await self._close_mounted()
            raise
        verifier, api_keys = self._auth()
        self._verifier = verifier
        owners = {kind: r for running in self._running for kind, r in running.mount.owners.items()}
        pipeline = ServerPipeline(
            policies=policies_for(descriptors),
            metrics=RpcMetrics(self.metrics_registry),
            tracer=self.tracer_provider.get_tracer("aimesh.server"),
            verifier=verifier,
            api_keys=api_keys,
            limiter=RateLimiter(config.rate_limit_rps, config.rate_limit_burst),
            anonymous_limiter=RateLimiter(
                config.rate_limit_anonymous_rps, config.rate_limit_anonymous_burst
            ),
            trust_forwarded_for=config.trust_forwarded_for,
            trusted_proxy_hops=config.trusted_proxy_hops,
            slow_call_s=config.slow_call_s,
            ownership=OwnershipGuard(ownership_rules, owners),
        )
        grpc_server = grpc.aio.server(
            # Injected faults (AIMESH_FAULT_*) act in front of the pipeline, as a sidecar's do.
            interceptors=fault_interceptors(self.environ),
            options=[
                ("grpc.max_receive_message_length", config.max_message_bytes),
                ("grpc.max_send_message_length", config.max_message_bytes),
                ("grpc.so_reuseport", 0),
            ],
        )
        server = PipelinedServer(grpc_server, pipeline)
        for running in self._running:
            for add, servicer in running.mount.servicers:
                add(servicer, server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, server)
        names = [d.full_name for d in descriptors]
        for name in ["", *names]:
            await self.health.set(name, NOT_SERVING)
        if config.reflection_enabled:
            reflection_pb2_grpc.add_ServerReflectionServicer_to_server(
                reflection_aio.ReflectionServicer(
                    [*names, health.SERVICE_NAME, reflection.SERVICE_NAME]
                ),
                server,
            )
        grpc_port, http_port = config.ports_for(self.label)
        self.grpc_port = grpc_server.add_insecure_port(f"{config.host}:{grpc_port}")
        if self.grpc_port == 0:
            raise OSError(f"cannot listen on {config.host}:{grpc_port}")
        routes: dict[str, Route] = {"/metrics": self._metrics_route}
        for running in self._running:
            routes.update(running.mount.routes)
        self._side = SideServer(
            config.host, http_port, routes, self.tracer_provider.get_tracer("aimesh.http")
        )
        self.http_port = self._side.port
        await grpc_server.start()
        self._server = grpc_server
        self._side.start()
        try:
            await self._probe_once()
        except BaseException:
            self._side.stop()
            raise
        self._tasks.append(asyncio.create_task(self._probe_forever(), name="health-probe"))
        for running in self._running:
            for job in running.mount.background:
                self._tasks.append(asyncio.create_task(job(), name=f"{running.spec.name}-bg"))
        self._start_relays(relay_credentials)
        log.info(
            "serving %s",
            ", ".join(names),
            extra={"grpc_port": self.grpc_port, "http_port": self.http_port},
        )

    async def _close_mounted(self) -> None:
        for started in self._running:
            if started.mount.close is not None:
                await started.mount.close()
            await started.pool.close()
        self._running.clear()

    def _context(self, spec: ServiceSpec, pool: asyncpg.Pool) -> ServiceContext:
        return ServiceContext(
            spec.name,
            self.config,
            spec.load_settings(self.environ),
            pool,
            self.environ,
            self.tracer_provider,
            self.metrics_registry,
        )

    def _auth(self) -> tuple[TokenVerifier | None, ApiKeyAuthenticator | None]:
        config = self.config
        local_jwks = next((r.mount.jwks for r in self._running if r.mount.jwks), None)
        fetch = local_jwks or (
            http_jwks_fetcher(config.jwks_url, tracer_provider=self.tracer_provider)
            if config.jwks_url
            else None
        )
        if fetch is None:
            raise ConfigError("AIMESH_JWKS_URL is required: where to fetch the user service's JWKS")
        verifier = TokenVerifier(
            fetch,
            issuer=config.jwt_issuer,
            audience=config.jwt_audience,
            max_lifetime_s=config.jwt_max_lifetime_s,
            # Local keys come from our own database: a rotation is seen within a second.
            min_refetch_s=1.0 if local_jwks else 10.0,
            # The same document lists who was disabled or deleted; polled far more often.
            revocations=Revocations(
                # Polled in the background: no span per poll (a request's fetch has one).
                local_jwks
                or http_jwks_fetcher(config.jwks_url, tracer_provider=NoOpTracerProvider()),
                poll_s=config.revocation_max_stale_s / 5,
                max_stale_s=config.revocation_max_stale_s,
            ),
        )
        api_keys = next((r.mount.api_keys for r in self._running if r.mount.api_keys), None)
        if api_keys is None and config.user_address:
            channel = connect(
                config.user_address,
                user_service_pb2.DESCRIPTOR.services_by_name["UserService"],
                tracer_provider=self.tracer_provider,
            )
            self._channels.append(channel)
            api_keys = ExchangedApiKeys(channel, verifier)
        return verifier, api_keys

    def _relay_credentials(self) -> dict[str, Credentials]:
        """What each service's outbox relay publishes with, by service: the service's
        own credentials (the user service mints tokens) or its own API key, whose
        account alone may publish the service's topics. Only the retired shared key
        set, or in prod no key at all, is a ConfigError: the relay could publish nothing."""
        config = self.config
        found: dict[str, Credentials] = {}
        if not config.notify_address:
            return found
        for running in self._running:
            name = running.spec.name
            if running.mount.credentials is not None:
                found[name] = running.mount.credentials
                continue
            variable = service_api_key_env(name)
            key = service_api_key(name, self.environ)
            if key:
                found[name] = _fixed_metadata((("x-api-key", key),))
            elif config.service_api_key:
                raise ConfigError(
                    f"AIMESH_SERVICE_API_KEY is retired: a key shared by every service may "
                    f"publish none of the {name} service's topics; set {variable} (README, "
                    "Consistency: outbox)"
                )
            elif config.environment == "prod":
                raise ConfigError(
                    f"{variable} is required with AIMESH_NOTIFY_ADDRESS: the API key of the "
                    f"{name} service's own account, which its outbox relay publishes with"
                )
            else:
                log.error("%s is not set: %s outbox events stay queued unpublished", variable, name)
        return found

    def _start_relays(self, credentials: Mapping[str, Credentials]) -> None:
        """One outbox relay per service that has credentials, when notify's address is set."""
        if not credentials:
            return
        channel = connect(
            self.config.notify_address,
            notify_service_pb2.DESCRIPTOR.services_by_name["NotifyService"],
            tracer_provider=self.tracer_provider,
        )
        self._channels.append(channel)
        for running in self._running:
            name = running.spec.name
            if name not in credentials:
                continue
            relay = OutboxRelay(
                running.pool,
                channel,
                service=name,
                credentials=credentials[name],
                batch_size=self.config.outbox_batch,
                poll_s=self.config.outbox_poll_s,
            )
            self._tasks.append(asyncio.create_task(relay.run(), name=f"{name}-outbox"))

    def _metrics_route(self) -> tuple[str, bytes]:
        return CONTENT_TYPE_LATEST, generate_latest(self.metrics_registry)

    async def _probe_once(self) -> None:
        overall = True
        for running in self._running:
            ok = await running.probe.check(timeout_s=max(self.config.health_probe_s, 0.2))
            if ok and running.mount.ready is not None:
                ok = running.mount.ready()
            overall = overall and ok
            for service in running.spec.services:
                await self.health.set(service.full_name, SERVING if ok else NOT_SERVING)
        await self.health.set("", SERVING if overall else NOT_SERVING)

    async def _probe_forever(self) -> None:
        while True:
            await asyncio.sleep(self.config.health_probe_s)
            try:
                await self._probe_once()
            except Exception:
                log.exception("health probe failed")

    async def stop(self, grace_s: float | None = None) -> None:
        try:
            await self._stop(grace_s)
        finally:  # whatever failed above, no serving thread outlives the server
            if self._side is not None:
                self._side.stop()

    async def _stop(self, grace_s: float | None) -> None:
        grace = self.config.drain_seconds if grace_s is None else grace_s
        await self.health.enter_graceful_shutdown()
        if self._server is not None:
            await self._server.stop(grace)
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        if self._verifier is not None:
            await self._verifier.close()
        for running in self._running:
            if running.mount.close is not None:
                await running.mount.close()
            await running.probe.close()
            await running.pool.close()
        for channel in self._channels:
            await channel.close()
        shutdown = getattr(self.tracer_provider, "shutdown", None)
        if shutdown is not None:  # the SDK provider flushes its exporter
            shutdown()


async def serve_until_signalled(server: AimeshServer) -> None:
    """Start, then drain gracefully on SIGTERM or SIGINT."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    await server.start()
    settle_collector()
    await stop.wait()
    lame_duck = server.config.lame_duck_seconds
    if lame_duck > 0:
        # A call sent just before the signal may not have arrived yet: keep
        # answering while health tells callers to go elsewhere.
        await server.health.enter_graceful_shutdown()
        log.info("NOT_SERVING; still answering for %.1f s", lame_duck)
        await asyncio.sleep(lame_duck)
    log.info("draining for up to %.1f s", server.config.drain_seconds)
    await server.stop()


def _fixed_metadata(metadata: Sequence[tuple[str, str]]) -> Credentials:
    return lambda: metadata


def main(specs: Sequence[ServiceSpec], environ: Mapping[str, str] | None = None) -> None:
    """Entry point of a server process; a bad setting exits 2 with its variable."""
    import os

    environ = os.environ if environ is None else environ
    try:
        config = load(RuntimeConfig, environ)
        for spec in specs:  # fail before any connection is made
            database_url(spec.name, environ)
            spec.load_settings(environ)
        if not config.jwks_url and all(spec.name != "user" for spec in specs):
            raise ConfigError("AIMESH_JWKS_URL is required: where to fetch the user service's JWKS")
        configure_logging(specs[0].name if len(specs) == 1 else "monolith", config.log_level)
        asyncio.run(serve_until_signalled(AimeshServer(specs, config, environ)))
    except ConfigError as error:
        print(f"aimesh: configuration error: {error}", file=sys.stderr)
        sys.exit(2)
