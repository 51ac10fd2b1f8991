"""How started processes and test pools reach the database: directly, through a pooler
(PgBouncer in transaction mode), or as a tier's least-privilege role.

The route is the session's: a conftest switches a mode on once (``use_pooler``,
``use_roles``) and ``processes.tierline_env``, ``processes.Cluster`` and the pools built
from ``pooled(url)`` follow it. By default everything connects directly.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

from tierline.testing import conninfo

# The password of the roles a roles-mode session creates (``use_roles``).
ROLE_PASSWORD = "tierline-test-role"


class Pooler(Protocol):
    """Anything that maps a database URL to the URL through it (``PgBouncer``)."""

    def url(self, db_url: str) -> str: ...


@dataclass
class Route:
    """The session's route: a pooler in front of the server, and per-tier roles."""

    pooler: Pooler | None = None
    roles: dict[str, str] = field(default_factory=dict)  # tier -> role
    role_server: str = ""  # host:port of the server that has the roles


ROUTE = Route()


def use_pooler(pooler: Pooler | None) -> None:
    """Pools connect through ``pooler`` from now on (None: directly again). LISTEN and
    migrations keep the direct URL (``TIERLINE_DATABASE_DIRECT_URL``)."""
    ROUTE.pooler = pooler


def use_roles(roles: dict[str, str], server_url: str = "") -> None:
    """Tiers' processes connect as ``roles`` (tier -> role, password ``ROLE_PASSWORD``)
    to databases of ``server_url``'s server; ``{}`` switches roles off."""
    ROUTE.roles.clear()
    ROUTE.roles.update(roles)
    ROUTE.role_server = server_of(server_url) if roles else ""


def pooled(db_url: str) -> str:
    """``db_url`` as the pools should reach it: through the pooler when there is one."""
    return ROUTE.pooler.url(db_url) if ROUTE.pooler is not None else db_url


def database_env(db_url: str) -> dict[str, str]:
    """TIERLINE_DATABASE_URL (and the direct URL when a pooler sits in between)."""
    env = {"TIERLINE_DATABASE_URL": pooled(db_url)}
    if env["TIERLINE_DATABASE_URL"] != db_url:
        env["TIERLINE_DATABASE_DIRECT_URL"] = db_url
    return env


def tier_url(db_url: str, tier: str) -> str:
    """The URL a tier's processes use: its role's in roles mode, else ``db_url``."""
    if tier in ROUTE.roles and server_of(db_url) == ROUTE.role_server:
        return as_role(db_url, ROUTE.roles[tier])
    return db_url


def as_role(db_url: str, role: str, password: str = ROLE_PASSWORD) -> str:
    """``db_url`` with another user and password."""
    return conninfo.replace(db_url, user=role, password=password)


def with_host(url: str, host: str, port: int) -> str:
    """``url`` pointing at ``host:port``, user and password kept."""
    return conninfo.replace(url, host=host, port=str(port))


def server_of(url: str) -> str:
    """``host:port`` of the server ``url`` points at (the host may be a socket folder)."""
    host, port = conninfo.server(url)
    return f"{host}:{port}"
