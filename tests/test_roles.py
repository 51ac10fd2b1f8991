"""Least-privilege roles (``tierline migrate --create-roles``) against a real PostgreSQL.

Each test creates its own roles (role names are cluster-wide: unique per test), connects
as them and runs Tierline's real code: what a tier needs works, the rest is refused.
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import asynccontextmanager
from typing import Any

import httpx
import psycopg
import pytest
from psycopg.rows import dict_row
from psycopg.types.json import Jsonb
from psycopg_pool import AsyncConnectionPool

from tests.conftest import make_settings
from tests.jobs_app import app
from tierline.jobs import JobRequest
from tierline.maintenance import Maintenance
from tierline.queries import QUERIES
from tierline.queue import Queue
from tierline.replica import Replica
from tierline.roles import create_roles
from tierline.settings import Settings
from tierline.stats import Stats
from tierline.testing.databases import admin_connect, query
from tierline.testing.processes import Cluster, tierline_env
from tierline.testing.routing import ROLE_PASSWORD, as_role
from tierline.worker import Worker

Denied = psycopg.errors.InsufficientPrivilege
OWNER = "00000000-0000-0000-0000-00000000000a"


@pytest.fixture
def role_names(db_url: str) -> Iterator[dict[str, str]]:
    """Unique role names for one test; the roles are dropped afterwards."""
    suffix = uuid.uuid4().hex[:10]
    names = {"web": f"tlr_{suffix}_web", "worker": f"tlr_{suffix}_worker"}
    yield names
    with admin_connect(db_url) as conn:
        conn.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE usename = ANY(%s)",
            (list(names.values()),),
        )
        for role in names.values():
            if conn.execute("SELECT 1 FROM pg_roles WHERE rolname = %s", (role,)).fetchone():
                conn.execute(f'DROP OWNED BY "{role}"')
                conn.execute(f'DROP ROLE "{role}"')


def role_settings(db_url: str, names: dict[str, str], **overrides: Any) -> Settings:
    return Settings.from_env(
        {},
        database_url=db_url,
        web_role=names["web"],
        worker_role=names["worker"],
        web_role_password=ROLE_PASSWORD,
        worker_role_password=ROLE_PASSWORD,
        **overrides,
    )


async def grant(db_url: str, names: dict[str, str], retention_s: float = 0) -> None:
    conn = await psycopg.AsyncConnection.connect(db_url, autocommit=True, row_factory=dict_row)
    try:
        await create_roles(conn, role_settings(db_url, names), retention_s=retention_s)
    finally:
        await conn.close()


@asynccontextmanager
async def role_pool(db_url: str, role: str) -> AsyncIterator[AsyncConnectionPool[Any]]:
    pool: AsyncConnectionPool[Any] = AsyncConnectionPool(
        as_role(db_url, role),
        min_size=1,
        max_size=4,
        open=False,
        kwargs={"autocommit": True, "row_factory": dict_row},
    )
    await pool.open(wait=True, timeout=10)
    try:
        yield pool
    finally:
        await pool.close()


async def refused(pool: AsyncConnectionPool[Any], sql: Any, params: Any = None) -> str:
    """Run ``sql`` and return the refusal's message; fail when it is allowed."""
    async with pool.connection() as conn:
        with pytest.raises(Denied) as info:
            await conn.execute(sql, params)
    return str(info.value)


async def until(check: Callable[[], Awaitable[bool]], timeout: float, what: str) -> None:
    """Poll ``check`` until it is true; fail with ``what`` after ``timeout`` seconds."""

    async def poll() -> None:
        while True:
            if await check():
                return
            await asyncio.sleep(0.05)

    try:
        await asyncio.wait_for(poll(), timeout)
    except TimeoutError:
        raise AssertionError(f"timed out after {timeout}s waiting for {what}") from None


def insert_job(db_url: str, **cols: Any) -> int:
    row = {"queue": "default", "kind": "add", "args": Jsonb({"a": 1}), "state": "available"}
    row.update(cols)
    names = ", ".join(row)
    marks = ", ".join(f"%({k})s" for k in row)
    rows = query(db_url, f"INSERT INTO tierline.jobs ({names}) VALUES ({marks}) RETURNING id", row)
    job_id = int(rows[0]["id"])
    query(
        db_url,
        "INSERT INTO tierline.job_events (job_id, seq, type, queue, kind) "
        "VALUES (%s, 1, 'enqueued', 'default', 'add')",
        (job_id,),
    )
    return job_id


