"""An application for the executor tests: plain functions in the process and thread
executors that sleep past their timeout, die, report progress and say which process
ran them.

``sleepy`` and ``die`` leave a row per run in ``public.runs`` (``RUNS_TABLE`` of
``tests.jobs_app``) over a connection of their own, with the database's clock: a child
process has no pool, and the tests compare those times with the job's events.
"""

from __future__ import annotations

import os
import time
from typing import Any

import psycopg

from tierline import App, Cancel, JobContext, Retry

app = App("process-tests")
PROCESS_APP = "tests.process_app:app"


def record(ctx: JobContext, token: str) -> None:
    """A row in ``public.runs``: this job, attempt and process, at the database's time."""
    with psycopg.connect(os.environ["TIERLINE_DATABASE_URL"], autocommit=True) as conn:
        conn.execute(
            "INSERT INTO public.runs (job_id, token, attempt, pid) VALUES (%s, %s, %s, %s)",
            (ctx.job_id, token, ctx.attempt, os.getpid()),
        )


@app.job(executor="process", timeout=1, max_attempts=2)
def sleepy(ctx: JobContext, seconds: float = 10.0) -> int:
    """The first attempt sleeps past its 1 s timeout; the retry returns at once."""
    record(ctx, "start")
    if ctx.attempt == 1:
        time.sleep(seconds)
        record(ctx, "end")  # never, in a child: it is killed first
    return os.getpid()


@app.job(executor="thread", timeout=1, max_attempts=2)
def sleepy_thread(ctx: JobContext, seconds: float = 10.0) -> int:
    """``sleepy`` in a thread: the first attempt's thread outlives its timeout."""
    record(ctx, "start")
    if ctx.attempt == 1:
        time.sleep(seconds)
        record(ctx, "end")
    return os.getpid()


@app.job(executor="process", max_attempts=2)
def die(ctx: JobContext, code: int = 1) -> int:
    """The first attempt ends its process mid-job with ``os._exit(code)``."""
    record(ctx, "start")
    if ctx.attempt == 1:
        os._exit(code)
    return os.getpid()


@app.job(executor="process")
def whoami() -> int:
    """The pid of the process that ran it."""
    return os.getpid()


@app.job(executor="process", max_attempts=1)
def progress_child(ctx: JobContext, steps: int = 3) -> dict[str, Any]:
    for i in range(steps):
        ctx.progress((i + 1) / steps, f"step {i + 1}")
    ctx.log("logged from a child")
    return {"pid": os.getpid(), "steps": steps}


@app.job(executor="process", max_attempts=1)
def fail_child() -> None:
    raise ValueError("bad input, in a child")


@app.job(executor="process", max_attempts=2)
def retry_child(ctx: JobContext) -> int:
    if ctx.attempt == 1:
        raise Retry(delay=0.1, reason="once more")
    return ctx.attempt


@app.job(executor="process", max_attempts=1)
def cancel_child(ctx: JobContext, seconds: float = 30.0) -> None:
    """Polls ``ctx.cancel_requested`` and stops when asked to."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if ctx.cancel_requested:
            raise Cancel("asked to stop, in a child")
        time.sleep(0.02)


@app.job(executor="process", max_attempts=1)
def stubborn_child(seconds: float = 30.0) -> None:
    """Ignores cancel requests: cancelled hard, its child is killed."""
    time.sleep(seconds)


@app.job()
async def noop() -> None:
    return None


@app.job(executor="thread")
def nap(seconds: float = 1.0) -> None:
    """A thread-executor job that keeps a slot busy for ``seconds``."""
    time.sleep(seconds)
