"""Maintenance: rescue of expired leases, promotion of due jobs, pruning with events."""

from __future__ import annotations

import json
from typing import Any

from tests.conftest import make_settings
from tests.helpers import plan_with_stale_statistics
from tests.jobs_app import app
from tierline.jobs import JobRequest
from tierline.maintenance import Maintenance
from tierline.queries import QUERIES
from tierline.queue import Queue
from tierline.worker import Worker

OWNER = "00000000-0000-0000-0000-0000000000aa"


async def test_rescue_promote_and_prune(pool: Any, db_url: str) -> None:
    settings = make_settings(db_url, job_retention_s=60)
    queue = Queue(app, pool)
    last = (await queue.enqueue(JobRequest(kind="noop", max_attempts=1)))[0]
    again = (await queue.enqueue(JobRequest(kind="noop", max_attempts=3)))[0]
    later = (await queue.enqueue(JobRequest(kind="noop", delay_s=30)))[0]
    old = [(await queue.enqueue(JobRequest(kind="noop")))[0] for _ in range(3)]
    async with pool.connection() as conn:
        # Two jobs claimed by a replica that then vanished (leases in the past).
        await conn.execute(
            "UPDATE tierline.jobs SET state = 'running', attempt = 1, lease_owner = %s, "
            "lease_expires_at = now() - interval '1 s' WHERE id = ANY(%s)",
            (OWNER, [last.id, again.id]),
        )
        await conn.execute(
            "UPDATE tierline.jobs SET run_at = now() - interval '1 s' WHERE id = %s", (later.id,)
        )
        await conn.execute(
            "UPDATE tierline.jobs SET state = 'succeeded', finished_at = now() - interval '2 h' "
            "WHERE id = ANY(%s)",
            ([j.id for j in old],),
        )
    m = Maintenance(settings, pool)
    done = await m.tick()
    assert done["rescued"] == 2 and done["promoted"] == 1 and done["pruned"] == 3
    assert (await queue.get(last.id)).state == "failed"
    rescued = await queue.get(again.id)
    assert rescued.state == "available" and rescued.error["type"] == "LeaseExpired"
    assert (await queue.get(later.id)).state == "available"
    async with pool.connection() as conn:
        left = await (
            await conn.execute(
                "SELECT count(*) AS n FROM tierline.job_events WHERE job_id = ANY(%s)",
                ([j.id for j in old],),
            )
        ).fetchone()
        types = await (
            await conn.execute(
                "SELECT type FROM tierline.job_stream WHERE job_id = %s ORDER BY seq", (again.id,)
            )
        ).fetchall()
    assert left["n"] == 0, "events of pruned jobs must go with them"
    assert [t["type"] for t in types] == ["enqueued", "retrying"]


async def test_only_one_maintainer_per_round(pool: Any, db_url: str) -> None:
    settings = make_settings(db_url)
    async with pool.connection() as conn, conn.transaction():
        await conn.execute("SELECT pg_advisory_xact_lock(7347123002)")
        # Another worker holds the lock this round: this one does nothing.
        assert await Maintenance(settings, pool).tick() == {
            "rescued": 0,
            "promoted": 0,
            "pruned": 0,
        }


async def test_lost_lease_result_is_dropped(pool: Any, db_url: str) -> None:
    """A worker whose lease ran out cannot overwrite the job's newer attempt."""
    settings = make_settings(db_url)
    queue = Queue(app, pool)
    job = (await queue.enqueue(JobRequest(kind="noop")))[0]
    slow = Worker(app, settings, pool, OWNER)
    async with pool.connection() as conn:
        rows = await (
            await conn.execute(
                "UPDATE tierline.jobs SET state = 'running', attempt = 1, lease_owner = %s, "
                "lease_expires_at = now() - interval '1 s' WHERE id = %s RETURNING id",
                (OWNER, job.id),
            )
        ).fetchall()
    assert rows
    await Maintenance(settings, pool).tick()  # rescued: available again
    from tierline.flusher import Finish

    slow.flusher.finish(Finish(job.id, 1, "default", "noop", "succeeded", result="late"))
    await slow.flusher._write(slow.flusher.events, slow.flusher.finishes)
    current = await queue.get(job.id)
    assert current.state == "available" and current.result is None


async def test_promotion_reads_only_due_jobs_even_with_stale_statistics(pool: Any) -> None:
    """Statistics taken while every job was scheduled for later, then the jobs became
    available: promotion must read the due-jobs index, not the table or the backlog."""
    plan = json.dumps(await plan_with_stale_statistics(pool, QUERIES["promote_due"]))
    assert "Seq Scan" not in plan and "jobs_due_idx" in plan, plan
    assert "jobs_waiting_idx" not in plan, plan
