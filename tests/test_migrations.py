"""Migrations: concurrent runs are safe; a newer schema is refused clearly."""

from __future__ import annotations

import asyncio

import psycopg
import pytest

from tierline import migrations
from tierline.errors import SchemaError


async def test_many_replicas_migrate_at_once(empty_db_url: str) -> None:
    async def one() -> int:
        conn = await psycopg.AsyncConnection.connect(empty_db_url, autocommit=True)
        try:
            return len(await migrations.migrate(conn))
        finally:
            await conn.close()

    applied = await asyncio.wait_for(asyncio.gather(*(one() for _ in range(8))), timeout=60)
    assert sorted(applied) == [0] * 7 + [migrations.LATEST]


async def test_missing_and_newer_schema_are_refused(empty_db_url: str) -> None:
    conn = await psycopg.AsyncConnection.connect(empty_db_url, autocommit=True)
    try:
        with pytest.raises(SchemaError, match="run `tierline migrate`"):
            await migrations.check(conn)
        await migrations.migrate(conn)
        assert await migrations.check(conn) == migrations.LATEST
        await conn.execute("INSERT INTO tierline.migrations (version, name) VALUES (999, 'x')")
        with pytest.raises(SchemaError, match="newer than this Tierline"):
            await migrations.check(conn)
        with pytest.raises(SchemaError, match="upgrade Tierline"):
            await migrations.migrate(conn)
    finally:
        await conn.close()
