"""Accounts, credentials and who may touch which user: the user service's domain."""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import hashlib
import hmac
import re
import secrets
import uuid
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError

from aimesh_runtime.auth import Principal
from aimesh_runtime.config import ConfigError
from aimesh_runtime.errors import (
    AlreadyExists,
    FieldViolation,
    InvalidArgument,
    NotFound,
    PermissionDenied,
    Unauthenticated,
)
from aimesh_runtime.ownership import SERVICE_SCOPE, service_scope
from aimesh_runtime.pages import cut_page, decode_keyset, encode_keyset, page_size
from aimesh_user.signing import KeyRing
from aimesh_user.store import ApiKeyRow, EmailTaken, KeyTaken, UserRow, UserStore
from aimesh_user.throttle import LoginThrottle

MEMBER_SCOPES = (
    "user.read",
    "user.write",
    "search.read",
    "search.write",
    "recommend.read",
    "recommend.write",
    "chat.use",
    "notify.read",
    "notify.write",
)
ADMIN_SCOPES = (
    *MEMBER_SCOPES,
    "user.admin",
    "search.admin",
    "recommend.admin",
    "chat.admin",
    "notify.admin",
)
SERVICE_SCOPES = (
    # Marks a backend acting for the platform (ownership rules, issue 20).
    SERVICE_SCOPE,
    "search.read",
    "search.write",
    "recommend.read",
    "recommend.write",
    "chat.use",
    "notify.read",
    "notify.write",
)
# The services that publish through their own account; the user service mints
# its own tokens instead (aimesh_user.server).
PLATFORM_SERVICES = ("search", "recommend", "chat", "notify")
ROLE_SCOPES: dict[str, tuple[str, ...]] = {
    "member": MEMBER_SCOPES,
    "admin": ADMIN_SCOPES,
    "service": SERVICE_SCOPES,
    # One role per platform service, held only by the account the user service
    # bootstraps for it: the contract's Role enum cannot name these, so no
    # UpdateUser can grant one, and no admin can become, say, the search service.
    **{f"service:{name}": (service_scope(name),) for name in PLATFORM_SERVICES},
}
API_KEY_PREFIX = "amk"
REFRESH_PREFIX = "art"
USER_ID = re.compile(r"^[A-Za-z0-9_-]{1,64}$")


# Not an argon2 hash: verifying any password against it fails, so the account never logs in.
NO_PASSWORD = "!no-password"


def platform_service_id(service: str) -> str:
    """The user id of a platform service's own account ("service-search")."""
    return f"service-{service}"


def split_api_key(api_key: str) -> tuple[str, str]:
    """(prefix, secret) of a well-formed key, amk_<prefix>_<secret>; ValueError otherwise."""
    marker, _, rest = api_key.partition("_")
    prefix, _, secret = rest.partition("_")
    if marker != API_KEY_PREFIX or not prefix or not secret:
        raise ValueError("an API key looks like amk_<8 hex>_<secret>")
    return prefix, secret


def require_interactive(caller: Principal, action: str) -> None:
    """Credentials and the account itself are managed by a person, not by a key:
    a leaked key must not mint more keys or delete its owner."""
    if caller.method == "api_key":
        raise PermissionDenied(f"an API key cannot {action}", reason="API_KEY_NOT_ALLOWED")


def scopes_of(roles: Iterable[str]) -> list[str]:
    return sorted({scope for role in roles for scope in ROLE_SCOPES.get(role, ())})


def password_hasher() -> PasswordHasher:
    # OWASP Password Storage Cheat Sheet: argon2id, 19 MiB, 2 iterations, 1 lane.
    return PasswordHasher(time_cost=2, memory_cost=19 * 1024, parallelism=1)


def _digest(secret: str) -> bytes:
    return hashlib.sha256(secret.encode()).digest()


@dataclass(frozen=True)
class Tokens:
    access_token: str
    access_ttl_s: int
    refresh_token: str
    refresh_ttl_s: int


