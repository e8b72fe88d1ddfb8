"""SQL of the user service, over its own database only."""

from __future__ import annotations

import datetime as dt
import hmac
import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import asyncpg

from aimesh_runtime import outbox
from aimesh_runtime.db import KeysetPage


@dataclass(frozen=True)
class UserRow:
    id: str
    email: str
    display_name: str
    password_hash: str
    roles: tuple[str, ...]
    create_time: dt.datetime
    update_time: dt.datetime
    disable_time: dt.datetime | None = None  # set while the user is being deleted


@dataclass(frozen=True)
class ApiKeyRow:
    id: str
    user_id: str
    display_name: str
    prefix: str
    secret_hash: bytes
    scopes: tuple[str, ...]
    expire_time: dt.datetime | None
    create_time: dt.datetime
    revoke_time: dt.datetime | None
    last_use_time: dt.datetime | None


@dataclass(frozen=True)
class RefreshRow:
    id: str
    user_id: str
    secret_hash: bytes
    expire_time: dt.datetime
    used_time: dt.datetime | None
    revoke_time: dt.datetime | None


@dataclass(frozen=True)
class SigningKeyRow:
    kid: str
    private_key_sealed: bytes
    public_key: bytes
    create_time: dt.datetime
    retire_time: dt.datetime | None
    activate_time: dt.datetime
    # The key-encryption key that sealed it; None if sealed before key ids.
    kek_id: str | None = None


def _user(row: asyncpg.Record) -> UserRow:
    return UserRow(
        row["id"],
        row["email"],
        row["display_name"],
        row["password_hash"],
        tuple(row["roles"]),
        row["create_time"],
        row["update_time"],
        row["disable_time"],
    )


def _api_key(row: asyncpg.Record) -> ApiKeyRow:
    return ApiKeyRow(
        row["id"],
        row["user_id"],
        row["display_name"],
        row["prefix"],
        bytes(row["secret_hash"]),
        tuple(row["scopes"]),
        row["expire_time"],
        row["create_time"],
        row["revoke_time"],
        row["last_use_time"],
    )


SIGNING_KEY_LOCK = 7_361_224_002  # serialises rotations across replicas
_EPOCH = dt.datetime.fromtimestamp(0, dt.UTC)


class EmailTaken(Exception):
    pass


class KeyTaken(Exception):
    """An API key with this prefix exists."""


