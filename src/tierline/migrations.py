"""Versioned schema migrations (``sql/migrations/NNNN_name.sql``), Tierline's and the
application's.

``migrate`` runs in one transaction under a transaction-scoped advisory lock, so any
number of replicas may run it at once: one applies, the others wait and find nothing to
do. A schema newer than this code is refused with a clear error rather than misused.

An application keeps its own tables' migrations beside Tierline's: a folder of
``NNNN_name.sql`` files named by ``App(migrations=...)``, applied after Tierline's by the
same ``tierline migrate`` (and ``tierline up``), in the same transaction, and recorded in
``tierline.app_migrations`` under the application's name.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
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
    return _numbered(resources.files("tierline.sql").joinpath("migrations").iterdir())


def in_folder(folder: str | Path) -> list[Migration]:
    """An application's migrations: the ``NNNN_name.sql`` files of ``folder``."""
    path = Path(folder)
    if not path.is_dir():
        raise SchemaError(f"the application's migrations folder {path} does not exist")
    return _numbered(path.iterdir())


def _numbered(entries: Iterable[Any]) -> list[Migration]:
    found = []
    for entry in entries:
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


async def migrate(
    conn: psycopg.AsyncConnection[object], app: tuple[str, list[Migration]] | None = None
) -> list[Migration]:
    """Apply the missing migrations, Tierline's then ``app``'s (its name and
    migrations); return what was applied (maybe nothing)."""
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
        if app is not None:
            applied += await _migrate_app(conn, *app)
    return applied


async def _migrate_app(
    conn: psycopg.AsyncConnection[object], name: str, migrations: list[Migration]
) -> list[Migration]:
    await conn.execute(
        "CREATE TABLE IF NOT EXISTS tierline.app_migrations ("
        " app text NOT NULL, version integer NOT NULL, name text NOT NULL,"
        " applied_at timestamptz NOT NULL DEFAULT now(), PRIMARY KEY (app, version))"
    )
    cur = await conn.execute(
        "SELECT coalesce(max(version), 0) FROM tierline.app_migrations WHERE app = %s", (name,)
    )
    row = await cur.fetchone()
    current = int(_first(row)) if row else 0
    if current > len(migrations):
        raise SchemaError(
            f"the database has migration {current} of the application {name!r}, which knows "
            f"up to {len(migrations)}: deploy the newer application"
        )
    applied = []
    for mig in migrations[current:]:
        # The application's own files, named by its code: trusted like ours.
        await conn.execute(cast(LiteralString, mig.sql))  # type: ignore[redundant-cast]
        await conn.execute(
            "INSERT INTO tierline.app_migrations (app, version, name) VALUES (%s, %s, %s)",
            (name, mig.version, mig.name),
        )
        applied.append(mig)
    return applied


def _first(row: object) -> Any:
    if isinstance(row, dict):
        return next(iter(row.values()))
    return row[0]  # type: ignore[index]
