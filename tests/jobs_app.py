"""An application for tests: handlers that record, fail, wait, and misbehave.

``record`` and ``slow_record`` insert into ``public.runs`` (see ``RUNS_TABLE``), which
the test creates first, so executions can be counted in the database.
"""

from __future__ import annotations

import asyncio
import os
import time
from typing import Any

from tierline import App, Cancel, JobContext, Retry

app = App("tests")
# What TIERLINE_APP names for processes that run this application.
TEST_APP = "tests.jobs_app:app"

RUNS_TABLE = (
    "CREATE TABLE IF NOT EXISTS public.runs (job_id bigint, token text, "
    "attempt int, pid int, at timestamptz DEFAULT clock_timestamp())"
)


@app.job()
async def noop() -> None:
    return None


@app.job()
async def add(a: int, b: int = 0) -> int:
    return a + b


@app.job()
async def record(ctx: JobContext, token: str) -> dict[str, Any]:
    """Leaves a row per run in the database, to count executions."""
    async with ctx.connection() as conn:
        await conn.execute(
            "INSERT INTO public.runs (job_id, token, attempt, pid) VALUES (%s, %s, %s, %s)",
            (ctx.job_id, token, ctx.attempt, os.getpid()),
        )
    return {"token": token}


@app.job()
async def slow_record(ctx: JobContext, token: str, seconds: float = 30.0) -> dict[str, Any]:
    """Records its run; the first attempt then sleeps ``seconds`` (to be killed mid-run)."""
    async with ctx.connection() as conn:
        await conn.execute(
            "INSERT INTO public.runs (job_id, token, attempt, pid) VALUES (%s, %s, %s, %s)",
            (ctx.job_id, token, ctx.attempt, os.getpid()),
        )
    if ctx.attempt == 1:
        await asyncio.sleep(seconds)
    return {"token": token}


@app.job(max_attempts=3)
async def flaky(ctx: JobContext, succeed_on: int = 2) -> int:
    if ctx.attempt < succeed_on:
        raise RuntimeError(f"attempt {ctx.attempt} fails")
    return ctx.attempt


@app.job()
async def retry_later(ctx: JobContext, delay: float = 0.2) -> int:
    if ctx.attempt == 1:
        raise Retry(delay=delay, reason="not yet")
    return ctx.attempt


@app.job()
async def give_up(reason: str = "no longer needed") -> None:
    raise Cancel(reason)


@app.job(max_attempts=1)
async def sleeper(seconds: float = 5.0) -> str:
    await asyncio.sleep(seconds)
    return "woke"


@app.job(max_attempts=1)
async def obedient(ctx: JobContext) -> str:
    """Stops when asked to."""
    await ctx.wait_cancel_requested()
    raise Cancel("asked to stop")


@app.job(max_attempts=1)
async def stubborn(seconds: float = 30.0) -> str:
    """Ignores cancel requests."""
    await asyncio.sleep(seconds)
    return "finished anyway"


@app.job(max_attempts=1, timeout=0.3)
async def too_slow() -> None:
    await asyncio.sleep(5)


@app.job()
def blocking(seconds: float = 0.05) -> str:
    """A plain function: runs in the thread pool."""
    time.sleep(seconds)
    return "done"


@app.job()
def progress_sync(ctx: JobContext, steps: int = 3) -> int:
    for i in range(steps):
        ctx.progress((i + 1) / steps, f"step {i + 1}")
    return steps


@app.job(max_attempts=2)
async def poison() -> None:
    """Kills the worker process outright."""
    os._exit(13)


@app.job(priority=5)
async def important() -> str:
    return "first"


@app.job(max_attempts=1)
async def chatty(ctx: JobContext, events: int = 100, size: int = 100, pause: float = 0.01) -> int:
    """Streams tests: ``events`` progress events of ``size`` characters each, pausing
    ``pause`` seconds after every tenth (so they reach the database in several batches)."""
    filler = "x" * size
    for i in range(1, events + 1):
        ctx.progress(i / events, f"{i}:{filler}")
        if i % 10 == 0:
            await asyncio.sleep(pause)
    return events


# -- reliability and security tests (tests/faults, test_bad_input) -------------------------
@app.job(max_attempts=2)
async def echo(payload: Any = None) -> Any:
    """Returns its argument unchanged: any JSON goes in, so hostile JSON can be tried."""
    return payload


@app.job(max_attempts=1, uses_db=True)
async def follow_up(ctx: JobContext, token: str, fail: bool = False) -> str:
    """Writes a run and enqueues ``record`` in the same transaction of its own
    connection; ``fail`` raises before the commit, so neither exists."""
    async with ctx.connection() as conn, conn.transaction():
        await conn.execute(
            "INSERT INTO public.runs (job_id, token, attempt, pid) VALUES (%s, %s, %s, %s)",
            (ctx.job_id, f"parent-{token}", ctx.attempt, os.getpid()),
        )
        await record.using(connection=conn).enqueue(token=token)
        if fail:
            raise RuntimeError("the handler failed before its transaction committed")
    return token
