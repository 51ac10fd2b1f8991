"""Shared fixtures: a real PostgreSQL, a migrated template database, a fresh copy per test,
and helpers that start real ``tierline`` processes.

The server is ``TIERLINE_TEST_DATABASE_URL`` when set (CI: the machine's PostgreSQL),
else an embedded one from ``pgserver`` in a temporary folder.
"""

from __future__ import annotations

import asyncio
import os
import tempfile
import uuid
from collections.abc import AsyncIterator, Iterator
from typing import Any

import psycopg
import pytest
from psycopg.rows import dict_row
from psycopg_pool import AsyncConnectionPool

from tests import helpers
from tests.helpers import admin_connect, pooled, with_dbname
from tests.jobs_app import RUNS_TABLE
from tierline import migrations
from tierline.settings import Settings

_RUN = uuid.uuid4().hex[:8]
_COUNTER = iter(range(1, 1_000_000))


@pytest.fixture(scope="session")
def server_url() -> Iterator[str]:
    url = os.environ.get("TIERLINE_TEST_DATABASE_URL")
    if url:
        yield url
        return
    from tierline import embedded

    folder = tempfile.mkdtemp(prefix="tierline-test-pg-")
    yield embedded.start(folder)


@pytest.fixture(scope="session", autouse=True)
def pgbouncer_mode(request: pytest.FixtureRequest) -> Iterator[None]:
    """TIERLINE_TEST_PGBOUNCER=1: every test's pools go through a real PgBouncer in
    transaction mode (``helpers.pooled``); LISTEN and migrations stay direct."""
    if os.environ.get("TIERLINE_TEST_PGBOUNCER", "") in ("", "0"):
        yield
        return
    from tests.servers import PgBouncer

    bouncer = PgBouncer(request.getfixturevalue("server_url")).start()
    helpers.POOLER = bouncer
    try:
        yield
    finally:
        helpers.POOLER = None
        bouncer.stop()


@pytest.fixture(scope="session")
def template_db(server_url: str) -> Iterator[str]:
    name = f"tl_tpl_{_RUN}"
    with admin_connect(server_url) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}"')
        conn.execute(f'CREATE DATABASE "{name}"')
    url = with_dbname(server_url, name)

    async def setup() -> None:
        conn = await psycopg.AsyncConnection.connect(url, autocommit=True)
        try:
            await migrations.migrate(conn)  # type: ignore[arg-type]
            await conn.execute(RUNS_TABLE)
        finally:
            await conn.close()

    asyncio.run(setup())
    yield name
    with admin_connect(server_url) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture(scope="session", autouse=True)
def roles_mode(request: pytest.FixtureRequest) -> Iterator[None]:
    """TIERLINE_TEST_ROLES=1: ``Cluster`` starts web and worker processes as the
    least-privilege roles of ``tierline migrate --create-roles``, granted here in the
    template database so that every test database carries the grants."""
    if os.environ.get("TIERLINE_TEST_ROLES", "") in ("", "0"):
        yield
        return
    url = with_dbname(request.getfixturevalue("server_url"), request.getfixturevalue("template_db"))
    roles = {"web": f"tl_{_RUN}_web", "worker": f"tl_{_RUN}_worker"}
    asyncio.run(_grant_test_roles(url, roles))
    helpers.ROLES.update(roles)
    helpers.ROLE_SERVER = helpers.server_of(url)
    try:
        yield
    finally:
        helpers.ROLES.clear()
        helpers.ROLE_SERVER = ""
        with admin_connect(url) as conn:  # the template still exists: release its grants
            conn.execute(f"DROP OWNED BY {roles['web']}, {roles['worker']}")
            for role in roles.values():
                try:
                    conn.execute(f"DROP ROLE IF EXISTS {role}")
                except psycopg.Error:
                    pass  # a leftover database still uses it; names are unique per run


async def _grant_test_roles(url: str, roles: dict[str, str]) -> None:
    from tierline.roles import create_roles

    conn = await psycopg.AsyncConnection.connect(url, autocommit=True, row_factory=dict_row)
    try:
        settings = Settings.from_env(
            {},
            web_role=roles["web"],
            worker_role=roles["worker"],
            web_role_password=helpers.ROLE_PASSWORD,
            worker_role_password=helpers.ROLE_PASSWORD,
        )
        # Retention floor 0: tests that prune with short retentions behave as before.
        await create_roles(conn, settings, retention_s=0)
        # The test application's own table: an application grants its tables itself.
        await conn.execute(f"GRANT SELECT, INSERT ON public.runs TO {roles['worker']}")
    finally:
        await conn.close()


@pytest.fixture
def db_url(server_url: str, template_db: str) -> Iterator[str]:
    """A fresh, migrated database for one test."""
    name = f"tl_{_RUN}_{next(_COUNTER)}"
    with admin_connect(server_url) as conn:
        conn.execute(f'CREATE DATABASE "{name}" TEMPLATE "{template_db}"')
    yield with_dbname(server_url, name)
    with admin_connect(server_url) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture
def empty_db_url(server_url: str) -> Iterator[str]:
    """A fresh database without the Tierline schema."""
    name = f"tl_{_RUN}_e{next(_COUNTER)}"
    with admin_connect(server_url) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    yield with_dbname(server_url, name)
    with admin_connect(server_url) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def make_settings(db_url: str, **overrides: Any) -> Settings:
    base: dict[str, Any] = {
        "database_url": pooled(db_url),
        "database_direct_url": db_url,
        "startup_jitter_s": 0,
        "worker_poll_interval_s": 0.2,
        "heartbeat_s": 1,
        "replica_lease_s": 3,
    }
    base.update(overrides)
    return Settings.from_env({}, **base)


@pytest.fixture
def settings(db_url: str) -> Settings:
    return make_settings(db_url)


@pytest.fixture
async def pool(db_url: str) -> AsyncIterator[AsyncConnectionPool[Any]]:
    url = pooled(db_url)
    p: AsyncConnectionPool[Any] = AsyncConnectionPool(
        url,
        min_size=1,
        max_size=8,
        open=False,
        kwargs={
            "autocommit": True,
            "row_factory": dict_row,
            **({"prepare_threshold": None} if url != db_url else {}),
        },
    )
    await p.open(wait=True, timeout=10)
    yield p
    await p.close()


@pytest.fixture
def cluster(db_url: str, tmp_path: Any) -> Iterator[Any]:
    from tests.helpers import Cluster

    c = Cluster(db_url, tmp_path)
    yield c
    c.close()


@pytest.fixture(scope="module")
def module_db(server_url: str, template_db: str) -> Iterator[str]:
    """One migrated database for a whole module (its processes outlive single tests)."""
    from tests.faults.support import scratch_database

    with scratch_database(server_url, template_db) as url:
        yield url


@pytest.fixture(scope="module")
def module_cluster(
    module_db: str, tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest
) -> Iterator[Any]:
    """``tierline`` processes shared by a module's tests, running the test app."""
    from tests.faults.support import TEST_APP
    from tests.helpers import Cluster

    folder = tmp_path_factory.mktemp(request.module.__name__.rsplit(".", 1)[-1])
    c = Cluster(module_db, folder, TIERLINE_APP=TEST_APP)
    yield c
    c.close()


@pytest.fixture
def browser() -> Iterator[Any]:
    """A headless Chromium (Playwright, the system's binary), closed after the test."""
    from playwright.sync_api import sync_playwright

    from tests.helpers import CHROMIUM, CHROMIUM_ARGS

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            yield b
        finally:
            b.close()
