"""Flow control against a real PostgreSQL, in process: unique jobs, queue limits and
pause in the claim (several claimers standing in for replicas), schedule slots."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta
from typing import Any

import psycopg
import pytest
from psycopg.rows import dict_row

from tests.jobs_app import app
from tierline import Unique
from tierline.claims import Claims
from tierline.jobs import JobRequest
from tierline.limits import QueueSpec, Rate, change, declare
from tierline.queue import Queue
from tierline.schedules import LOOKAHEAD_S, Schedule, plan

DONE = "UPDATE tierline.jobs SET state = 'succeeded' WHERE id = %s"
OWNERS = [f"00000000-0000-0000-0000-00000000010{i}" for i in range(3)]


async def seed(pool: Any, queue: str, n: int, **args: Any) -> None:
    requests = [
        JobRequest(kind="add", args={"a": args.get("a", i), "b": i}, queue=queue) for i in range(n)
    ]
    await Queue(app, pool).enqueue_batch_ids(requests)


async def running(pool: Any, queue: str) -> int:
    async with pool.connection() as conn:
        cur = await conn.execute(
            "SELECT count(*) AS n FROM tierline.jobs WHERE queue = %s AND state = 'running'",
            (queue,),
        )
        row = await cur.fetchone()
    return int(row["n"])


# -- unique jobs ------------------------------------------------------------------------------
async def test_unique_by_args_from_eight_connections_creates_one_job(db_url: str) -> None:
    conns = [
        await psycopg.AsyncConnection.connect(db_url, autocommit=True, row_factory=dict_row)
        for _ in range(8)
    ]
    try:
        jobs = await asyncio.gather(
            *(
                app.enqueue("add", {"a": 7, "b": 1}, connection=conns[i % 8], unique=True)
                for i in range(100)
            )
        )
        async with conns[0].cursor() as cur:
            await cur.execute("SELECT count(*) AS n FROM tierline.jobs WHERE kind = 'add'")
            row = await cur.fetchone()
    finally:
        for c in conns:
            await c.close()
    assert row is not None and row["n"] == 1
    assert len({j.id for j in jobs}) == 1


async def test_unique_by_chosen_args_while_waiting_then_free_again(pool: Any) -> None:
    q = Queue(app, pool)
    by_a = Unique(args=["a"])
    first, created = await q.enqueue(JobRequest(kind="add", args={"a": 1, "b": 1}, unique=by_a))
    same, again = await q.enqueue(JobRequest(kind="add", args={"a": 1, "b": 2}, unique=by_a))
    other, third = await q.enqueue(JobRequest(kind="add", args={"a": 2, "b": 2}, unique=by_a))
    assert created and not again and third
    assert same.id == first.id and other.id != first.id
    async with pool.connection() as conn:  # the first one finishes: no longer blocks
        await conn.execute(
            "UPDATE tierline.jobs SET state = 'succeeded' WHERE id = %s", (first.id,)
        )
    later, created_later = await q.enqueue(
        JobRequest(kind="add", args={"a": 1, "b": 3}, unique=by_a)
    )
    assert created_later and later.id != first.id
    # In a batch: duplicates inside it and against the table are one job.
    batch = await q.enqueue_batch(
        [JobRequest(kind="add", args={"a": 9}, unique=True) for _ in range(3)]
        + [JobRequest(kind="add", args={"a": 1, "b": 3}, unique=by_a)]
    )
    assert [c for _, c in batch] == [True, False, False, False]
    assert batch[3][0].id == later.id


async def test_unique_within_a_period_blocks_a_finished_duplicate(pool: Any) -> None:
    q = Queue(app, pool)
    hourly = Unique(period_s=3600)
    first, _ = await q.enqueue(JobRequest(kind="add", args={"a": 5}, unique=hourly))
    async with pool.connection() as conn:
        await conn.execute(
            "UPDATE tierline.jobs SET state = 'succeeded' WHERE id = %s", (first.id,)
        )
    again, created = await q.enqueue(JobRequest(kind="add", args={"a": 5}, unique=hourly))
    assert not created and again.id == first.id
    _, created = await q.enqueue(JobRequest(kind="add", args={"a": 5}))
    assert created  # not unique: always a new job


# -- limits in the claim --------------------------------------------------------------------
async def test_max_running_holds_across_claimers(pool: Any) -> None:
    await seed(pool, "lim", 40)
    async with pool.connection() as conn:
        await declare(conn, [QueueSpec.make("lim", 4, None, None)])
    claimers = [Claims(pool, o, ["lim"], 30) for o in OWNERS]
    got = await asyncio.gather(*(c.take(10, []) for c in claimers))
    assert sum(len(g) for g in got) == 4
    assert await running(pool, "lim") == 4
    done = [r["id"] for g in got for r in g][:2]
    async with pool.connection() as conn:
        await conn.execute(
            "UPDATE tierline.jobs SET state = 'succeeded' WHERE id = ANY(%s)", (done,)
        )
    got = await asyncio.gather(*(c.take(10, []) for c in claimers))
    assert sum(len(g) for g in got) == 2
    assert await running(pool, "lim") == 4


async def test_partitioned_max_running_holds_per_partition(pool: Any) -> None:
    reqs = [JobRequest(kind="add", args={"a": i % 3, "b": i}, queue="part") for i in range(30)]
    await Queue(app, pool).enqueue_batch_ids(reqs)
    async with pool.connection() as conn:
        await change(conn, "part", {"max_running": 2, "partition_by": "a"})
    claimers = [Claims(pool, o, ["part"], 30) for o in OWNERS]
    got = [r for g in await asyncio.gather(*(c.take(10, []) for c in claimers)) for r in g]
    per: dict[int, int] = {}
    for r in got:
        per[r["args"]["a"]] = per.get(r["args"]["a"], 0) + 1
    assert per == {0: 2, 1: 2, 2: 2}


async def test_rate_limit_is_a_sliding_window(pool: Any) -> None:
    await seed(pool, "rate", 40)
    async with pool.connection() as conn:
        await change(conn, "rate", {"rate_limit": "5/s"})
    c = Claims(pool, OWNERS[0], ["rate"], 30)
    first = await c.take(20, [])
    assert len(first) == 5 and c.rate_limited
    assert await c.take(20, []) == []
    await asyncio.sleep(1.1)
    assert len(await c.take(20, [])) == 5


async def test_pause_stops_claims_enqueue_still_works_resume_restarts(pool: Any) -> None:
    await seed(pool, "p", 5)
    async with pool.connection() as conn:
        row = await change(conn, "p", {"paused": True})
    assert row["paused"] and row["paused_at"]
    c = Claims(pool, OWNERS[0], ["p", "default"], 30)
    c.limited = {}  # a stale routing table: the claim itself still refuses the queue
    c._routes_at = 1e18
    assert await c._open(10, []) == []
    await seed(pool, "p", 1)  # enqueue still works
    async with pool.connection() as conn:
        await change(conn, "p", {"paused": False})
    assert len(await c.take(10, [])) == 6


async def test_declared_limits_yield_to_live_changes_until_reset(pool: Any) -> None:
    async with pool.connection() as conn:
        await declare(conn, [QueueSpec.make("d", 3, "10/m", None)])
        live = await change(conn, "d", {"max_running": 7})
        await declare(conn, [QueueSpec.make("d", 5, "10/m", None)])  # a worker restarts
        cur = await conn.execute("SELECT * FROM tierline.queues WHERE name = 'd'")
        row = await cur.fetchone()
        assert live["overrides"] == ["max_running"]
        assert row["max_running"] == 7 and row["rate_count"] == 10
        reset = await change(conn, "d", {"reset": True})
    assert reset["max_running"] == 5 and reset["overrides"] == []


def test_rates_parse() -> None:
    assert Rate.parse("20/s") == Rate(20, 1.0)
    assert Rate.parse("100/m") == Rate(100, 60.0)
    assert Rate.parse("5/10s") == Rate(5, 10.0)
    for bad in ("0/s", "x/s", "5/0s", "5/w", ""):
        with pytest.raises(ValueError, match="COUNT/UNIT"):
            Rate.parse(bad)


# -- schedules --------------------------------------------------------------------------------
NOW = datetime(2030, 1, 1, 12, 0, 0, 500_000, tzinfo=UTC)


def test_schedule_slots_every_and_cron_with_seconds() -> None:
    every = Schedule.make("noop", None, 2, {}, None, "UTC", True)
    slots, _ = plan(every, None, NOW)
    assert slots == [NOW.replace(microsecond=0) + timedelta(seconds=s) for s in (2,)]
    cron = Schedule.make("noop", "*/2 * * * * *", None, {}, "c", "UTC", True)
    assert plan(cron, None, NOW)[0] == slots
    minute = Schedule.make("noop", "30 9 * * 1", None, {}, "m", "Europe/Berlin", True)
    assert minute.next_after(NOW) == datetime(2030, 1, 7, 8, 30, tzinfo=UTC)
    with pytest.raises(ValueError, match="cron"):
        Schedule.make("noop", "61 * * * *", None, {}, None, "UTC", True)
    with pytest.raises(ValueError, match="exactly one"):
        Schedule.make("noop", None, None, {}, None, "UTC", True)


def test_missed_slots_make_one_catch_up_run_or_none() -> None:
    every = Schedule.make("noop", None, 2, {}, None, "UTC", True)
    last = NOW - timedelta(hours=1)
    slots, newest = plan(every, last, NOW)
    past = [s for s in slots if s <= NOW]
    assert past == [NOW.replace(microsecond=0)]  # the newest missed slot, once
    assert all(NOW < s <= NOW + timedelta(seconds=LOOKAHEAD_S) for s in slots[1:])
    assert newest == slots[-1]
    skip = Schedule.make("noop", None, 2, {}, "s", "UTC", False)
    assert all(s > NOW for s in plan(skip, last, NOW)[0])


async def test_retrying_a_unique_job_beside_its_duplicate_is_a_conflict(pool: Any) -> None:
    from tierline.errors import InvalidTransition

    q = Queue(app, pool)
    first, _ = await q.enqueue(JobRequest(kind="add", args={"a": 3}, unique=True))
    async with pool.connection() as conn:
        await conn.execute(
            "UPDATE tierline.jobs SET state = 'failed', finished_at = now() WHERE id = %s",
            (first.id,),
        )
    await q.enqueue(JobRequest(kind="add", args={"a": 3}, unique=True))
    with pytest.raises(InvalidTransition, match="unique"):
        await q.retry(first.id)
