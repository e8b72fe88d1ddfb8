"""asyncpg pool per service and versioned SQL migrations applied at start.

Migrations are files `NNNN_description.sql` in the service's migrations
folder, plus the runtime's own (aimesh_runtime/migrations: the outbox and
audit tables every service has, from version 0050, so a service's own
numbering goes on below it). Each runs once, in its own transaction, under an
advisory lock so two replicas starting together do not race. A file changed
after it was applied stops the start: migrations are append-only. Versions may
skip numbers, and a pending version lower than one applied still runs (each
file must stand on its own).
"""

from __future__ import annotations

import asyncio
import datetime as dt
import hashlib
import logging
import re
import time
from dataclasses import dataclass
from pathlib import Path

import asyncpg

log = logging.getLogger(__name__)

MIGRATION_NAME = re.compile(r"^(\d{4})_([a-z0-9_]+)\.sql$")
MIGRATION_LOCK_ID = 7_361_224_001  # advisory lock key shared by every aimesh service
SHARED_MIGRATIONS = Path(__file__).parent / "migrations"


@dataclass(frozen=True)
class KeysetPage:
    """SQL for one page of a list ordered by (a timestamp column, id).

    `where` selects the rows past the previous page ("TRUE" on the first),
    `order_limit` orders and cuts them; `values` bind their placeholders, which
    start at the number the query gives (so they follow its own parameters).
    """

    where: str
    order_limit: str
    values: tuple[object, ...]

    @classmethod
    def of(
        cls,
        after: tuple[dt.datetime, str] | None,
        limit: int,
        *,
        column: str,
        descending: bool = False,
        first: int = 1,
    ) -> KeysetPage:
        direction = " DESC" if descending else ""
        order_limit = f"ORDER BY {column}{direction}, id{direction} LIMIT $"
        if after is None:
            return cls("TRUE", f"{order_limit}{first}", (limit,))
        beyond = "<" if descending else ">"
        where = f"({column}, id) {beyond} (${first}, ${first + 1})"
        return cls(where, f"{order_limit}{first + 2}", (after[0], after[1], limit))


class MigrationError(RuntimeError):
    pass


@dataclass(frozen=True)
class Migration:
    version: int
    name: str
    sql: str

    @property
    def checksum(self) -> str:
        return hashlib.sha256(self.sql.encode()).hexdigest()


def read_migrations(folder: Path) -> list[Migration]:
    found = []
    for path in sorted(folder.glob("*.sql")):
        match = MIGRATION_NAME.match(path.name)
        if match is None:
            raise MigrationError(f"{path.name}: expected NNNN_description.sql")
        found.append(Migration(int(match.group(1)), match.group(2), path.read_text()))
    versions = [m.version for m in found]
    if len(set(versions)) != len(versions) or 0 in versions:
        raise MigrationError(f"{folder}: migration versions must be unique and start at 0001")
    return found


def with_shared(own: list[Migration]) -> list[Migration]:
    """A service's migrations and the runtime's, in version order."""
    shared = read_migrations(SHARED_MIGRATIONS)
    taken = {m.version for m in shared} & {m.version for m in own}
    if taken:
        raise MigrationError(f"versions {sorted(taken)} belong to the runtime's shared migrations")
    return sorted(own + shared, key=lambda m: m.version)


async def migrate(pool: asyncpg.Pool, folder: Path, *, shared: bool = True) -> list[int]:
    """Apply pending migrations of `folder` (and, with `shared`, the runtime's);
    return the versions applied now."""
    migrations = read_migrations(folder)
    if shared:
        migrations = with_shared(migrations)
    applied_now = []
    async with pool.acquire() as connection:
        await connection.execute("SELECT pg_advisory_lock($1)", MIGRATION_LOCK_ID)
        try:
            await connection.execute(
                """CREATE TABLE IF NOT EXISTS schema_migrations (
                       version integer PRIMARY KEY,
                       name text NOT NULL,
                       checksum text NOT NULL,
                       applied_at timestamptz NOT NULL DEFAULT now())"""
            )
            rows = await connection.fetch("SELECT version, checksum FROM schema_migrations")
            applied = {row["version"]: row["checksum"] for row in rows}
            for migration in migrations:
                if migration.version in applied:
                    if applied[migration.version] != migration.checksum:
                        raise MigrationError(
                            f"migration {migration.version}_{migration.name} changed after "
                            "it was applied; add a new migration instead"
                        )
                    continue
                async with connection.transaction():
                    await connection.execute(migration.sql)
                    await connection.execute(
                        """INSERT INTO schema_migrations (version, name, checksum)
                           VALUES ($1, $2, $3)""",
                        migration.version,
                        migration.name,
                        migration.checksum,
                    )
                applied_now.append(migration.version)
                log.info("applied migration %04d_%s", migration.version, migration.name)
        finally:
            await connection.execute("SELECT pg_advisory_unlock($1)", MIGRATION_LOCK_ID)
    return applied_now


async def create_pool(
    url: str, *, min_size: int = 1, max_size: int = 10, wait_s: float = 30.0
) -> asyncpg.Pool:
    """Connect, waiting up to `wait_s` for the database to accept connections."""
    deadline = time.monotonic() + wait_s
    delay = 0.1
    while True:
        try:
            pool: asyncpg.Pool = await asyncpg.create_pool(
                url,
                min_size=min_size,
                max_size=max_size,
                command_timeout=30,
                reset=_keep_session,
            )
            return pool
        except (TimeoutError, OSError, asyncpg.PostgresError) as error:
            if time.monotonic() + delay > deadline:
                raise
            log.warning("database not ready (%s); retrying", error)
            await asyncio.sleep(delay)
            delay = min(delay * 2, 2.0)


async def _keep_session(connection: asyncpg.Connection) -> None:
    """Release a connection without asyncpg's reset query (RESET ALL, UNLISTEN *,
    advisory unlocks): a second round trip on every release, and our code keeps
    no session state on pooled connections (locks are transaction-scoped or
    released in `finally`). asyncpg still rolls back an open transaction."""


class DatabaseProbe:
    """Is the database up? Asked on a connection of the probe's own, so a pool
    busy with real work never reads as a dead database, and only after
    `failures_to_trip` misses in a row, so one slow answer does not pull a
    healthy replica out of rotation."""

    def __init__(self, url: str, failures_to_trip: int = 2) -> None:
        self._url = url
        self._failures_to_trip = failures_to_trip
        self._connection: asyncpg.Connection | None = None
        self._failures = 0
        self._ever_up = False

    async def check(self, timeout_s: float) -> bool:
        try:
            async with asyncio.timeout(timeout_s):
                if self._connection is None or self._connection.is_closed():
                    self._connection = await asyncpg.connect(self._url)
                await self._connection.fetchval("SELECT 1")
        except Exception as error:  # any failure counts; the database may be gone
            self._failures += 1
            await self.close()
            if self._failures == self._failures_to_trip:
                log.warning("database unreachable: %s", error or type(error).__name__)
        else:
            if self._failures >= self._failures_to_trip:
                log.info("database reachable again")
            self._failures = 0
            self._ever_up = True
        return self._ever_up and self._failures < self._failures_to_trip

    async def close(self) -> None:
        if self._connection is not None:
            self._connection.terminate()
            self._connection = None