def privileges(db_url: str, roles: list[str]) -> list[Any]:
    """Everything granted to ``roles`` in the database, and their policies."""
    tables = query(
        db_url,
        "SELECT grantee, table_name, privilege_type FROM information_schema.role_table_grants "
        "WHERE grantee = ANY(%s) ORDER BY 1, 2, 3",
        (roles,),
    )
    columns = query(
        db_url,
        "SELECT grantee, table_name, column_name, privilege_type "
        "FROM information_schema.column_privileges WHERE grantee = ANY(%s) ORDER BY 1, 2, 3, 4",
        (roles,),
    )
    policies = query(
        db_url,
        "SELECT tablename, policyname, permissive, roles::text, cmd, qual, with_check "
        "FROM pg_policies WHERE schemaname = 'tierline' ORDER BY 1, 2",
    )
    return [tables, columns, policies]


# -- the command ---------------------------------------------------------------------------
def test_migrate_create_roles_is_idempotent(db_url: str, role_names: dict[str, str]) -> None:
    env = tierline_env(db_url)
    cmd = [
        sys.executable,
        "-m",
        "tierline",
        "migrate",
        "--create-roles",
        "--web-role",
        role_names["web"],
        "--worker-role",
        role_names["worker"],
    ]

    def run(**extra: str) -> str:
        out = subprocess.run(
            cmd, env={**env, **extra}, capture_output=True, text=True, timeout=60, check=False
        )
        assert out.returncode == 0, out.stdout + out.stderr
        return out.stdout

    first = run()
    for role in role_names.values():
        assert f"role {role}: created; password generated, shown once" in first
    secrets = [line.rsplit(": ", 1)[1] for line in first.splitlines() if "shown once" in line]
    assert len(secrets) == 2 and all(len(s) >= 24 for s in secrets)
    verifiers = {
        r["rolname"]: r["rolpassword"]
        for r in query(
            db_url,
            "SELECT rolname, rolpassword FROM pg_authid WHERE rolname = ANY(%s)",
            (list(role_names.values()),),
        )
    }
    assert all(v.startswith("SCRAM-SHA-256$") for v in verifiers.values())
    granted = privileges(db_url, list(role_names.values()))

    second = run()
    assert "shown once" not in second
    assert f"role {role_names['web']}: exists; password unchanged" in second
    assert privileges(db_url, list(role_names.values())) == granted

    third = run(TIERLINE_WORKER_ROLE_PASSWORD="a new secret")
    assert f"role {role_names['worker']}: exists; password set from" in third
    after = {
        r["rolname"]: r["rolpassword"]
        for r in query(
            db_url,
            "SELECT rolname, rolpassword FROM pg_authid WHERE rolname = ANY(%s)",
            (list(role_names.values()),),
        )
    }
    assert after[role_names["web"]] == verifiers[role_names["web"]]
    assert after[role_names["worker"]] != verifiers[role_names["worker"]]
    assert after[role_names["worker"]].startswith("SCRAM-SHA-256$")  # never the clear text
    roles = query(
        db_url,
        "SELECT rolsuper, rolcreatedb, rolcreaterole, rolbypassrls, rolcanlogin FROM pg_roles "
        "WHERE rolname = ANY(%s)",
        (list(role_names.values()),),
    )
    assert all(
        r
        == {
            "rolsuper": False,
            "rolcreatedb": False,
            "rolcreaterole": False,
            "rolbypassrls": False,
            "rolcanlogin": True,
        }
        for r in roles
    )


