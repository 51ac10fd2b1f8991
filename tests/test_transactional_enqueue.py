"""Enqueue inside the caller's transaction (``connection=``), on every path: the job is
invisible to workers until the caller commits, does not exist (nor its event) if the
caller rolls back, and a handler's follow-up job commits with the handler's writes."""

from __future__ import annotations

import asyncio
from typing import Any

import psycopg
import pytest

from tests.jobs_app import TEST_APP, add, app, record
from tierline.jobs import JobRequest
from tierline.testing.databases import query
from tierline.testing.processes import Cluster
from tierline.testing.waiting import wait_for

JOBS = "SELECT count(*) AS n FROM tierline.jobs"
EVENTS = "SELECT count(*) AS n FROM tierline.job_stream"  # a job's events, seq 1 too


def count(db_url: str, sql: str) -> int:
    return int(query(db_url, sql)[0]["n"])


async def test_async_paths_commit_and_roll_back(db_url: str) -> None:
    async with await psycopg.AsyncConnection.connect(db_url, autocommit=True) as conn:
        async with conn.transaction():
            job = await add.using(connection=conn).enqueue(a=1, b=2)
            await app.enqueue("add", {"a": 3}, connection=conn)
            ids = await app.enqueue_many(
                [JobRequest(kind="add", args={"a": i}) for i in range(3)], connection=conn
            )
            many = await add.using(connection=conn).enqueue_many([{"a": 9}, {"a": 10}])
            assert count(db_url, JOBS) == 0  # another session sees none of them yet
        assert count(db_url, JOBS) == 1 + 1 + 3 + 2
        assert job.args == {"a": 1, "b": 2} and len(ids) == 3 and len(many) == 2
        try:
            async with conn.transaction():
                await add.using(connection=conn).enqueue(a=5)
                raise RuntimeError("roll back")
        except RuntimeError:
            pass
    assert count(db_url, JOBS) == 7
    assert count(db_url, EVENTS) == 7  # one `enqueued` each; the rolled-back one left none


def test_sync_paths_commit_and_roll_back(db_url: str) -> None:
    with psycopg.connect(db_url) as conn:  # not autocommit: a transaction is open
        add.using(connection=conn).enqueue_sync(a=1)
        app.enqueue_sync("add", {"a": 2}, connection=conn)
        assert count(db_url, JOBS) == 0
        conn.commit()
        assert count(db_url, JOBS) == 2
        add.using(connection=conn).enqueue_sync(a=3)
        conn.rollback()
    assert count(db_url, JOBS) == 2
    assert count(db_url, EVENTS) == 2


async def test_wrong_kind_of_connection_is_a_clear_error(db_url: str) -> None:
    async with await psycopg.AsyncConnection.connect(db_url) as aconn:
        with pytest.raises(TypeError, match=r"psycopg\.Connection"):
            add.using(connection=aconn).enqueue_sync(a=1)
    with psycopg.connect(db_url) as conn, pytest.raises(TypeError, match="AsyncConnection"):
        await add.using(connection=conn).enqueue(a=1)


@pytest.mark.e2e
def test_worker_never_sees_an_uncommitted_job(cluster: Cluster, db_url: str) -> None:
    cluster.worker(TIERLINE_APP=TEST_APP, TIERLINE_WORKER_POLL_INTERVAL_S="0.1")
    runs = "SELECT count(*) AS n FROM public.runs WHERE token = 'held'"

    async def scenario() -> None:
        conn = await psycopg.AsyncConnection.connect(db_url, autocommit=True)
        async with conn, conn.transaction():
            await record.using(connection=conn).enqueue(token="held")
            # The worker polls every 0.1 s (and would be woken by the NOTIFY) while the
            # transaction stays open for 2 s: it must find nothing.
            await asyncio.sleep(2)
            assert count(db_url, runs) == 0
            assert count(db_url, JOBS) == 0
        wait_for(lambda: count(db_url, runs) == 1, 30, "the committed job to run")

    asyncio.run(scenario())


@pytest.mark.e2e
def test_follow_up_job_exists_iff_the_handler_commits(cluster: Cluster, db_url: str) -> None:
    cluster.worker(TIERLINE_APP=TEST_APP)
    kept = app.enqueue_sync("follow_up", {"token": "kept"}, connection=_autocommit(db_url))
    failed = app.enqueue_sync(
        "follow_up", {"token": "lost", "fail": True}, connection=_autocommit(db_url)
    )

    def state(job_id: int) -> Any:
        return query(db_url, f"SELECT state FROM tierline.jobs WHERE id = {job_id}")[0]["state"]

    wait_for(lambda: state(kept.id) == "succeeded", 30, "the committing parent")
    wait_for(lambda: state(failed.id) == "failed", 30, "the failing parent")
    tokens = {
        r["token"]
        for r in query(
            db_url, "SELECT args->>'token' AS token FROM tierline.jobs WHERE kind = 'record'"
        )
    }
    assert "kept" in tokens and "lost" not in tokens
    wait_for(
        lambda: count(db_url, "SELECT count(*) AS n FROM public.runs WHERE token = 'kept'") == 1,
        30,
        "the follow-up job to run",
    )
    parents = query(db_url, "SELECT token FROM public.runs WHERE token LIKE 'parent-%'")
    assert [p["token"] for p in parents] == ["parent-kept"]


def _autocommit(db_url: str) -> psycopg.Connection[Any]:
    return psycopg.connect(db_url, autocommit=True)
