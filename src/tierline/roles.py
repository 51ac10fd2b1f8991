"""Least-privilege database roles for the two tiers (``tierline migrate --create-roles``).

The web role may enqueue, read, cancel, retry, register web replicas and share
statistics; the worker role may also claim, finish, renew, rescue, promote and prune.
Neither owns the schema or may create in it. Column grants keep the web role out of
the claim query; row-level security (``sql/roles.sql``) confines what each role may
write and limits the worker's deletions to pruning.

Run it as the user that ran the migrations (it owns the tables) with ``CREATEROLE``.
It is idempotent and runs in one transaction: re-running re-grants exactly the current
list, which is why it runs after every migration rather than as a migration itself.
"""

from __future__ import annotations

import re
import secrets
from dataclasses import dataclass, field
from typing import Any, Literal

import psycopg
from psycopg import sql

from tierline.errors import TierlineError
from tierline.migrations import MIGRATION_LOCK
from tierline.queries import QUERIES
from tierline.settings import Settings, Tier, env_name

AnyConn = psycopg.AsyncConnection[Any]  # the caller's own: granting roles needs no pool's
ROLE_NAME = re.compile(r"^[a-z_][a-z0-9_]{0,39}$")
_FIELD = re.compile(r"\{([a-z_]+)\}")

# What each tier's grants allow, for people reading the output.
ALLOWS: dict[Tier, str] = {
    "web": "enqueue, read, cancel, retry, registry (web rows), stats",
    "worker": "enqueue, read, claim, events, finish, leases, rescue, promote, "
    "prune (finished jobs past retention), registry (worker rows), stats",
}


@dataclass(frozen=True)
class RoleOutcome:
    """What ``create_roles`` did for one tier's role."""

    tier: Tier
    role: str
    created: bool
    password: Literal["generated", "set", "kept"]
    generated_password: str | None = None  # shown once, never stored by Tierline
    warnings: list[str] = field(default_factory=list)


def statement(name: str, role: str, **values: sql.Composable) -> sql.Composed:
    """A named query of ``roles.sql`` with its placeholders filled as SQL objects."""
    text = QUERIES[name]
    args: dict[str, sql.Composable] = {}
    for placeholder in set(_FIELD.findall(text)):
        if placeholder == "role":
            args[placeholder] = sql.Identifier(role)
        elif placeholder.startswith("p_"):
            args[placeholder] = sql.Identifier(f"{role}_{placeholder[2:]}")
        else:
            args[placeholder] = values[placeholder]
    return sql.SQL(text).format(**args)


def password_literal(conn: AnyConn, role: str, password: str) -> sql.Literal:
    """The SCRAM verifier of ``password``: the clear text never reaches the server (or
    its statement log)."""
    verifier = conn.pgconn.encrypt_password(
        password.encode("utf-8"), role.encode("utf-8"), b"scram-sha-256"
    )
    return sql.Literal(verifier.decode("ascii"))


async def create_roles(
    conn: AnyConn, settings: Settings, *, retention_s: float | None = None
) -> list[RoleOutcome]:
    """Create (if missing) and grant the web and worker roles in the connected database.

    ``retention_s`` is the floor below which the worker may not prune finished jobs
    (default ``TIERLINE_JOB_RETENTION_S``).
    """
    roles: dict[Tier, str] = {"web": settings.web_role, "worker": settings.worker_role}
    passwords = {"web": settings.web_role_password, "worker": settings.worker_role_password}
    if roles["web"] == roles["worker"]:
        raise TierlineError(
            f"{env_name('web_role')} and {env_name('worker_role')} are both "
            f"{roles['web']!r}: the tiers need separate roles"
        )
    for tier, role in roles.items():
        if not ROLE_NAME.match(role):
            raise TierlineError(
                f"{env_name(f'{tier}_role')}={role!r}: expected lower-case letters, digits "
                "and '_' (at most 40)"
            )
    retention = settings.job_retention_s if retention_s is None else retention_s
    outcomes: list[RoleOutcome] = []
    try:
        async with conn.transaction():
            # ENABLE ROW LEVEL SECURITY and CREATE POLICY lock the tables exclusively:
            # rather fail and be re-run than queue every claim behind a long transaction.
            await conn.execute("SET LOCAL lock_timeout = '10s'")
            await conn.execute("SELECT pg_advisory_xact_lock(%s)", (MIGRATION_LOCK,))
            row = await (await conn.execute("SELECT current_database() AS db")).fetchone()
            assert row is not None
            database = sql.Identifier(row["db"])
            for tier, role in roles.items():
                secret = passwords[tier]
                outcomes.append(
                    await _ensure_role(
                        conn, tier, role, secret.get_secret_value() if secret else None
                    )
                )
            await conn.execute(QUERIES["roles_rls"])
            for tier, role in roles.items():
                await conn.execute(statement("roles_revoke", role))
                await conn.execute(statement("roles_grant_common", role, database=database))
                await conn.execute(statement(f"roles_grant_{tier}", role))
                await conn.execute(
                    statement(
                        f"roles_policies_{tier}", role, retention=sql.Literal(float(retention))
                    )
                )
    except psycopg.errors.InsufficientPrivilege as exc:
        raise TierlineError(
            f"cannot create or grant the roles: {_first_line(exc)}; run "
            "`tierline migrate --create-roles` as the user that owns the tierline schema "
            "(the one that ran the migrations), with CREATEROLE"
        ) from None
    except psycopg.errors.LockNotAvailable:
        raise TierlineError(
            "cannot create or grant the roles: the tierline tables stayed locked for 10 s "
            "(a long transaction?); run it again"
        ) from None
    return outcomes


async def _ensure_role(conn: AnyConn, tier: Tier, role: str, password: str | None) -> RoleOutcome:
    found = await (await conn.execute(QUERIES["roles_lookup"], {"name": role})).fetchone()
    created, generated = False, None
    if found is None:
        generated = None if password else secrets.token_urlsafe(24)
        chosen = password or generated
        assert chosen is not None
        try:
            # A savepoint: another database's migration may create the role meanwhile.
            async with conn.transaction():
                await conn.execute(
                    statement("roles_create", role, password=password_literal(conn, role, chosen))
                )
            created = True
        except psycopg.errors.DuplicateObject:
            generated = None
            found = await (await conn.execute(QUERIES["roles_lookup"], {"name": role})).fetchone()
    if not created and password:
        await conn.execute(
            statement("roles_set_password", role, password=password_literal(conn, role, password))
        )
    warnings: list[str] = []
    if found is not None:
        if found["rolsuper"] or found["rolbypassrls"]:
            warnings.append(
                f"role {role} is a superuser or bypasses row-level security: these grants "
                "do not limit it; use a dedicated role"
            )
        if not found["rolcanlogin"]:
            warnings.append(f"role {role} cannot log in (ALTER ROLE {role} LOGIN)")
    return RoleOutcome(
        tier=tier,
        role=role,
        created=created,
        password="generated" if generated else ("set" if password else "kept"),
        generated_password=generated,
        warnings=warnings,
    )


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0]