def test_check_and_create_roles_are_exclusive(db_url: str) -> None:
    out = subprocess.run(
        [sys.executable, "-m", "tierline", "migrate", "--check", "--create-roles"],
        env=tierline_env(db_url),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert out.returncode == 2 and "do not go together" in out.stderr


# -- the web role --------------------------------------------------------------------------
async def test_web_role_enqueues_reads_cancels_retries_and_registers(
    db_url: str, role_names: dict[str, str]
) -> None:
    await grant(db_url, role_names)
    settings = make_settings(as_role(db_url, role_names["web"]))
    async with role_pool(db_url, role_names["web"]) as pool:
        queue = Queue(app, pool)
        job, created = await queue.enqueue(JobRequest(kind="add", args={"a": 1}))
        assert created and job.state == "available"
        _, created = await queue.enqueue(
            JobRequest(kind="add", args={"a": 2}, idempotency_key="k1")
        )
        assert created
        batch = await queue.enqueue_batch(
            [JobRequest(kind="add", args={"a": i}) for i in range(3)]
            + [JobRequest(kind="add", args={"a": 9}, idempotency_key="k1")]
        )
        assert [c for _, c in batch] == [True, True, True, False]
        later, _ = await queue.enqueue(JobRequest(kind="add", args={"a": 3}, delay_s=3600))
        assert later.state == "scheduled"
        assert (await queue.get(job.id)).id == job.id
        assert len(await queue.list(limit=10)) == 6

        cancelled = await queue.cancel(job.id)
        assert cancelled.state == "cancelled"
        retried = await queue.retry(job.id)
        assert retried.state == "available"
        # A running job (held by a worker) gets a cancel request; it stays running.
        running = insert_job(db_url, state="running", lease_owner=OWNER, attempt=1)
        assert (await queue.cancel(running)).state == "running"
        assert query(
            db_url, "SELECT cancel_requested_at FROM tierline.jobs WHERE id = %s", (running,)
        )[0]["cancel_requested_at"]

        async with pool.connection() as conn:
            events = await (
                await conn.execute(
                    QUERIES["job_events_after"], {"job_id": job.id, "after": 0, "limit": 10}
                )
            ).fetchall()
            assert [e["type"] for e in events] == ["enqueued", "cancelled", "retrying"]
            await conn.execute(QUERIES["firehose_head"])
            await conn.execute(
                QUERIES["firehose_after"], {"xid": "0", "id": 0, "sub": 0, "limit": 10}
            )
            await conn.execute("LISTEN tierline_events")

        stats = Stats(pool)
        snap = await stats.queues()
        assert snap["queues"][0]["counts"]["available"] >= 4
        await stats.cluster()

    # The registry: claim budget, heartbeat, leave; as the web role.
    replica = Replica(settings, "web")
    assert await replica.start(asyncio.Event())
    await replica.heartbeat()
    await replica.close()
    rows = query(db_url, "SELECT tier, stopped_at FROM tierline.replicas")
    assert len(rows) == 1 and rows[0]["tier"] == "web" and rows[0]["stopped_at"] is not None


async def test_web_role_cannot_claim_run_finish_or_delete(
    db_url: str, role_names: dict[str, str]
) -> None:
    await grant(db_url, role_names)
    waiting = insert_job(db_url)
    async with role_pool(db_url, role_names["web"]) as pool:
        claim = {"queues": ["default"], "limit": 10, "owner": OWNER, "lease_s": 30, "skip": []}
        assert "permission denied" in await refused(pool, QUERIES["claim"], claim)
        # Not even a plain UPDATE can start a job: the web role cannot set a lease owner,
        # and a running job without one is refused by row-level security.
        message = await refused(
            pool, "UPDATE tierline.jobs SET state = 'running' WHERE id = %s", (waiting,)
        )
        assert "row-level security" in message
        await refused(
            pool, "UPDATE tierline.jobs SET state = 'succeeded' WHERE id = %s", (waiting,)
        )
        await refused(pool, "UPDATE tierline.jobs SET lease_owner = %s", (OWNER,))
        await refused(pool, "UPDATE tierline.jobs SET result = '1'")
        await refused(
            pool,
            "INSERT INTO tierline.jobs (queue, kind, state) VALUES ('default', 'add', 'running')",
        )
        finish = {
            "ids": [waiting],
            "attempts": [1],
            "states": ["succeeded"],
            "results": [Jsonb(1)],
            "errors": [None],
            "delays": [0.0],
            "owner": OWNER,
        }
        await refused(pool, QUERIES["finish_batch"], finish)
        await refused(pool, QUERIES["prune"], {"retention_s": 0, "limit": 10})
        await refused(pool, "DELETE FROM tierline.jobs")
        await refused(pool, "DELETE FROM tierline.job_events")
        await refused(pool, "DELETE FROM tierline.replicas")
        # Registry rows of the other tier are not the web tier's to write.
        await refused(
            pool,
            "INSERT INTO tierline.replicas (id, tier, host, pid, version, lease_s, "
            "requested_pool) VALUES (gen_random_uuid(), 'worker', 'h', 1, 'v', 10, 4)",
        )
    assert query(db_url, "SELECT state FROM tierline.jobs WHERE id = %s", (waiting,)) == [
        {"state": "available"}
    ]


@pytest.mark.parametrize("tier", ["web", "worker"])
async def test_neither_role_can_change_the_schema(
    db_url: str, role_names: dict[str, str], tier: str
) -> None:
    await grant(db_url, role_names)
    async with role_pool(db_url, role_names[tier]) as pool:
        for statement in (
            "CREATE TABLE tierline.evil (id int)",
            "CREATE INDEX ON tierline.jobs (kind)",
            "ALTER TABLE tierline.jobs ADD COLUMN evil int",
            "ALTER TABLE tierline.jobs DISABLE ROW LEVEL SECURITY",
            "DROP POLICY tierline_allow_all ON tierline.jobs",
            "DROP TABLE tierline.stats",
            "TRUNCATE tierline.job_events",
            "CREATE FUNCTION tierline.evil() RETURNS int LANGUAGE sql AS 'SELECT 1'",
            "DELETE FROM tierline.migrations",
            f"ALTER ROLE {role_names[tier]} BYPASSRLS",
        ):
            await refused(pool, statement)


# -- the worker role -----------------------------------------------------------------------
async def test_worker_role_claims_runs_finishes_and_keeps_leases(
    db_url: str, role_names: dict[str, str]
) -> None:
    await grant(db_url, role_names)
    settings = make_settings(as_role(db_url, role_names["worker"]), job_lease_s=2)
    async with role_pool(db_url, role_names["worker"]) as pool:
        queue = Queue(app, pool)  # handlers enqueue follow-up jobs as the worker role
        done, _ = await queue.enqueue(JobRequest(kind="progress_sync", args={"steps": 3}))
        slow, _ = await queue.enqueue(JobRequest(kind="sleeper", args={"seconds": 30}))
        worker = Worker(app, settings, pool, OWNER)
        tasks = [
            asyncio.create_task(worker.claim_forever()),
            asyncio.create_task(worker.flusher.run()),
            asyncio.create_task(worker.renew_forever()),
        ]
        try:

            async def settled() -> bool:
                return (await queue.get(done.id)).state == "succeeded" and (
                    await queue.get(slow.id)
                ).state == "running"

            await until(settled, 15, "one job done, one running")
            lease = "SELECT lease_expires_at AS t FROM tierline.jobs WHERE id = %s"
            first = query(db_url, lease, (slow.id,))[0]["t"]

            async def renewed() -> bool:
                return bool(query(db_url, lease, (slow.id,))[0]["t"] != first)

            await until(renewed, 10, "the lease to be renewed")
        finally:
            await worker.drain(0.2)  # hands the sleeper back (release)
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
        assert (await queue.get(slow.id)).state == "available"
        types = [
            r["type"]
            for r in query(
                db_url,
                "SELECT type FROM tierline.job_stream WHERE job_id = %s ORDER BY seq",
                (done.id,),
            )
        ]
        assert types[:2] == ["enqueued", "started"] and types[-1] == "succeeded"
        assert types.count("progress") == 3

    replica = Replica(settings, "worker")
    assert await replica.start(asyncio.Event())
    await replica.heartbeat()
    await replica.close()


async def test_worker_role_rescues_promotes_and_prunes_only_past_retention(
    db_url: str, role_names: dict[str, str]
) -> None:
    await grant(db_url, role_names, retention_s=3600)  # the floor: one hour
    expired = insert_job(
        db_url,
        state="running",
        attempt=1,
        lease_owner=OWNER,
        lease_expires_at=_ago(60),
        started_at=_ago(120),
    )
    due = insert_job(db_url, state="scheduled", run_at=_ago(1))
    old = insert_job(db_url, state="succeeded", finished_at=_ago(7200))
    recent = insert_job(db_url, state="failed", finished_at=_ago(600))
    waiting = insert_job(db_url, state="available")
    query(
        db_url,
        "INSERT INTO tierline.replicas (id, tier, host, pid, version, lease_s, requested_pool, "
        "heartbeat_at) VALUES (gen_random_uuid(), 'web', 'dead', 1, 'v', 10, 4, "
        "now() - interval '2 days'), (gen_random_uuid(), 'web', 'live', 2, 'v', 10, 4, now())",
    )
    # The worker asks for retention 0; the floor keeps the job finished 10 minutes ago.
    settings = make_settings(as_role(db_url, role_names["worker"]), job_retention_s=0)
    async with role_pool(db_url, role_names["worker"]) as pool:
        done = await Maintenance(settings, pool).tick()
        assert done == {"rescued": 1, "promoted": 1, "pruned": 1}
        async with pool.connection() as conn:
            # Deleting anything else is filtered out by row-level security, silently.
            for table in ("jobs", "job_events", "replicas"):
                cur = await conn.execute(f"DELETE FROM tierline.{table}")
                assert cur.rowcount == 0, table
            # A worker cannot write web replicas' registry rows.
            cur = await conn.execute("UPDATE tierline.replicas SET claimed = 0")
            assert cur.rowcount == 0
    states = {r["id"]: r["state"] for r in query(db_url, "SELECT id, state FROM tierline.jobs")}
    assert states == {
        expired: "available",
        due: "available",
        recent: "failed",
        waiting: "available",
    }
    assert old not in {r["job_id"] for r in query(db_url, "SELECT job_id FROM tierline.job_events")}
    assert [r["host"] for r in query(db_url, "SELECT host FROM tierline.replicas")] == ["live"]


def _ago(seconds: float) -> Any:
    from datetime import UTC, datetime, timedelta

    return datetime.now(UTC) - timedelta(seconds=seconds)


# -- both tiers as their roles, end to end --------------------------------------------------
@pytest.mark.e2e
def test_tiers_run_as_their_roles_end_to_end(
    cluster: Cluster, db_url: str, role_names: dict[str, str]
) -> None:
    asyncio.run(grant(db_url, role_names))
    env = {"TIERLINE_APP": "tests.jobs_app:app"}

    def urls(tier: str) -> dict[str, str]:
        url = as_role(db_url, role_names[tier])
        return {"TIERLINE_DATABASE_URL": url, "TIERLINE_DATABASE_DIRECT_URL": url}

    web, url = cluster.web(**env, **urls("web"))
    worker, wurl = cluster.worker(**env, **urls("worker"))
    cluster.wait_ready(url, web)
    cluster.wait_ready(wurl, worker)
    r = httpx.post(f"{url}/v1/jobs", json={"kind": "progress_sync", "args": {"steps": 4}})
    assert r.status_code == 202, r.text
    job_id = r.json()["id"]
    types: list[str] = []
    deadline = time.monotonic() + 30
    with httpx.stream("GET", f"{url}/v1/jobs/{job_id}/events", timeout=10) as stream:
        assert stream.status_code == 200
        for line in stream.iter_lines():
            if line.startswith("event:"):
                types.append(line.partition(":")[2].strip())
            if "succeeded" in types or time.monotonic() > deadline:
                break
    assert types[0] == "enqueued" and types[-1] == "succeeded", types
    assert types.count("progress") == 4
    assert httpx.get(f"{url}/v1/jobs/{job_id}").json()["result"] == 4
    users = {
        r["usename"]
        for r in query(
            db_url,
            "SELECT usename FROM pg_stat_activity WHERE datname = current_database() "
            "AND application_name LIKE 'tierline-%'",
        )
    }
    assert users == set(role_names.values()), users
    assert web.stop() == 0 and worker.stop() == 0
