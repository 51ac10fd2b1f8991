"""The queue against a real PostgreSQL: enqueue, idempotency, batches, claims, outcomes."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from tests.conftest import make_settings
from tests.helpers import plan_with_stale_statistics
from tests.jobs_app import app
from tierline.errors import InvalidJob, InvalidTransition, JobNotFound, UnknownKind
from tierline.jobs import JobRequest
from tierline.queries import QUERIES
from tierline.queue import Queue
from tierline.settings import Settings
from tierline.worker import Worker

OWNER = "00000000-0000-0000-0000-000000000009"


@pytest.fixture
def queue(pool: Any) -> Queue:
    return Queue(app, pool)


@asynccontextmanager
async def running_worker(
    pool: Any, settings: Settings, owner: str = "00000000-0000-0000-0000-000000000001"
) -> AsyncIterator[Worker]:
    w = Worker(app, settings, pool, owner)
    tasks = [
        asyncio.create_task(w.claim_forever()),
        asyncio.create_task(w.flusher.run()),
        asyncio.create_task(w.renew_forever()),
    ]
    try:
        yield w
    finally:
        await w.drain(2)
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


async def wait_state(queue: Queue, job_id: int, states: set[str], timeout: float = 10) -> Any:
    async def poll() -> Any:
        while True:
            job = await queue.get(job_id)
            if job.state in states:
                return job
            await asyncio.sleep(0.02)

    return await asyncio.wait_for(poll(), timeout)


async def test_enqueue_and_idempotency(queue: Queue) -> None:
    job, created = await queue.enqueue(JobRequest(kind="add", args={"a": 1}, idempotency_key="k"))
    assert created and job.state == "available" and job.queue == "default"
    again, created2 = await queue.enqueue(
        JobRequest(kind="add", args={"a": 2}, idempotency_key="k")
    )
    assert not created2 and again.id == job.id and again.args == {"a": 1}


async def test_concurrent_idempotent_enqueues_make_one_job(queue: Queue) -> None:
    results = await asyncio.gather(
        *(queue.enqueue(JobRequest(kind="noop", idempotency_key="same")) for _ in range(20))
    )
    assert len({j.id for j, _ in results}) == 1
    assert sum(1 for _, created in results if created) == 1


async def test_batch_keeps_order_and_dedupes_keys(queue: Queue) -> None:
    await queue.enqueue(JobRequest(kind="noop", idempotency_key="old"))
    reqs = [JobRequest(kind="add", args={"a": i}) for i in range(5)]
    reqs += [
        JobRequest(kind="noop", idempotency_key="old"),
        JobRequest(kind="noop", idempotency_key="new"),
        JobRequest(kind="noop", idempotency_key="new"),
    ]
    out = await queue.enqueue_batch(reqs)
    assert [j.args.get("a") for j, _ in out[:5]] == [0, 1, 2, 3, 4]
    assert [c for _, c in out] == [True] * 5 + [False, True, False]
    assert out[6][0].id == out[7][0].id


async def test_a_batch_answers_each_new_job_as_stored(queue: Queue) -> None:
    """The batch statement answers new jobs slim (run_at only where it is not the
    statement's now, now on one row); the jobs built from it equal what was stored."""
    past = datetime.now(UTC) - timedelta(hours=1)
    future = datetime.now(UTC) + timedelta(hours=1)
    reqs = [
        JobRequest(kind="noop"),
        JobRequest(kind="noop", delay_s=30.123457),
        JobRequest(kind="noop", run_at=past),
        JobRequest(kind="noop", run_at=future, priority=7, queue="other"),
        JobRequest(kind="add", args={"a": 1, "b": 2}, idempotency_key="batch-k"),
    ]
    out = await queue.enqueue_batch(reqs)
    assert [c for _, c in out] == [True] * 5
    for job, _ in out:
        stored = await queue.get(job.id)
        assert job.model_dump() == stored.model_dump()
    assert [j.state for j, _ in out] == [
        "available", "scheduled", "available", "scheduled", "available",
    ]  # fmt: skip
    ids = await queue.enqueue_batch_ids([*reqs[4:], JobRequest(kind="noop")])
    assert ids[0] == (out[4][0].id, False) and ids[1][1] is True


async def test_arguments_beyond_64_bits_are_stored_exactly(queue: Queue) -> None:
    """JSON for the database is orjson's, but for what orjson refuses (an integer beyond
    64 bits, which jsonb stores): the standard library's, on every path."""
    big = 2**70 + 1
    one, _ = await queue.enqueue(JobRequest(kind="add", args={"a": big}))
    (batched, _), _ = await queue.enqueue_batch(
        [JobRequest(kind="add", args={"a": -big}), JobRequest(kind="noop", delay_s=5)]
    )
    assert (await queue.get(one.id)).args == {"a": big}
    assert (await queue.get(batched.id)).args == {"a": -big}


async def test_a_batch_rejects_what_one_at_a_time_rejects(queue: Queue) -> None:
    """Arguments are validated per kind in one call; the error is the first invalid
    job's, worded as for that job alone, and nothing of the batch is stored."""
    cases = [
        ([JobRequest(kind="add", args={"a": 1}), JobRequest(kind="add", args={"a": "x"})],
         InvalidJob, "a: "),
        ([JobRequest(kind="noop"), JobRequest(kind="add", args={"a": 1, "zzz": 2}),
          JobRequest(kind="missing")], InvalidJob, "zzz: Extra inputs"),
        ([JobRequest(kind="noop"), JobRequest(kind="missing")], UnknownKind, "known kinds"),
        ([JobRequest(kind="add")], InvalidJob, "a: Field required"),
        ([JobRequest(kind="add", args={"a": float("nan")})], InvalidJob, "NaN"),
    ]  # fmt: skip
    for reqs, error, text in cases:
        with pytest.raises(error, match=text) as one_by_one:
            [app.prepare(r) for r in reqs]
        with pytest.raises(error, match=text) as batched:
            await queue.enqueue_batch(reqs)
        assert str(batched.value) == str(one_by_one.value)
    assert await queue.list() == []
    rows = app.prepare_many(
        [JobRequest(kind="add", args={"a": "3", "b": 4}), JobRequest(kind="noop")]
    )
    assert rows == [app.prepare(JobRequest(kind="add", args={"a": "3", "b": 4})),
                    app.prepare(JobRequest(kind="noop"))]  # fmt: skip


async def test_validation(queue: Queue) -> None:
    with pytest.raises(UnknownKind, match=r"known kinds: .*add"):
        await queue.enqueue(JobRequest(kind="missing"))
    with pytest.raises(InvalidJob, match="a: "):
        await queue.enqueue(JobRequest(kind="add", args={"a": "x"}))
    with pytest.raises(InvalidJob, match="zzz: Extra inputs"):
        await queue.enqueue(JobRequest(kind="add", args={"a": 1, "zzz": 2}))


async def test_delay_and_run_at_schedule(queue: Queue) -> None:
    job, _ = await queue.enqueue(JobRequest(kind="noop", delay_s=60))
    assert job.state == "scheduled"
    later = datetime.now(UTC) + timedelta(hours=1)
    job2, _ = await queue.enqueue(JobRequest(kind="noop", run_at=later))
    assert job2.state == "scheduled" and abs((job2.run_at - later).total_seconds()) < 1


async def test_a_wake_up_during_a_claim_is_not_lost(pool: Any, queue: Queue, db_url: str) -> None:
    """A job committed while a claim runs (after its snapshot, so the claim cannot see it)
    is claimed at once when its wake-up arrives during that claim, not a poll interval
    later."""
    settings = make_settings(db_url, worker_poll_interval_s=60)
    async with running_worker(pool, settings) as w:
        real_take = w.claims.take
        late: list[Any] = []
        enqueued = asyncio.Event()

        async def take(limit: int, skip: list[int]) -> list[dict[str, Any]]:
            rows = await real_take(limit, skip)
            if not late:  # the claim has run: a job commits, its NOTIFY arrives
                late.append((await queue.enqueue(JobRequest(kind="noop")))[0])
                w.wake()
                enqueued.set()
            return rows

        w.claims.take = take  # type: ignore[method-assign]
        w.wake()  # a claim that finds nothing
        await asyncio.wait_for(enqueued.wait(), 10)
        job = await wait_state(queue, late[0].id, {"succeeded"}, timeout=10)
        assert job.attempt == 1


async def test_priority_then_age_order(pool: Any, queue: Queue, settings: Settings) -> None:
    low = (await queue.enqueue(JobRequest(kind="noop", priority=-1)))[0]
    mid = (await queue.enqueue(JobRequest(kind="noop")))[0]
    high = (await queue.enqueue(JobRequest(kind="important")))[0]
    w = Worker(app, settings, pool, "00000000-0000-0000-0000-000000000002")
    claimed: list[Any] = []
    for _ in range(3):
        await w.claim(1)
        claimed.extend(w.running)
        for r in list(w.running.values()):
            assert r.task is not None
            await r.task
    assert claimed == [high.id, mid.id, low.id]


async def test_outcomes(pool: Any, queue: Queue, db_url: str) -> None:
    settings = make_settings(db_url)
    async with running_worker(pool, settings):
        ok = (await queue.enqueue(JobRequest(kind="add", args={"a": 2, "b": 3})))[0]
        flaky = (await queue.enqueue(JobRequest(kind="flaky", args={"succeed_on": 9})))[0]
        later = (await queue.enqueue(JobRequest(kind="retry_later")))[0]
        cancel = (await queue.enqueue(JobRequest(kind="give_up")))[0]
        slow = (await queue.enqueue(JobRequest(kind="too_slow")))[0]
        sync = (await queue.enqueue(JobRequest(kind="blocking")))[0]
        assert (await wait_state(queue, ok.id, {"succeeded"})).result == 5
        assert (await wait_state(queue, later.id, {"succeeded"})).attempt == 2
        assert (await wait_state(queue, cancel.id, {"cancelled"})).error["type"] == "Cancel"
        timed_out = await wait_state(queue, slow.id, {"failed"})
        assert "timed out" in timed_out.error["message"]
        assert (await wait_state(queue, sync.id, {"succeeded"})).result == "done"
        # flaky fails 3 times with backoff (full jitter up to 2s, 4s): then `failed`
        failed = await wait_state(queue, flaky.id, {"failed"}, timeout=30)
        assert failed.attempt == 3 and "attempt 3 fails" in failed.error["message"]
        # and a failed job can be retried by the API
        again = await queue.retry(flaky.id)
        assert again.state == "available" and again.max_attempts == 4
        with pytest.raises(InvalidTransition):
            await queue.retry(
                ok.id if False else (await queue.enqueue(JobRequest(kind="noop", delay_s=99)))[0].id
            )


async def test_cancel_waiting_and_running(pool: Any, queue: Queue, db_url: str) -> None:
    settings = make_settings(db_url, worker_cancel_grace_s=0.5)
    waiting = (await queue.enqueue(JobRequest(kind="noop", delay_s=60)))[0]
    assert (await queue.cancel(waiting.id)).state == "cancelled"
    with pytest.raises(InvalidTransition, match="already finished"):
        await queue.cancel(waiting.id)
    with pytest.raises(JobNotFound):
        await queue.cancel(10**12)
    async with running_worker(pool, settings) as w:
        polite = (await queue.enqueue(JobRequest(kind="obedient")))[0]
        rude = (await queue.enqueue(JobRequest(kind="stubborn")))[0]
        await wait_state(queue, polite.id, {"running"})
        await wait_state(queue, rude.id, {"running"})
        # The worker hears of the request (NOTIFY is not wired here: the heartbeat is).
        for job in (polite, rude):
            assert (await queue.cancel(job.id)).cancel_requested
            w.request_cancel(job.id)
        done = await wait_state(queue, polite.id, {"cancelled"})
        assert done.error["message"] == "asked to stop"
        hard = await wait_state(queue, rude.id, {"cancelled"})
        assert hard.error["type"] == "Cancelled"


async def test_progress_from_a_thread_is_stored_in_order(
    pool: Any, queue: Queue, db_url: str
) -> None:
    async with running_worker(pool, make_settings(db_url)):
        job = (await queue.enqueue(JobRequest(kind="progress_sync", args={"steps": 5})))[0]
        await wait_state(queue, job.id, {"succeeded"})
    async with pool.connection() as conn:
        rows = await (
            await conn.execute(
                "SELECT seq, type, data FROM tierline.job_stream WHERE job_id = %s ORDER BY seq",
                (job.id,),
            )
        ).fetchall()
    assert [r["type"] for r in rows] == ["enqueued", "started"] + ["progress"] * 5 + ["succeeded"]
    assert [r["seq"] for r in rows] == list(range(1, 9))
    assert rows[-2]["data"]["fraction"] == 1.0


async def test_list_pagination_and_filters(queue: Queue) -> None:
    ids = [(await queue.enqueue(JobRequest(kind="add", args={"a": i})))[0].id for i in range(7)]
    await queue.enqueue(JobRequest(kind="noop", queue="other"))
    page1 = await queue.list(kind="add", limit=3)
    page2 = await queue.list(kind="add", limit=3, before=page1[-1].id)
    page3 = await queue.list(kind="add", limit=3, before=page2[-1].id)
    assert [j.id for j in page1 + page2 + page3] == sorted(ids, reverse=True)
    assert [j.queue for j in await queue.list(queue="other")] == ["other"]


async def test_claim_walks_the_index_even_with_statistics_from_before_the_backlog(
    pool: Any,
) -> None:
    """Statistics taken while every job was scheduled for later say almost nothing is
    due; once the backlog is due, the claim must still walk `jobs_waiting_idx` in order
    and stop after `limit` rows, not read and sort the whole backlog."""
    explained = await plan_with_stale_statistics(
        pool,
        QUERIES["claim"],
        {"queues": ["default"], "limit": 4, "owner": OWNER, "lease_s": 30, "skip": []},
        before=QUERIES["claim_plan"],
    )
    plan = json.dumps(explained)
    assert "Bitmap" not in plan and "Seq Scan" not in plan, plan
    scans = [n for n in _nodes(explained[0]["Plan"]) if n.get("Index Name")]
    walk = next(n for n in scans if n["Index Name"] == "jobs_waiting_idx")
    assert walk["Node Type"] == "Index Scan" and walk["Actual Rows"] <= 4 * walk["Actual Loops"]


def _nodes(plan: dict[str, Any]) -> list[dict[str, Any]]:
    return [plan, *(n for child in plan.get("Plans", []) for n in _nodes(child))]
