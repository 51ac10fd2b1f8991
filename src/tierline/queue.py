"""The producer and admin side of the queue: enqueue, read, cancel, retry, statistics."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, LiteralString, Protocol

import psycopg
from psycopg.types.json import Jsonb
from psycopg_pool import AsyncConnectionPool

from tierline import metrics
from tierline.database import Conn, standalone_pool
from tierline.errors import InvalidTransition, JobNotFound
from tierline.jobs import Job, JobRequest, State
from tierline.queries import QUERIES

MAX_ARGS_BYTES = 262_144
Rows = list[dict[str, Any]]  # (a name: inside Queue, `list` is the method below)


class Registry(Protocol):
    """What the queue needs of the application: the row to insert for a request (the
    handler's defaults filled in, the arguments validated). ``tierline.App`` is one; the
    queue does not import it, so that the application can own its queue."""

    def prepare(self, request: JobRequest, *, max_args_bytes: int = ...) -> dict[str, Any]: ...


class Queue:
    """Queue operations over a connection pool."""

    def __init__(
        self,
        app: Registry,
        pool: AsyncConnectionPool[Conn],
        *,
        max_args_bytes: int = MAX_ARGS_BYTES,
    ) -> None:
        self.app = app
        self.pool = pool
        self.max_args_bytes = max_args_bytes

    @classmethod
    async def standalone(
        cls, app: Registry, dsn: str, *, max_args_bytes: int = MAX_ARGS_BYTES
    ) -> Queue:
        """A small private pool, for processes that only enqueue."""
        pool = standalone_pool(dsn)
        await pool.open(wait=True, timeout=10)
        return cls(app, pool, max_args_bytes=max_args_bytes)

    # -- enqueue ----------------------------------------------------------------------------
    async def enqueue(self, request: JobRequest) -> tuple[Job, bool]:
        """Insert one job; ``(job, created)``; created is False for a repeated key."""
        row = self.app.prepare(request, max_args_bytes=self.max_args_bytes)
        params = {**row, "args": Jsonb(row["args"])}
        # With a key, running the insert again is safe even if the first one committed.
        tries = 2 if request.idempotency_key is not None else 1
        for _ in range(3):
            rows = await self._fetch(QUERIES["enqueue"], params, tries=tries)
            found = rows[0] if rows else None
            if found:  # empty only when the same key was committed concurrently
                if found["created"]:
                    metrics.JOBS_ENQUEUED.labels(found["queue"]).inc()
                return Job.from_row(found), bool(found["created"])
        raise InvalidTransition("idempotency key conflict did not settle; try again")

    async def enqueue_batch(self, requests: Sequence[JobRequest]) -> list[tuple[Job, bool]]:
        """Insert many jobs in one statement and one transaction; ``(job, created)`` in
        input order."""
        unique, position, found = await self._insert_batch(requests)
        existing = [r["id"] for r in found if not r["created"]]
        known: dict[int, Job] = {}
        if existing:
            async with self.pool.connection() as conn:
                cur = await conn.execute(QUERIES["get_jobs"], {"ids": existing})
                known = {r["id"]: Job.from_row(r) for r in await cur.fetchall()}
        jobs = [
            (_new_job(row, r) if r["created"] else known[r["id"]], bool(r["created"]))
            for row, r in zip(unique, found, strict=True)
        ]
        return _expand(jobs, position)

    async def enqueue_batch_ids(self, requests: Sequence[JobRequest]) -> list[tuple[int, bool]]:
        """Like ``enqueue_batch`` but answers only ``(id, created)``: the fast path."""
        _, position, found = await self._insert_batch(requests)
        return _expand([(r["id"], bool(r["created"])) for r in found], position)

    async def _insert_batch(
        self, requests: Sequence[JobRequest]
    ) -> tuple[list[dict[str, Any]], list[int], list[dict[str, Any]]]:
        rows = [self.app.prepare(r, max_args_bytes=self.max_args_bytes) for r in requests]
        if not rows:
            return [], [], []
        # A key repeated inside the batch is one job: later copies map to the first.
        first_of: dict[str, int] = {}
        unique: list[dict[str, Any]] = []
        position: list[int] = []
        for row in rows:
            key = row["idempotency_key"]
            if key is not None and key in first_of:
                position.append(first_of[key])
                continue
            if key is not None:
                first_of[key] = len(unique)
            position.append(len(unique))
            unique.append(row)
        params = {"batch": Jsonb([_json_row(r) for r in unique])}
        found: list[dict[str, Any]] = []
        for _ in range(3):
            try:
                async with self.pool.connection() as conn, conn.transaction():
                    cur = await conn.execute(QUERIES["enqueue_batch"], params)
                    found = await cur.fetchall()
                    if len(found) != len(unique) or any(r["id"] is None for r in found):
                        # A key was committed by someone else meanwhile: undo, run again.
                        raise _KeyRace
                break
            except _KeyRace:
                continue
        else:  # pragma: no cover - three concurrent collisions in a row
            raise InvalidTransition("idempotency key conflict did not settle; try again")
        created_per_queue: dict[str, int] = {}
        for row, r in zip(unique, found, strict=True):
            if r["created"]:
                created_per_queue[row["queue"]] = created_per_queue.get(row["queue"], 0) + 1
        for queue, n in created_per_queue.items():
            metrics.JOBS_ENQUEUED.labels(queue).inc(n)
        return unique, position, found

    # -- read -------------------------------------------------------------------------------
    async def get(self, job_id: int) -> Job:
        rows = await self._fetch(QUERIES["get_job"], {"id": job_id})
        if not rows:
            raise JobNotFound(f"job {job_id} not found")
        return Job.from_row(rows[0])

    async def list(
        self,
        *,
        queue: str | None = None,
        state: str | None = None,
        kind: str | None = None,
        before: int | None = None,
        limit: int = 50,
    ) -> list[Job]:
        rows = await self._fetch(
            QUERIES["list_jobs"],
            {"queue": queue, "state": state, "kind": kind, "before": before, "limit": limit},
        )
        return [Job.from_row(r) for r in rows]

    async def _fetch(self, query: LiteralString, params: dict[str, Any], *, tries: int = 2) -> Rows:
        """Run one statement; when its connection dies under it (terminated, server
        restarted: ``conn.broken``), run it once more on a fresh connection if ``tries``
        allows. Only for statements that are safe to repeat."""
        for attempt in range(1, tries + 1):
            used: Conn | None = None
            try:
                async with self.pool.connection() as conn:
                    used = conn
                    cur = await conn.execute(query, params)
                    return await cur.fetchall()
            except psycopg.OperationalError:
                if attempt == tries or used is None or not used.broken:
                    raise  # a pool timeout, a query error, or no tries left
        raise AssertionError("unreachable")

    # -- change -----------------------------------------------------------------------------
    async def cancel(self, job_id: int) -> Job:
        """Cancel a waiting job now, or ask its worker to stop a running one."""
        return await self._transition("cancel", job_id, "it has already finished")

    async def retry(self, job_id: int) -> Job:
        """Run a finished (failed, cancelled or succeeded) job again."""
        return await self._transition("retry", job_id, "only finished jobs can be retried")

    async def _transition(self, name: str, job_id: int, refusal: str) -> Job:
        async with self.pool.connection() as conn, conn.transaction():
            cur = await conn.execute(QUERIES[name], {"id": job_id})
            row = await cur.fetchone()
        if row is None:
            raise JobNotFound(f"job {job_id} not found")
        if not row["changed"]:
            raise InvalidTransition(f"job {job_id} is {row['state']}: {refusal}")
        return Job.from_row(row)


def _expand(items: list[tuple[Any, bool]], position: list[int]) -> list[tuple[Any, bool]]:
    """Map de-duplicated results back to the caller's rows (a repeat is not 'created')."""
    seen: set[int] = set()
    out = []
    for pos in position:
        item, created = items[pos]
        out.append((item, created and pos not in seen))
        seen.add(pos)
    return out


def _new_job(row: dict[str, Any], r: dict[str, Any]) -> Job:
    """The Job a fresh insert made, from its input and what the database added."""
    return Job.model_construct(
        id=r["id"],
        kind=row["kind"],
        queue=row["queue"],
        state=State(r["state"]),
        args=row["args"],
        priority=row["priority"],
        attempt=0,
        max_attempts=row["max_attempts"],
        timeout_s=row["timeout_s"],
        idempotency_key=row["idempotency_key"],
        run_at=r["run_at"],
        created_at=r["created_at"],
        updated_at=r["created_at"],
        started_at=None,
        finished_at=None,
        result=None,
        error=None,
        progress=None,
        cancel_requested=False,
    )


def _json_row(row: dict[str, Any]) -> dict[str, Any]:
    run_at = row["run_at"]
    return {**row, "run_at": run_at.isoformat() if run_at is not None else None}


class _KeyRace(Exception):
    pass
