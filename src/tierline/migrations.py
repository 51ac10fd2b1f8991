"""Versioned schema migrations (``sql/migrations/NNNN_name.sql``).

``migrate`` runs in one transaction under a transaction-scoped advisory lock, so any
number of replicas may run it at once: one applies, the others wait and find nothing to
do. A schema newer than this code is refused with a clear error rather than misused.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from importlib import resources
from typing import Any, LiteralString, cast

import psycopg

from tierline.errors import SchemaError

MIGRATION_LOCK = 7347123000
_FILE = re.compile(r"^(\d{4})_([a-z0-9_]+)\.sql$")


@dataclass(frozen=True)
class Migration:
    version: int
    name: str
    sql: str


def available() -> list[Migration]:
    found = []
    for entry in resources.files("tierline.sql").joinpath("migrations").iterdir():
        if m := _FILE.match(entry.name):
            found.append(Migration(int(m[1]), m[2], entry.read_text("utf-8")))
    found.sort(key=lambda mig: mig.version)
    for i, mig in enumerate(found, start=1):
        if mig.version != i:
            raise SchemaError(f"migration versions must be 1..N without gaps; found {mig.version}")
    return found


LATEST = len(available())


async def applied_version(conn: psycopg.AsyncConnection[object]) -> int | None:
    """The schema version in the database, or None when Tierline was never installed."""
    cur = await conn.execute("SELECT to_regclass('tierline.migrations') IS NOT NULL")
    row = await cur.fetchone()
    if not row or not _first(row):
        return None
    cur = await conn.execute("SELECT coalesce(max(version), 0) FROM tierline.migrations")
    row = await cur.fetchone()
    return int(_first(row)) if row else 0


async def check(conn: psycopg.AsyncConnection[object]) -> int:
    """Raise SchemaError unless the schema is exactly the version this code expects."""
    version = await applied_version(conn)
    if version is None or version < LATEST:
        raise SchemaError(
            f"database schema is at version {version or 0}, this Tierline needs {LATEST}: "
            "run `tierline migrate`"
        )
    if version > LATEST:
        raise SchemaError(
            f"database schema is at version {version}, newer than this Tierline "
            f"(which knows up to {LATEST}): upgrade Tierline before running it here"
        )
    return version


async def migrate(conn: psycopg.AsyncConnection[object]) -> list[Migration]:
    """Apply the missing migrations; return what was applied (maybe nothing)."""
    applied: list[Migration] = []
    async with conn.transaction():
        await conn.execute("SELECT pg_advisory_xact_lock(%s)", (MIGRATION_LOCK,))
        await conn.execute("CREATE SCHEMA IF NOT EXISTS tierline")
        await conn.execute(
            "CREATE TABLE IF NOT EXISTS tierline.migrations ("
            " version integer PRIMARY KEY, name text NOT NULL,"
            " applied_at timestamptz NOT NULL DEFAULT now())"
        )
        cur = await conn.execute("SELECT coalesce(max(version), 0) FROM tierline.migrations")
        row = await cur.fetchone()
        current = int(_first(row)) if row else 0
        if current > LATEST:
            raise SchemaError(
                f"database schema is at version {current}, newer than this Tierline "
                f"(which knows up to {LATEST}): upgrade Tierline"
            )
        for mig in available():
            if mig.version <= current:
                continue
            # Migration files ship with the package; they are trusted code.
            await conn.execute(cast(LiteralString, mig.sql))  # type: ignore[redundant-cast]
            await conn.execute(
                "INSERT INTO tierline.migrations (version, name) VALUES (%s, %s)",
                (mig.version, mig.name),
            )
            applied.append(mig)
    return applied


def _first(row: object) -> Any:
    if isinstance(row, dict):
        return next(iter(row.values()))
    return row[0]  # type: ignore[index]
