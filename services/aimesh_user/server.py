"""Wiring of the user service: store, key ring, accounts, the deletion saga and its
peers, servicer, side routes."""

from __future__ import annotations

import asyncio
import json
import logging
import socket
import uuid
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import grpc
from google.protobuf.descriptor import ServiceDescriptor

from aimesh.chat.v1 import chat_service_pb2, chat_service_pb2_grpc
from aimesh.notify.v1 import notify_service_pb2, notify_service_pb2_grpc
from aimesh.recommend.v1 import recommend_service_pb2, recommend_service_pb2_grpc
from aimesh.search.v1 import search_service_pb2, search_service_pb2_grpc
from aimesh.user.v1 import user_service_pb2, user_service_pb2_grpc
from aimesh_runtime import revocation
from aimesh_runtime.client import connect
from aimesh_runtime.config import ConfigError
from aimesh_runtime.errors import NotFound
from aimesh_runtime.ownership import SERVICE_SCOPE, OwnerResolver, service_scope
from aimesh_runtime.resilience import CircuitBreaker
from aimesh_runtime.server import Mount, ServiceContext, ServiceSpec
from aimesh_user.accounts import Accounts, LocalApiKeys
from aimesh_user.registration import RegisterThrottle
from aimesh_user.saga import PEER_ADDRESS_ENV, Deletions, Purge
from aimesh_user.saga_store import DeletionStore
from aimesh_user.servicer import UserServicer
from aimesh_user.settings import UserSettings
from aimesh_user.signing import KeyRing
from aimesh_user.store import UserStore
from aimesh_user.throttle import LoginThrottle, ThrottlePolicy

log = logging.getLogger(__name__)
REVOCATION_MARGIN_S = 1.0
KEY_MAINTENANCE_INTERVAL_S = 60.0
SERVICE_SUBJECT = "service-user"  # the sub of tokens this service mints for itself
SERVICE_ACCOUNT_EMAIL = "services@aimesh.local"
SAGA_SCOPES = ["chat.admin", "recommend.admin", "search.admin", "notify.admin"]
# Each peer's contract: service, stub, PurgeUserData request, the count in its response.
PURGE_CONTRACTS: dict[str, tuple[ServiceDescriptor, Any, Any, str]] = {
    "chat": (
        chat_service_pb2.DESCRIPTOR.services_by_name["ChatService"],
        chat_service_pb2_grpc.ChatServiceStub,
        chat_service_pb2.PurgeUserDataRequest,
        "deleted_conversations",
    ),
    "recommend": (
        recommend_service_pb2.DESCRIPTOR.services_by_name["RecommendService"],
        recommend_service_pb2_grpc.RecommendServiceStub,
        recommend_service_pb2.PurgeUserDataRequest,
        "deleted_interactions",
    ),
    "search": (
        search_service_pb2.DESCRIPTOR.services_by_name["SearchService"],
        search_service_pb2_grpc.SearchServiceStub,
        search_service_pb2.PurgeUserDataRequest,
        "deleted_documents",
    ),
    "notify": (
        notify_service_pb2.DESCRIPTOR.services_by_name["NotifyService"],
        notify_service_pb2_grpc.NotifyServiceStub,
        notify_service_pb2.PurgeUserDataRequest,
        "deleted_subscriptions",
    ),
}