class Accounts:
    def __init__(
        self, store: UserStore, keys: KeyRing, throttle: LoginThrottle, *, refresh_ttl_s: int
    ) -> None:
        self._store = store
        self._throttle = throttle
        self._keys = keys
        self._refresh_ttl_s = refresh_ttl_s
        self._hasher = password_hasher()
        # Verified on unknown emails, so a miss costs as much as a wrong password.
        self._decoy_hash = self._hasher.hash(secrets.token_urlsafe(16))

    # who may act on whom

    @staticmethod
    def resolve(caller: Principal, name: str) -> str:
        """The user id in 'users/{id}' ('me' is the caller); checks the caller may act."""
        user_id = name.removeprefix("users/")
        if not USER_ID.match(user_id):
            raise InvalidArgument.field("name", "must be users/{user} or users/me")
        if user_id == "me":
            user_id = caller.subject
        if user_id != caller.subject and "user.admin" not in caller.scopes:
            raise PermissionDenied("only admins may act on other users", reason="NOT_OWNER")
        return user_id

    async def _existing(self, user_id: str) -> UserRow:
        user = await self._store.user_by_id(user_id)
        if user is None:
            raise NotFound(f"users/{user_id} does not exist", metadata={"name": f"users/{user_id}"})
        return user

    # accounts

    async def register(
        self, email: str, password: str, display_name: str, roles: Sequence[str] = ("member",)
    ) -> UserRow:
        password_hash = await asyncio.to_thread(self._hasher.hash, password)
        try:
            return await self._store.insert_user(
                uuid.uuid4().hex, email, display_name, password_hash, roles
            )
        except EmailTaken:
            raise AlreadyExists("email already registered", reason="EMAIL_TAKEN") from None

    async def ensure_admin(self, email: str, password: str) -> None:
        if await self._store.user_by_email(email) is None:
            # Another replica may create it first.
            with contextlib.suppress(AlreadyExists):
                await self.register(email, password, "admin", roles=("admin",))

    async def ensure_platform_service(self, service: str, api_key: str) -> None:
        """The account of one platform service (id "service-<service>", roles service and
        service:<service>) holding `api_key`, both created if missing. The id and email
        are no registration's (those are hex ids and valid emails), so no member can
        claim the account first; it has no password and never logs in."""
        prefix, secret = split_api_key(api_key)
        user_id = platform_service_id(service)
        roles = ["service", f"service:{service}"]
        user = await self._store.user_by_id(user_id)
        if user is None:
            with contextlib.suppress(EmailTaken):  # another replica made it first
                await self._store.insert_user(
                    user_id, user_id, f"the {service} service", NO_PASSWORD, roles
                )
            user = await self._store.user_by_id(user_id)
            if user is None:
                raise RuntimeError(f"service account {user_id} vanished")
        elif not set(roles) <= set(user.roles):
            # An admin's UpdateUser replaced its roles: configuration puts them back.
            await self._store.update_user(
                user_id, user_id, {"roles": sorted({*user.roles, *roles})}
            )
        holder = await self._store.api_key_holder(prefix)
        if holder == user_id:
            return
        if holder is not None:
            raise ConfigError(f"the {service} service's API key prefix {prefix} is another key's")
        row = ApiKeyRow(
            id=uuid.uuid4().hex,
            user_id=user_id,
            display_name=f"{service} service",
            prefix=prefix,
            secret_hash=_digest(secret),
            scopes=tuple(scopes_of(roles)),
            expire_time=None,
            create_time=dt.datetime.now(dt.UTC),
            revoke_time=None,
            last_use_time=None,
        )
        with contextlib.suppress(KeyTaken):  # another replica made it first
            await self._store.insert_api_key(user_id, row)

    async def ensure_service_key(self, email: str, api_key: str) -> None:
        """A generic service account holding `api_key`, created if missing: a backend's
        (mesh.service), which names no platform service and so publishes none of the
        platform's topics (AIMESH_USER_BOOTSTRAP_SERVICE_API_KEY, kept for such uses)."""
        prefix, secret = split_api_key(api_key)
        if await self._store.api_key_exists(prefix):
            return
        with contextlib.suppress(AlreadyExists):
            await self.register(email, secrets.token_urlsafe(24), "services", roles=("service",))
        user = await self._store.user_by_email(email)
        if user is None:
            raise RuntimeError(f"service account {email} vanished")
        row = ApiKeyRow(
            id=uuid.uuid4().hex,
            user_id=user.id,
            display_name="services",
            prefix=prefix,
            secret_hash=_digest(secret),
            scopes=tuple(SERVICE_SCOPES),
            expire_time=None,
            create_time=dt.datetime.now(dt.UTC),
            revoke_time=None,
            last_use_time=None,
        )
        with contextlib.suppress(KeyTaken):  # another replica made it first
            await self._store.insert_api_key(user.id, row)

    async def login(self, email: str, password: str, address: str) -> tuple[UserRow, Tokens]:
        # Checked before the password, for known and unknown emails alike.
        await self._throttle.check(email, address)
        user = await self._store.user_by_email(email)
        stored = user.password_hash if user is not None else self._decoy_hash
        try:
            await asyncio.to_thread(self._hasher.verify, stored, password)
        except (VerificationError, InvalidHashError):
            user = None
        if user is None:
            await self._throttle.failed(email, address)
            raise Unauthenticated("wrong email or password", reason="BAD_CREDENTIALS")
        _refuse_disabled(user)
        await self._throttle.succeeded(email, address)
        if self._hasher.check_needs_rehash(user.password_hash):
            new_hash = await asyncio.to_thread(self._hasher.hash, password)
            await self._store.update_user(user.id, user.id, {"password_hash": new_hash})
        return user, await self._issue(user)

    async def _issue(self, user: UserRow) -> Tokens:
        token_id = uuid.uuid4().hex
        secret = secrets.token_urlsafe(32)
        expires = dt.datetime.now(dt.UTC) + dt.timedelta(seconds=self._refresh_ttl_s)
        await self._store.insert_refresh(token_id, user.id, _digest(secret), expires)
        return Tokens(
            access_token=self._keys.mint(user.id, scopes_of(user.roles)),
            access_ttl_s=self._keys.access_ttl_s,
            refresh_token=f"{REFRESH_PREFIX}_{token_id}_{secret}",
            refresh_ttl_s=self._refresh_ttl_s,
        )

    async def refresh(self, refresh_token: str) -> Tokens:
        rejected = Unauthenticated("refresh token rejected", reason="REFRESH_TOKEN_INVALID")
        prefix, _, rest = refresh_token.partition("_")
        token_id, _, secret = rest.partition("_")
        if prefix != REFRESH_PREFIX or not token_id or not secret:
            raise rejected
        row, reused = await self._store.consume_refresh(token_id, _digest(secret))
        if row is None:
            raise rejected
        if reused:
            raise Unauthenticated(
                "refresh token reused; every session of this user was revoked",
                reason="REFRESH_TOKEN_REUSED",
            )
        if row.revoke_time is not None or row.expire_time <= dt.datetime.now(dt.UTC):
            raise rejected
        user = await self._store.user_by_id(row.user_id)
        if user is None:
            raise rejected
        _refuse_disabled(user)
        return await self._issue(user)

    async def get(self, caller: Principal, name: str) -> UserRow:
        return await self._existing(self.resolve(caller, name))

    async def list_users(self, size: int, token: str) -> tuple[list[UserRow], str]:
        limit = page_size(size)
        rows = await self._store.list_users(decode_keyset(token), limit + 1)
        return cut_page(rows, limit, lambda row: encode_keyset(row.create_time, row.id))

    async def update(
        self,
        caller: Principal,
        name: str,
        paths: Sequence[str],
        email: str,
        display_name: str,
        roles: Sequence[str],
    ) -> UserRow:
        user_id = self.resolve(caller, name)
        allowed = {"email", "display_name", "roles"}
        unknown = [path for path in paths if path not in allowed]
        if unknown or not paths:
            raise InvalidArgument.field(
                "update_mask", f"paths must be some of {sorted(allowed)}; got {list(paths)}"
            )
        changes: dict[str, object] = {}
        if "email" in paths:
            if not email:
                raise InvalidArgument.field("user.email", "must not be empty")
            changes["email"] = email
        if "display_name" in paths:
            changes["display_name"] = display_name
        if "roles" in paths:
            if "user.admin" not in caller.scopes:
                raise PermissionDenied("only admins may change roles", reason="NOT_ADMIN")
            if not roles:
                raise InvalidArgument.field("user.roles", "a user needs at least one role")
            changes["roles"] = list(roles)
        try:
            updated = await self._store.update_user(caller.subject, user_id, changes)
        except EmailTaken:
            raise AlreadyExists("email already registered", reason="EMAIL_TAKEN") from None
        if updated is None:
            raise NotFound(f"users/{user_id} does not exist", metadata={"name": f"users/{user_id}"})
        return updated

    def authorize_delete(self, caller: Principal, name: str) -> str:
        """The user id `caller` may delete (the saga in aimesh_user.saga does it)."""
        require_interactive(caller, "delete an account")
        return self.resolve(caller, name)

    # API keys

    async def create_api_key(
        self,
        caller: Principal,
        parent: str,
        display_name: str,
        scopes: Sequence[str],
        expire_time: dt.datetime | None,
    ) -> tuple[ApiKeyRow, str]:
        require_interactive(caller, "create API keys")
        user = await self._existing(self.resolve(caller, parent))
        # A key never carries more than its owner holds, nor more than the caller holds.
        grantable = set(scopes_of(user.roles)) & set(caller.scopes)
        requested = list(scopes) or sorted(grantable)
        beyond = sorted(set(requested) - grantable)
        if beyond:
            raise InvalidArgument(
                f"scopes not held: {', '.join(beyond)}",
                [
                    FieldViolation("api_key.scopes", f"not held by the owner or caller: {s}")
                    for s in beyond
                ],
                reason="SCOPE_NOT_HELD",
            )
        if expire_time is not None and expire_time <= dt.datetime.now(dt.UTC):
            raise InvalidArgument.field("api_key.expire_time", "must be in the future")
        prefix = secrets.token_hex(4)
        secret = secrets.token_urlsafe(32)
        row = ApiKeyRow(
            id=uuid.uuid4().hex,
            user_id=user.id,
            display_name=display_name,
            prefix=prefix,
            secret_hash=_digest(secret),
            scopes=tuple(requested),
            expire_time=expire_time,
            create_time=dt.datetime.now(dt.UTC),
            revoke_time=None,
            last_use_time=None,
        )
        stored = await self._store.insert_api_key(caller.subject, row)
        return stored, f"{API_KEY_PREFIX}_{prefix}_{secret}"

    async def list_api_keys(
        self, caller: Principal, parent: str, size: int, token: str
    ) -> tuple[list[ApiKeyRow], str]:
        user = await self._existing(self.resolve(caller, parent))
        limit = page_size(size)
        rows = await self._store.api_keys_of(user.id, decode_keyset(token), limit + 1)
        return cut_page(rows, limit, lambda row: encode_keyset(row.create_time, row.id))

    async def revoke_api_key(self, caller: Principal, name: str) -> ApiKeyRow:
        require_interactive(caller, "revoke API keys")
        owner, _, key_id = name.partition("/apiKeys/")
        user_id = self.resolve(caller, owner)
        row = await self._store.revoke_api_key(caller.subject, user_id, key_id)
        if row is None:
            raise NotFound(f"{name} does not exist", metadata={"name": name})
        return row

    async def authenticate_api_key(self, api_key: str) -> tuple[UserRow, list[str]]:
        """The owner of a live key and the scopes the key grants now."""
        rejected = Unauthenticated("API key rejected", reason="API_KEY_INVALID")
        marker, _, rest = api_key.partition("_")
        prefix, _, secret = rest.partition("_")
        if marker != API_KEY_PREFIX or not prefix or not secret:
            raise rejected
        row = await self._store.use_api_key(prefix)
        if row is None or not hmac.compare_digest(row.secret_hash, _digest(secret)):
            raise rejected
        user = await self._store.user_by_id(row.user_id)
        if user is None or user.disable_time is not None:
            raise rejected
        # Roles may have shrunk since the key was made: grant only what is still held.
        return user, sorted(set(row.scopes) & set(scopes_of(user.roles)))

    async def exchange_api_key(self, api_key: str) -> str:
        user, scopes = await self.authenticate_api_key(api_key)
        return self._keys.mint(user.id, scopes, {"amr": ["api_key"]})


def _refuse_disabled(user: UserRow) -> None:
    if user.disable_time is not None:
        raise Unauthenticated("this account is being deleted", reason="ACCOUNT_DISABLED")


class LocalApiKeys:
    """API keys checked against this service's own table (runtime's ApiKeyAuthenticator)."""

    def __init__(self, accounts: Accounts, keys: KeyRing) -> None:
        self._accounts = accounts
        self._keys = keys

    async def authenticate(self, api_key: str) -> Principal:
        user, scopes = await self._accounts.authenticate_api_key(api_key)
        return Principal(
            subject=user.id,
            scopes=frozenset(scopes),
            method="api_key",
            token=self._keys.mint(user.id, scopes, {"amr": ["api_key"]}),
        )
