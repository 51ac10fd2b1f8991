"""The event hub in process, on a real PostgreSQL: its fallback sweep delivers events whose
notification never came (the LISTEN connection down, a writer that named other jobs)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from datetime import datetime
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


async def _replay(hub: EventHub, after: tuple[int, int, int]) -> list[Any]:
    """A firehose subscriber's replay from ``after`` to the end (pages of hub.page_size)."""
    sub = Subscription(hub, job_id=None, after=after)
    return [ev async for ev in sub._replay()]


async def test_an_enqueue_record_is_one_event_per_job_across_pages(pool: Any) -> None:
    """A batch writes one enqueue record (schema 7); the firehose expands it into each
    job's `enqueued` event, in order, resumable from any of them, also where a page
    ends inside the record; a job's own stream reads its seq 1 from its row."""
    queue = Queue(app, pool)
    hub = EventHub(lambda: pool, buffer_size=10)  # pages of 10 events
    head = await hub.firehose_head()
    single, _ = await queue.enqueue(JobRequest(kind="noop", delay_s=60))
    batch = [i for i, _ in await queue.enqueue_batch_ids([JobRequest(kind="noop")] * 25)]
    events = await _replay(hub, head)
    assert [(e.job_id, e.seq, e.type) for e in events] == [
        (j, 1, "enqueued") for j in [single.id, *batch]
    ]
    assert [e.sub for e in events] == [1, *range(1, 26)]
    assert len({e.firehose_id for e in events}) == 26
    assert events[0].data["state"] == "scheduled" and events[1].data["state"] == "available"
    # Resumed inside the record (after its 10th job) and after its last job.
    assert [e.job_id for e in await _replay(hub, events[10].position)] == batch[10:]
    assert await _replay(hub, events[-1].position) == []
    assert await hub.firehose_head() == events[-1].position
    # Each job's stream: seq 1 from the row, as the stored event said before schema 7.
    page, _ = await hub.page(single.id, 0)
    assert [(e.seq, e.type) for e in page] == [(1, "enqueued")]
    data = page[0].data
    assert (data["state"], data["priority"]) == ("scheduled", 0)
    assert datetime.fromisoformat(data["run_at"]) == single.run_at


async def test_a_job_enqueued_before_schema_7_keeps_its_stored_event(pool: Any) -> None:
    """Jobs from before the enqueue records keep their stored `enqueued` row (seq 1):
    their streams read it once, never a second one from the row."""
    async with pool.connection() as conn:
        row = await (
            await conn.execute(
                "WITH j AS (INSERT INTO tierline.jobs (queue, kind, state) "
                "VALUES ('default', 'noop', 'available') RETURNING id) "
                "INSERT INTO tierline.job_events (job_id, seq, type, queue, kind, data) "
                "SELECT id, 1, 'enqueued', 'default', 'noop', '{\"stored\": true}' FROM j "
                "RETURNING job_id"
            )
        ).fetchone()
    hub = EventHub(lambda: pool)
    page, _ = await hub.page(row["job_id"], 0)
    assert [(e.seq, e.type, e.data) for e in page] == [(1, "enqueued", {"stored": True})]
