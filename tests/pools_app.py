"""An application for the pool tests: handlers that hold pool connections.

``hold`` keeps a pool connection busy in the database for a while; ``needs_db`` records
its run in ``public.runs`` (created by the test template), so a test can see which attempt
got a connection.
"""

from __future__ import annotations

import os

from tierline import App, JobContext

app = App("pools")


@app.job(uses_db=True)
async def hold(ctx: JobContext, seconds: float = 3.0) -> str:
    """Holds one of the worker's pool connections for ``seconds``."""
    async with ctx.connection() as conn:
        await conn.execute("SELECT pg_sleep(%s)", (seconds,))
    return "held"


@app.job(uses_db=True)
async def needs_db(ctx: JobContext, token: str) -> int:
    """Needs a pool connection to do anything."""
    async with ctx.connection() as conn:
        await conn.execute(
            "INSERT INTO public.runs (job_id, token, attempt, pid) VALUES (%s, %s, %s, %s)",
            (ctx.job_id, token, ctx.attempt, os.getpid()),
        )
    return ctx.attempt


@app.job()
async def noop() -> None:
    return None