class UserStore:
    def __init__(self, pool: asyncpg.Pool) -> None:
        self._pool = pool

    # users

    async def insert_user(
        self, user_id: str, email: str, display_name: str, password_hash: str, roles: Sequence[str]
    ) -> UserRow:
        try:
            async with self._pool.acquire() as connection, connection.transaction():
                row = await connection.fetchrow(
                    """INSERT INTO users
                           (id, email, email_normalized, display_name, password_hash, roles)
                       VALUES ($1, $2, lower($2), $3, $4, $5) RETURNING *""",
                    user_id,
                    email,
                    display_name,
                    password_hash,
                    list(roles),
                )
                await _audit(connection, user_id, "user.registered", f"users/{user_id}", {})
                await outbox.emit(
                    connection,
                    topic="user.registered",
                    key=f"users/{user_id}",
                    payload={"user": f"users/{user_id}", "roles": list(roles)},
                )
        except asyncpg.UniqueViolationError:
            raise EmailTaken(email) from None
        return _user(row)

    async def user_by_id(self, user_id: str) -> UserRow | None:
        row = await self._pool.fetchrow("SELECT * FROM users WHERE id = $1", user_id)
        return None if row is None else _user(row)

    async def user_by_email(self, email: str) -> UserRow | None:
        row = await self._pool.fetchrow(
            "SELECT * FROM users WHERE email_normalized = lower($1)", email
        )
        return None if row is None else _user(row)

    async def list_users(self, after: tuple[dt.datetime, str] | None, limit: int) -> list[UserRow]:
        page = KeysetPage.of(after, limit, column="create_time")
        rows = await self._pool.fetch(
            f"SELECT * FROM users WHERE {page.where} {page.order_limit}", *page.values
        )
        return [_user(row) for row in rows]

    async def update_user(
        self, actor: str, user_id: str, changes: dict[str, Any]
    ) -> UserRow | None:
        assignments, values = [], []
        for column, value in changes.items():
            values.append(value)
            assignments.append(f"{column} = ${len(values)}")
            if column == "email":
                assignments.append(f"email_normalized = lower(${len(values)})")
        values.append(user_id)
        sql = (
            f"UPDATE users SET {', '.join(assignments)}, update_time = now() "
            f"WHERE id = ${len(values)} RETURNING *"
        )
        try:
            async with self._pool.acquire() as connection, connection.transaction():
                row = await connection.fetchrow(sql, *values)
                if row is not None:
                    details = {k: v for k, v in changes.items() if k != "password_hash"}
                    await _audit(connection, actor, "user.updated", f"users/{user_id}", details)
        except asyncpg.UniqueViolationError:
            raise EmailTaken(str(changes.get("email"))) from None
        return None if row is None else _user(row)

    # API keys

    async def api_key_exists(self, prefix: str) -> bool:
        return bool(await self._pool.fetchval("SELECT 1 FROM api_keys WHERE prefix = $1", prefix))

    async def api_key_holder(self, prefix: str) -> str | None:
        """The user id whose key has this prefix, None if no key has it."""
        holder: str | None = await self._pool.fetchval(
            "SELECT user_id FROM api_keys WHERE prefix = $1", prefix
        )
        return holder

    async def insert_api_key(self, actor: str, key: ApiKeyRow) -> ApiKeyRow:
        try:
            return await self._insert_api_key(actor, key)
        except asyncpg.UniqueViolationError:
            raise KeyTaken(key.prefix) from None

    async def _insert_api_key(self, actor: str, key: ApiKeyRow) -> ApiKeyRow:
        async with self._pool.acquire() as connection, connection.transaction():
            row = await connection.fetchrow(
                """INSERT INTO api_keys
                       (id, user_id, display_name, prefix, secret_hash, scopes, expire_time)
                   VALUES ($1, $2, $3, $4, $5, $6, $7) RETURNING *""",
                key.id,
                key.user_id,
                key.display_name,
                key.prefix,
                key.secret_hash,
                list(key.scopes),
                key.expire_time,
            )
            await _audit(
                connection,
                actor,
                "api_key.created",
                f"users/{key.user_id}/apiKeys/{key.id}",
                {"scopes": list(key.scopes)},
            )
        return _api_key(row)

    async def api_keys_of(
        self, user_id: str, after: tuple[dt.datetime, str] | None, limit: int
    ) -> list[ApiKeyRow]:
        page = KeysetPage.of(after, limit, column="create_time", descending=True, first=2)
        rows = await self._pool.fetch(
            f"SELECT * FROM api_keys WHERE user_id = $1 AND {page.where} {page.order_limit}",
            user_id,
            *page.values,
        )
        return [_api_key(row) for row in rows]

    async def revoke_api_key(self, actor: str, user_id: str, key_id: str) -> ApiKeyRow | None:
        async with self._pool.acquire() as connection, connection.transaction():
            row = await connection.fetchrow(
                """UPDATE api_keys SET revoke_time = coalesce(revoke_time, now())
                   WHERE id = $1 AND user_id = $2 RETURNING *""",
                key_id,
                user_id,
            )
            if row is not None:
                await _audit(
                    connection, actor, "api_key.revoked", f"users/{user_id}/apiKeys/{key_id}", {}
                )
        return None if row is None else _api_key(row)

    async def use_api_key(self, prefix: str) -> ApiKeyRow | None:
        """The live key with this prefix, marking it used."""
        row = await self._pool.fetchrow(
            """UPDATE api_keys SET last_use_time = now()
               WHERE prefix = $1 AND revoke_time IS NULL
                 AND (expire_time IS NULL OR expire_time > now())
               RETURNING *""",
            prefix,
        )
        return None if row is None else _api_key(row)

    # refresh tokens

    async def insert_refresh(
        self, token_id: str, user_id: str, secret_hash: bytes, expire_time: dt.datetime
    ) -> None:
        await self._pool.execute(
            """INSERT INTO refresh_tokens (id, user_id, secret_hash, expire_time)
               VALUES ($1, $2, $3, $4)""",
            token_id,
            user_id,
            secret_hash,
            expire_time,
        )

    async def consume_refresh(
        self, token_id: str, secret_hash: bytes
    ) -> tuple[RefreshRow | None, bool]:
        """Mark a refresh token used. Returns (row, reused); a reuse revokes the family.

        A wrong secret changes nothing, so knowing a token's id is not enough to
        burn it or to end the user's sessions.
        """
        async with self._pool.acquire() as connection, connection.transaction():
            row = await connection.fetchrow(
                "SELECT * FROM refresh_tokens WHERE id = $1 FOR UPDATE", token_id
            )
            if row is None or not hmac.compare_digest(bytes(row["secret_hash"]), secret_hash):
                return None, False
            refresh = RefreshRow(
                row["id"],
                row["user_id"],
                bytes(row["secret_hash"]),
                row["expire_time"],
                row["used_time"],
                row["revoke_time"],
            )
            if refresh.used_time is not None and refresh.revoke_time is None:
                await connection.execute(
                    """UPDATE refresh_tokens SET revoke_time = now()
                       WHERE user_id = $1 AND revoke_time IS NULL""",
                    refresh.user_id,
                )
                await _audit(
                    connection,
                    refresh.user_id,
                    "refresh_token.reused",
                    f"users/{refresh.user_id}",
                    {"token": token_id},
                )
                return refresh, True
            await connection.execute(
                "UPDATE refresh_tokens SET used_time = now() WHERE id = $1", token_id
            )
            return refresh, False

    # signing keys

    async def live_signing_keys(self) -> list[SigningKeyRow]:
        """Keys that verify now or soon, the latest to activate first."""
        rows = await self._pool.fetch(
            """SELECT * FROM signing_keys WHERE retire_time IS NULL OR retire_time > now()
               ORDER BY activate_time DESC"""
        )
        return [
            SigningKeyRow(
                r["kid"], bytes(r["private_key_sealed"]), bytes(r["public_key"]),
                r["create_time"], r["retire_time"], r["activate_time"], r["kek_id"],
            )
            for r in rows
        ]  # fmt: skip

    async def reseal_signing_key(
        self, kid: str, sealed: bytes, resealed: bytes, kek_id: str
    ) -> bool:
        """Store `resealed` if the row still holds `sealed` (replicas reseal together)."""
        status = await self._pool.execute(
            """UPDATE signing_keys SET private_key_sealed = $3, kek_id = $4
                WHERE kid = $1 AND private_key_sealed = $2""",
            kid, sealed, resealed, kek_id,
        )  # fmt: skip
        return bool(status.endswith(" 1"))

    async def rotate_signing_key(
        self,
        actor: str,
        new: SigningKeyRow,
        retire_previous_after_s: float,
        due_before: dt.datetime | None = None,
    ) -> tuple[str | None, dt.datetime | None]:
        """Publish `new`, signing from its activate_time; the current key retires
        `retire_previous_after_s` after that. With `due_before`, rotate only if the
        current key was activated before it (replicas racing to rotate: one wins).
        Returns the replaced kid and its retire time, or (None, None) if skipped."""
        async with self._pool.acquire() as connection, connection.transaction():
            await connection.execute("SELECT pg_advisory_xact_lock($1)", SIGNING_KEY_LOCK)
            current = await connection.fetchrow(
                "SELECT kid, activate_time FROM signing_keys WHERE retire_time IS NULL"
            )
            recent = current is not None and current["activate_time"] >= (due_before or _EPOCH)
            if due_before is not None and recent:
                return None, None
            retire_at = new.activate_time + dt.timedelta(seconds=retire_previous_after_s)
            await connection.execute(
                "UPDATE signing_keys SET retire_time = $1 WHERE retire_time IS NULL", retire_at
            )
            await connection.execute(
                """INSERT INTO signing_keys
                       (kid, private_key_sealed, public_key, activate_time, kek_id)
                   VALUES ($1, $2, $3, $4, $5)""",
                new.kid, new.private_key_sealed, new.public_key, new.activate_time, new.kek_id,
            )  # fmt: skip
            await connection.execute(
                "DELETE FROM signing_keys WHERE retire_time < now() - interval '1 day'"
            )
            previous = None if current is None else str(current["kid"])
            await _audit(connection, actor, "signing_key.rotated", new.kid, {"previous": previous})
        return previous, retire_at

    async def insert_first_signing_key(self, key: SigningKeyRow) -> bool:
        """Insert a signing key if there is none; False if another replica won."""
        try:
            await self._pool.execute(
                """INSERT INTO signing_keys (kid, private_key_sealed, public_key, activate_time,
                                             kek_id)
                   VALUES ($1, $2, $3, now(), $4)""",
                key.kid, key.private_key_sealed, key.public_key, key.kek_id,
            )  # fmt: skip
        except asyncpg.UniqueViolationError:
            return False
        return True

    async def audit(self, actor: str, action: str, target: str, details: dict[str, Any]) -> None:
        async with self._pool.acquire() as connection:
            await _audit(connection, actor, action, target, details)


async def _audit(
    connection: asyncpg.Connection, actor: str, action: str, target: str, details: dict[str, Any]
) -> None:
    await connection.execute(
        "INSERT INTO audit_events (actor, action, target, details) VALUES ($1, $2, $3, $4::jsonb)",
        actor,
        action,
        target,
        json.dumps(details, default=str),
    )
