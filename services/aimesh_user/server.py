"""Wiring of the user service: store, key ring, accounts, servicer, side routes."""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

from aimesh.user.v1 import user_service_pb2, user_service_pb2_grpc
from aimesh_runtime.server import Mount, ServiceContext, ServiceSpec
from aimesh_user.accounts import Accounts, LocalApiKeys
from aimesh_user.servicer import UserServicer
from aimesh_user.settings import UserSettings
from aimesh_user.signing import KeyRing
from aimesh_user.store import UserStore

log = logging.getLogger(__name__)
KEY_MAINTENANCE_INTERVAL_S = 60.0


async def mount(context: ServiceContext) -> Mount:
    settings: UserSettings = context.settings
    store = UserStore(context.pool)
    keys = KeyRing(
        store,
        settings.kek_bytes(),
        issuer=context.config.jwt_issuer,
        audience=context.config.jwt_audience,
        access_ttl_s=settings.access_token_ttl_s,
        rotation_s=settings.signing_key_rotation_s,
        publish_lead_s=settings.key_publish_lead_s,
    )
    await keys.load()
    accounts = Accounts(store, keys, refresh_ttl_s=settings.refresh_token_ttl_s)
    if settings.bootstrap_admin_email:
        await accounts.ensure_admin(
            settings.bootstrap_admin_email, settings.bootstrap_admin_password
        )

    async def maintain_keys() -> None:
        while True:
            await asyncio.sleep(KEY_MAINTENANCE_INTERVAL_S)
            try:
                await keys.rotate_if_due()
            except Exception:
                log.exception("signing key maintenance failed")

    return Mount(
        servicers=[
            (user_service_pb2_grpc.add_UserServiceServicer_to_server, UserServicer(accounts, keys))
        ],
        jwks=keys.fetch_jwks,
        api_keys=LocalApiKeys(accounts, keys),
        routes={"/.well-known/jwks.json": lambda: ("application/json", keys.jwks_json())},
        background=[maintain_keys],
    )


SPEC = ServiceSpec(
    name="user",
    services=(user_service_pb2.DESCRIPTOR.services_by_name["UserService"],),
    migrations=Path(__file__).parent / "migrations",
    mount=mount,
    settings=UserSettings,
)
