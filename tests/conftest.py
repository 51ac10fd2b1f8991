"""Shared fixtures: a real PostgreSQL, a migrated template database, a fresh copy per test,
and helpers that start real ``tierline`` processes.

The server is ``TIERLINE_TEST_DATABASE_URL`` when set (CI: the machine's PostgreSQL),
else the embedded one (``tierline.embedded``, PostgreSQL 18) in a temporary folder.
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

from tests.helpers import ROOT
from tests.jobs_app import RUNS_TABLE, TEST_APP
from tierline.settings import Settings
from tierline.testing import routing
from tierline.testing.databases import (
    admin_connect,
    scratch_database,
    template_database,
    with_dbname,
)
from tierline.testing.processes import Cluster
from tierline.testing.routing import ROLE_PASSWORD, pooled

_RUN = uuid.uuid4().hex[:8]
_COUNTER = iter(range(1, 1_000_000))

# Started processes import the test applications (tests.jobs_app) as this one does.
os.environ["PYTHONPATH"] = os.pathsep.join(
    p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p
)


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
    transaction mode (``routing.pooled``); LISTEN and migrations stay direct."""
    if os.environ.get("TIERLINE_TEST_PGBOUNCER", "") in ("", "0"):
        yield
        return
    from tierline.testing.pgbouncer import PgBouncer

    bouncer = PgBouncer(request.getfixturevalue("server_url")).start()
    routing.use_pooler(bouncer)
    try:
        yield
    finally:
        routing.use_pooler(None)
        bouncer.stop()


@pytest.fixture(scope="session")
def template_db(server_url: str) -> Iterator[str]:
    """The migrated template (with the test app's ``public.runs``) each test copies."""
    with template_database(server_url, f"tl_tpl_{_RUN}", RUNS_TABLE) as name:
        yield name


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
    routing.use_roles(roles, url)
    try:
        yield
    finally:
        routing.use_roles({})
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
            web_role_password=ROLE_PASSWORD,
            worker_role_password=ROLE_PASSWORD,
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
    with scratch_database(server_url, f"tl_{_RUN}_{next(_COUNTER)}", template=template_db) as url:
        yield url


@pytest.fixture
def empty_db_url(server_url: str) -> Iterator[str]:
    """A fresh database without the Tierline schema."""
    with scratch_database(server_url, f"tl_{_RUN}_e{next(_COUNTER)}") as url:
        yield url


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
def cluster(db_url: str, tmp_path: Any) -> Iterator[Cluster]:
    c = Cluster(db_url, tmp_path)
    yield c
    c.close()


@pytest.fixture(scope="module")
def module_db(server_url: str, template_db: str) -> Iterator[str]:
    """One migrated database for a whole module (its processes outlive single tests)."""
    with scratch_database(
        server_url, f"tl_mod_{uuid.uuid4().hex[:10]}", template=template_db
    ) as url:
        yield url


@pytest.fixture(scope="module")
def module_cluster(
    module_db: str, tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest
) -> Iterator[Cluster]:
    """``tierline`` processes shared by a module's tests, running the test app."""
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