async def mount(context: ServiceContext) -> Mount:
    settings: UserSettings = context.settings
    store = UserStore(context.pool)
    keys = KeyRing(
        store,
        settings.kek_bytes(),
        settings.previous_kek_bytes(),
        issuer=context.config.jwt_issuer,
        audience=context.config.jwt_audience,
        access_ttl_s=settings.access_token_ttl_s,
        rotation_s=settings.signing_key_rotation_s,
        publish_lead_s=settings.key_publish_lead_s,
    )
    await keys.reseal_at_rest()  # before load: a KEK that is not held stops the start here
    await keys.load()
    throttle = LoginThrottle(
        context.pool,
        ThrottlePolicy(
            free_failures=settings.login_free_failures,
            address_free_failures=settings.login_address_free_failures,
            base_delay_s=settings.login_base_delay_s,
            max_delay_s=settings.login_max_delay_s,
        ),
    )
    accounts = Accounts(store, keys, throttle, refresh_ttl_s=settings.refresh_token_ttl_s)
    if settings.bootstrap_admin_email:
        await accounts.ensure_admin(
            settings.bootstrap_admin_email, settings.bootstrap_admin_password
        )

    if settings.bootstrap_service_api_key:
        await accounts.ensure_service_key(SERVICE_ACCOUNT_EMAIL, settings.bootstrap_service_api_key)
    for service, api_key in settings.platform_service_keys().items():
        await accounts.ensure_platform_service(service, api_key)

    def service_metadata(scopes: list[str]) -> Callable[[], Sequence[tuple[str, str]]]:
        # A fresh token per call: cheap (one Ed25519 signature) and never stale.
        return lambda: (("authorization", f"Bearer {keys.mint(SERVICE_SUBJECT, scopes)}"),)

    peers, channels = _peers(context, settings, service_metadata(SAGA_SCOPES))
    revocation_refresh_s = context.config.revocation_max_stale_s / 5
    deletion_store = DeletionStore(
        context.pool, f"{socket.gethostname()}:{uuid.uuid4().hex}", settings.deletion_lease_s
    )
    deletions = Deletions(
        deletion_store,
        peers,
        retry_max_s=settings.deletion_retry_max_s,
        lease_s=settings.deletion_lease_s,
        resume_interval_s=settings.deletion_resume_s,
        # By then the list served below has it and every verifier has refetched
        # that list, or refuses all tokens.
        revocation_wait_s=(
            context.config.revocation_max_stale_s + revocation_refresh_s + REVOCATION_MARGIN_S
        ),
    )
    # A not-before time is kept as long as any token issued before it may live.
    revocation_window_s = context.config.jwt_max_lifetime_s + 60.0  # and the verifiers' leeway

    async def jwks_document() -> dict[str, Any]:
        """This process's verifier's source: the keys, and who was disabled or
        deleted, both read fresh from the database."""
        document = dict(await keys.fetch_jwks())
        document[revocation.DOCUMENT_MEMBER] = await deletion_store.not_before(revocation_window_s)
        return document

    # The HTTP route answers from memory on the side server's thread (it must not
    # wait on the event loop), so the not-before list is reread every
    # revocation_refresh_s; the saga's wait counts that lag in.
    served_not_before = [await deletion_store.not_before(revocation_window_s)]

    async def refresh_not_before() -> None:
        while True:
            await asyncio.sleep(revocation_refresh_s)
            try:
                served_not_before[0] = await deletion_store.not_before(revocation_window_s)
            except Exception:
                log.exception("reading the not-before list failed")

    def jwks_route() -> tuple[str, bytes]:
        document = {"keys": keys.jwks(), revocation.DOCUMENT_MEMBER: served_not_before[0]}
        return "application/json", json.dumps(document, separators=(",", ":")).encode()

    async def close() -> None:
        await deletions.close()
        for channel in channels:
            await channel.close()

    async def maintain_keys() -> None:
        while True:
            await asyncio.sleep(KEY_MAINTENANCE_INTERVAL_S)
            try:
                await keys.rotate_if_due()
            except Exception:
                log.exception("signing key maintenance failed")

    return Mount(
        servicers=[
            (
                user_service_pb2_grpc.add_UserServiceServicer_to_server,
                UserServicer(
                    accounts,
                    keys,
                    deletions,
                    settings.deletion_wait_s,
                    RegisterThrottle(
                        settings.register_per_client_per_hour,
                        settings.register_per_email_per_hour,
                    ),
                ),
            )
        ],
        jwks=jwks_document,
        api_keys=LocalApiKeys(accounts, keys),
        routes={"/.well-known/jwks.json": jwks_route},
        background=[maintain_keys, deletions.resume_forever, refresh_not_before],
        close=close,
        # The relay publishes user.*, which only the user service's own scope may.
        credentials=service_metadata(["notify.write", SERVICE_SCOPE, service_scope("user")]),
        owners={"userDeletions": OwnerResolver(deletions.owner_of, _hidden_deletion)},
    )


def _hidden_deletion(name: str) -> NotFound:
    # Someone else's deletion reads as absent, as Deletions.get answers.
    return NotFound(f"{name} does not exist", metadata={"name": name})


def _peers(
    context: ServiceContext,
    settings: UserSettings,
    metadata: Callable[[], Sequence[tuple[str, str]]],
) -> tuple[dict[str, Purge | None], list[grpc.aio.Channel]]:
    """A PurgeUserData caller per deployed peer, with a deadline and a breaker."""
    addresses = {
        "chat": settings.chat_address,
        "recommend": settings.recommend_address,
        "search": settings.search_address,
        "notify": context.config.notify_address,
    }
    missing = [PEER_ADDRESS_ENV[name] for name, address in addresses.items() if not address]
    if missing and context.config.environment == "prod":
        raise ConfigError(f"{', '.join(missing)} must be set: deleting a user erases it there")
    peers: dict[str, Purge | None] = {}
    channels = []
    for name, address in addresses.items():
        if not address:
            log.warning("%s is not set: user deletions skip %s", PEER_ADDRESS_ENV[name], name)
            peers[name] = None
            continue
        descriptor, stub, request, field = PURGE_CONTRACTS[name]
        channel = connect(
            address,
            descriptor,
            timeouts={"PurgeUserData": settings.deletion_step_timeout_s},
            tracer_provider=context.tracer_provider,
        )
        channels.append(channel)
        breaker = CircuitBreaker(f"user.deletion.{name}")
        peers[name] = _purge(
            stub(channel).PurgeUserData, request, field, breaker, metadata,
            settings.deletion_step_timeout_s,
        )  # fmt: skip
    return peers, channels


def _purge(
    method: Any,
    request_type: Any,
    field: str,
    breaker: CircuitBreaker,
    metadata: Callable[[], Sequence[tuple[str, str]]],
    timeout_s: float,
) -> Purge:
    async def purge(user: str) -> int:
        response = await breaker.call(
            lambda: method(request_type(user=user), timeout=timeout_s, metadata=tuple(metadata()))
        )
        return int(getattr(response, field))

    return purge


SPEC = ServiceSpec(
    name="user",
    services=(user_service_pb2.DESCRIPTOR.services_by_name["UserService"],),
    migrations=Path(__file__).parent / "migrations",
    mount=mount,
    settings=UserSettings,
)
