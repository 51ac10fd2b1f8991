"""Databases on a PostgreSQL server: URLs, admin connections, scratch databases (created,
then dropped), a migrated template copied per test, and migrating a fresh database."""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import Iterator
from typing import Any

import psycopg
from psycopg.rows import dict_row

from tierline import migrations
from tierline.testing import conninfo


def with_dbname(url: str, name: str) -> str:
    """``url`` pointing at database ``name`` of the same server."""
    return conninfo.replace(url, dbname=name)


def dbname(url: str) -> str:
    """The database ``url`` points at."""
    return conninfo.parse(url).get("dbname", "")


@contextlib.contextmanager
def admin_connect(url: str) -> Iterator[psycopg.Connection[Any]]:
    """An autocommit connection with dict rows (CREATE DATABASE needs autocommit)."""
    with psycopg.connect(url, autocommit=True, row_factory=dict_row) as conn:
        yield conn


def query(url: str, sql: str, params: Any = None) -> list[dict[str, Any]]:
    """Run one statement on a connection of its own; its rows, if it returns any."""
    with admin_connect(url) as conn:
        cur = conn.execute(sql.encode(), params)
        return cur.fetchall() if cur.description else []


def migrate(url: str, *statements: str) -> None:
    """Apply Tierline's schema to the database at ``url``, then ``statements`` (e.g. the
    tables of a test application)."""

    async def run() -> None:
        conn = await psycopg.AsyncConnection.connect(url, autocommit=True)
        try:
            await migrations.migrate(conn)
            for statement in statements:
                await conn.execute(statement.encode())
        finally:
            await conn.close()

    asyncio.run(run())


@contextlib.contextmanager
def scratch_database(
    server_url: str, name: str | None = None, *, template: str | None = None
) -> Iterator[str]:
    """A new database on ``server_url`` (a copy of ``template`` when given), dropped
    afterwards even if clients are still connected; yields its URL."""
    name = name or f"tl_scratch_{uuid.uuid4().hex[:10]}"
    with admin_connect(server_url) as conn:
        if template:
            conn.execute(f'CREATE DATABASE "{name}" TEMPLATE "{template}"'.encode())
        else:
            conn.execute(f'CREATE DATABASE "{name}"'.encode())
    try:
        yield with_dbname(server_url, name)
    finally:
        with admin_connect(server_url) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'.encode())


@contextlib.contextmanager
def template_database(server_url: str, name: str, *statements: str) -> Iterator[str]:
    """A migrated database (plus ``statements``) to copy with
    ``scratch_database(template=name)``: migrating once per session, copying per test,
    keeps tests isolated and fast. Yields its name."""
    with scratch_database(server_url, name) as url:
        migrate(url, *statements)
        yield name
