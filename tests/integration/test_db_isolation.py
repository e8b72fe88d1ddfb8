"""Database isolation as `aimesh up` provisions it (aimesh_cli.local.provision):
each service's role reaches its own database only, reads no other service's
tables, and can create or own nothing outside its own database."""

from __future__ import annotations

import secrets
from collections.abc import AsyncIterator
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import pytest

from aimesh_cli.local import SERVICES, SHARED_DATABASES, provision


@pytest.fixture(scope="module")
async def service_urls(pg_admin_url: str) -> AsyncIterator[dict[str, str]]:
    passwords = {service: secrets.token_hex(16) for service in SERVICES}
    urls = await provision(pg_admin_url, passwords)
    for service, url in urls.items():  # each service owns a table, as its migrations would
        connection = await asyncpg.connect(url)
        try:
            await connection.execute("CREATE TABLE IF NOT EXISTS private_rows (secret text)")
            await connection.execute("INSERT INTO private_rows VALUES ($1)", f"{service} secret")
        finally:
            await connection.close()
    yield urls


def _with_database(url: str, database: str) -> str:
    parts = urlsplit(url)
    return urlunsplit(parts._replace(path=f"/{database}"))


@pytest.mark.parametrize("service", SERVICES)
async def test_a_role_reads_its_own_tables(service_urls: dict[str, str], service: str) -> None:
    connection = await asyncpg.connect(service_urls[service])
    try:
        assert await connection.fetchval("SELECT secret FROM private_rows") == f"{service} secret"
    finally:
        await connection.close()


@pytest.mark.parametrize("service", SERVICES)
async def test_a_role_cannot_connect_to_any_other_database(
    service_urls: dict[str, str], service: str
) -> None:
    others = [f"aimesh_{other}" for other in SERVICES if other != service]
    admitted = []
    for database in [*others, *SHARED_DATABASES]:
        try:
            connection = await asyncpg.connect(_with_database(service_urls[service], database))
        except asyncpg.InsufficientPrivilegeError as refused:
            assert "permission denied for database" in str(refused)
        else:
            admitted.append(database)
            await connection.close()
    assert admitted == []


@pytest.mark.parametrize("service", SERVICES)
async def test_a_role_cannot_become_or_create_anything_outside_its_database(
    service_urls: dict[str, str], service: str
) -> None:
    connection = await asyncpg.connect(service_urls[service])
    try:
        attributes = await connection.fetchrow(
            "SELECT rolsuper, rolcreatedb, rolcreaterole, rolreplication, rolbypassrls"
            " FROM pg_roles WHERE rolname = current_user"
        )
        assert not any(attributes.values()), dict(attributes)
        for other in SERVICES:
            if other != service:
                with pytest.raises(asyncpg.InsufficientPrivilegeError):
                    await connection.execute(f"SET ROLE aimesh_{other}")
        for statement in (
            "CREATE DATABASE aimesh_stolen",
            "CREATE ROLE aimesh_stolen",
            "SET ROLE postgres",
        ):
            with pytest.raises(asyncpg.InsufficientPrivilegeError):
                await connection.execute(statement)
    finally:
        await connection.close()


async def test_each_role_owns_only_its_own_database_and_its_objects(
    pg_admin_url: str, service_urls: dict[str, str]
) -> None:
    admin = await asyncpg.connect(pg_admin_url)
    try:
        owned = await admin.fetch(
            "SELECT datname, pg_get_userbyid(datdba) AS owner FROM pg_database"
            " WHERE pg_get_userbyid(datdba) LIKE 'aimesh\\_%'"
        )
        assert {(row["datname"], row["owner"]) for row in owned} == {
            (f"aimesh_{s}", f"aimesh_{s}") for s in SERVICES
        }
    finally:
        await admin.close()
    for database in [*SHARED_DATABASES, *(f"aimesh_{s}" for s in SERVICES)]:
        connection = await asyncpg.connect(_with_database(pg_admin_url, database))
        try:
            owners = await connection.fetch(
                "SELECT DISTINCT pg_get_userbyid(relowner) AS owner FROM pg_class"
                " WHERE pg_get_userbyid(relowner) LIKE 'aimesh\\_%'"
            )
        finally:
            await connection.close()
        allowed = {database} if database.startswith("aimesh_") else set()
        assert {row["owner"] for row in owners} <= allowed, database
