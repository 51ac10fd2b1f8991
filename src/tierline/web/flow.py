"""Flow control over HTTP: change a queue's limits or pause it, retry a queue's failed
jobs, list the schedules. Changes need the ``admin`` scope when API keys are set."""

from __future__ import annotations

from typing import Annotated, Any

import psycopg
from fastapi import APIRouter, Path, Query
from pydantic import BaseModel, ConfigDict, Field, field_validator

from tierline import limits
from tierline.jobs import QUEUE_PATTERN
from tierline.queries import QUERIES
from tierline.schedules import listing
from tierline.web.errors import COMMON, ApiError
from tierline.web.runtime import Runtime, scoped

router = APIRouter(tags=["flow control"], responses=COMMON)
QueueName = Annotated[str, Path(pattern=QUEUE_PATTERN, description="Queue name.")]


class QueueChange(BaseModel):
    """Any of the fields; a field given as null removes that limit."""

    model_config = ConfigDict(extra="forbid")

    max_running: int | None = Field(
        None, ge=0, le=1_000_000, description="Jobs of the queue running at once, cluster-wide."
    )
    rate_limit: str | None = Field(
        None, max_length=40, description="Jobs started per interval: '20/s', '100/m', '5/10s'."
    )
    partition_by: str | None = Field(
        None, min_length=1, max_length=200, description="The limits hold per value of this arg."
    )
    paused: bool | None = Field(None, description="Stop starting the queue's jobs (or resume).")
    reset: bool = Field(False, description="Back to the code's declaration (app.queue) first.")

    @field_validator("rate_limit")
    @classmethod
    def _rate(cls, value: str | None) -> str | None:
        if value is not None:
            limits.Rate.parse(value)
        return value


@router.patch("/v1/queues/{name}")
async def change_queue(
    name: QueueName, body: QueueChange, rt: Runtime = scoped("admin")
) -> dict[str, Any]:
    """Change a queue's limits or pause/resume it, live, for every worker replica (stored
    in the database; a pause holds from this answer on, running jobs finish)."""
    changes = body.model_dump(exclude_unset=True)
    if not changes:
        raise ApiError(
            422, "invalid_request", "give max_running, rate_limit, partition_by, paused or reset"
        )
    async with rt.require_queue().pool.connection() as conn:
        return await limits.change(conn, name, changes)


@router.post("/v1/queues/{name}/retry-failed")
async def retry_failed(
    name: QueueName,
    limit: Annotated[int, Query(ge=1, le=10_000)] = 1000,
    rt: Runtime = scoped("admin"),
) -> dict[str, Any]:
    """Run the queue's failed jobs again (at most `limit`, oldest first)."""
    try:
        async with rt.require_queue().pool.connection() as conn, conn.transaction():
            row = await (
                await conn.execute(QUERIES["retry_failed"], {"queue": name, "limit": limit})
            ).fetchone()
    except psycopg.errors.UniqueViolation:
        raise ApiError(
            409,
            "conflict",
            "a failed unique job has a duplicate waiting or running; retry the others one by one",
        ) from None
    return {"queue": name, "retried": int(row["retried"]) if row else 0}


@router.get("/v1/schedules")
async def schedules(rt: Runtime = scoped("read")) -> dict[str, Any]:
    """Periodic jobs: the application's schedules, their last enqueued slot (and that
    job's state) and their next run."""
    async with rt.require_queue().pool.connection() as conn:
        rows = await (await conn.execute(QUERIES["schedule_list"])).fetchall()
    return {"schedules": listing(rt.app.schedules, rows)}
