"""The event hub in process, on a real PostgreSQL: its fallback sweep delivers events whose
notification never came (the LISTEN connection down, a writer that named other jobs)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

from tests.jobs_app import app
from tierline.jobs import JobRequest
from tierline.queue import Queue
from tierline.streaming import SWEEP_SLICES, EventHub, Subscription

POLL_S = 0.4


async def _write_event(pool: Any, job_ids: list[int], seq: int) -> None:
    """An event for each job, committed as the worker writes one, without its NOTIFY."""
    async with pool.connection() as conn, conn.transaction():
        await conn.execute(
            "UPDATE tierline.jobs SET event_seq = %s WHERE id = ANY(%s)", (seq, job_ids)
        )
        await conn.execute(
            "INSERT INTO tierline.job_events (job_id, seq, type, queue, kind, data) "
            "SELECT id, %s, 'progress', queue, kind, '{}' FROM tierline.jobs "
            "WHERE id = ANY(%s)",
            (seq, job_ids),
        )


async def test_the_sweep_delivers_events_whose_notification_never_came(pool: Any) -> None:
    queue = Queue(app, pool)
    # Enough jobs that every slice of the sweep follows some.
    jobs = [(await queue.enqueue(JobRequest(kind="noop")))[0] for _ in range(4 * SWEEP_SLICES)]
    ids = [j.id for j in jobs]
    assert {i % SWEEP_SLICES for i in ids} == set(range(SWEEP_SLICES))
    hub = EventHub(lambda: pool, poll_s=POLL_S)
    subs = [Subscription(hub, job_id=i, after=1, head=1) for i in ids]
    for sub in subs:
        await hub.subscribe(sub)
    streams: list[AsyncIterator[Any]] = [sub.events() for sub in subs]
    runner = asyncio.create_task(hub.run())
    try:
        # seq 2 with its notification: each stream is past its replay, following live.
        await _write_event(pool, ids, 2)
        hub.notify("tierline_events", ",".join(map(str, ids)))
        got = await asyncio.wait_for(asyncio.gather(*(anext(s) for s in streams)), 10)
        assert [ev.seq for ev in got] == [2] * len(ids)
        # seq 3 without one: only the sweep can find it, each job within poll_s.
        fetches = hub.fetches
        await _write_event(pool, ids, 3)
        got = await asyncio.wait_for(asyncio.gather(*(anext(s) for s in streams)), 10 * POLL_S)
        assert [ev.seq for ev in got] == [3] * len(ids)
        assert hub.fetches - fetches >= 2, "one slice per sweep, not everything at once"
    finally:
        runner.cancel()
        await asyncio.gather(runner, return_exceptions=True)
        for sub in subs:
            hub.unsubscribe(sub)
