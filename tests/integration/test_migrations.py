"""Versioned migrations: applied once, in order, and never edited afterwards."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import asyncpg
import pytest

from aimesh_runtime import db


async def test_applies_pending_once_and_refuses_edits(new_database: Any, tmp_path: Path) -> None:
    (tmp_path / "0001_first.sql").write_text("CREATE TABLE a (id int);")
    pool = await db.create_pool(await new_database("mig"))
    try:
        assert await db.migrate(pool, tmp_path, shared=False) == [1]
        (tmp_path / "0002_second.sql").write_text("CREATE TABLE b (id int);")
        assert await db.migrate(pool, tmp_path, shared=False) == [2]
        assert await db.migrate(pool, tmp_path, shared=False) == []
        (tmp_path / "0001_first.sql").write_text("CREATE TABLE a (id bigint);")
        with pytest.raises(db.MigrationError, match="changed after it was applied"):
            await db.migrate(pool, tmp_path, shared=False)
    finally:
        await pool.close()


async def test_a_failing_migration_leaves_nothing_behind(new_database: Any, tmp_path: Path) -> None:
    (tmp_path / "0001_bad.sql").write_text("CREATE TABLE c (id int); SELECT no_such_function();")
    pool = await db.create_pool(await new_database("mig"))
    try:
        with pytest.raises(asyncpg.PostgresError):
            await db.migrate(pool, tmp_path, shared=False)
        assert await pool.fetchval("SELECT to_regclass('c')") is None
        assert await pool.fetchval("SELECT count(*) FROM schema_migrations") == 0
    finally:
        await pool.close()


def test_names_and_duplicates_are_checked(tmp_path: Path) -> None:
    (tmp_path / "0001_a.sql").write_text("")
    (tmp_path / "0050_shared.sql").write_text("")
    assert [m.version for m in db.read_migrations(tmp_path)] == [1, 50]
    (tmp_path / "0050_again.sql").write_text("")
    with pytest.raises(db.MigrationError, match="unique"):
        db.read_migrations(tmp_path)
    (tmp_path / "0050_again.sql").unlink()
    (tmp_path / "3_bad name.sql").write_text("")
    with pytest.raises(db.MigrationError, match="NNNN_description"):
        db.read_migrations(tmp_path)


async def test_every_service_gets_the_runtimes_shared_tables(
    new_database: Any, tmp_path: Path
) -> None:
    (tmp_path / "0001_own.sql").write_text("CREATE TABLE own (id int);")
    pool = await db.create_pool(await new_database("mig"))
    try:
        assert await db.migrate(pool, tmp_path) == [1, 50]
        for table in ("own", "outbox", "audit_log"):
            assert await pool.fetchval("SELECT to_regclass($1)", table) is not None
    finally:
        await pool.close()
    (tmp_path / "0050_clash.sql").write_text("")
    with pytest.raises(db.MigrationError, match="shared"):
        db.with_shared(db.read_migrations(tmp_path))
