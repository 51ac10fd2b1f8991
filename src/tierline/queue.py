"""The producer and admin side of the queue: enqueue, read, cancel, retry, statistics."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, LiteralString, Protocol, TypeVar

import psycopg
from psycopg_pool import AsyncConnectionPool

from tierline import enqueue as enqueueing
from tierline.database import Conn, borrow, standalone_pool, statement_cursor
from tierline.enqueue import Registry
from tierline.errors import InvalidTransition, JobNotFound
from tierline.jobs import Job, JobRequest
from tierline.queries import QUERIES

MAX_ARGS_BYTES = 262_144
Rows = list[dict[str, Any]]  # (a name: inside Queue, `list` is the method below)
T = TypeVar("T")


class Reads(Protocol):
    """Where reads go when not to the queue's pool (``read_routing.ReadRouter``)."""

    async def fetch(
        self,
        query: LiteralString,
        params: dict[str, Any],
        *,
        primary_if: Callable[[Rows], bool] | None = None,
    ) -> tuple[Rows, Any]: ...


class Queue:
    """Queue operations over a connection pool. ``reads``: where ``get`` and ``list`` go
    (the web tier's read routing); writes always use the pool."""

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
        self.reads: Reads | None = None

    @classmethod
    async def standalone(
        cls, app: Registry, dsn: str, *, max_args_bytes: int = MAX_ARGS_BYTES
    ) -> Queue:
        """A small private pool, for processes that only enqueue."""
        pool = standalone_pool(dsn)
        await pool.open(wait=True, timeout=10)
        return cls(app, pool, max_args_bytes=max_args_bytes)

    # -- enqueue ----------------------------------------------------------------------------
    async def enqueue(
        self, request: JobRequest, *, connection: psycopg.AsyncConnection[Any] | None = None
    ) -> tuple[Job, bool]:
        """Insert one job; ``(job, created)``; created is False for a repeated key.
        ``connection``: the caller's, whose transaction the insert joins."""
        return await self._run(enqueueing.one(self.app, request, self.max_args_bytes), connection)

    async def enqueue_batch(
        self,
        requests: Sequence[JobRequest],
        *,
        connection: psycopg.AsyncConnection[Any] | None = None,
    ) -> list[tuple[Job, bool]]:
        """Insert many jobs in one statement and one transaction; ``(job, created)`` in
        input order."""
        steps = enqueueing.many(self.app, requests, self.max_args_bytes, jobs=True)
        return await self._run(steps, connection)

    async def enqueue_batch_ids(
        self,
        requests: Sequence[JobRequest],
        *,
        connection: psycopg.AsyncConnection[Any] | None = None,
    ) -> list[tuple[int, bool]]:
        """Like ``enqueue_batch`` but answers only ``(id, created)``: the fast path."""
        steps = enqueueing.many(self.app, requests, self.max_args_bytes, jobs=False)
        return await self._run(steps, connection)

    async def _run(
        self, steps: enqueueing.Steps[T], connection: psycopg.AsyncConnection[Any] | None
    ) -> T:
        if connection is not None:
            return await enqueueing.on_connection(connection, steps)
        return await enqueueing.on_pool(self.pool, steps)

    # -- read -------------------------------------------------------------------------------
    async def get(self, job_id: int) -> Job:
        # A job the replica has not replayed yet (just enqueued) is asked of the primary.
        rows = await self._read(QUERIES["get_job"], {"id": job_id}, primary_if=_empty)
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
        rows = await self._read(
            QUERIES["list_jobs"],
            {"queue": queue, "state": state, "kind": kind, "before": before, "limit": limit},
        )
        return [Job.from_row(r) for r in rows]

    async def _read(
        self,
        query: LiteralString,
        params: dict[str, Any],
        *,
        primary_if: Callable[[Rows], bool] | None = None,
    ) -> Rows:
        if self.reads is None:
            return await self._fetch(query, params)
        rows, _ = await self.reads.fetch(query, params, primary_if=primary_if)
        return rows

    async def _fetch(self, query: LiteralString, params: dict[str, Any], *, tries: int = 2) -> Rows:
        """Run one statement; when its connection dies under it (terminated, server
        restarted: ``conn.broken``), run it once more on a fresh connection if ``tries``
        allows. Only for statements that are safe to repeat."""
        for attempt in range(1, tries + 1):
            used: Conn | None = None
            try:
                async with borrow(self.pool) as conn:
                    used = conn
                    cur = await statement_cursor(conn).execute(query, params)
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
        try:
            async with self.pool.connection() as conn, conn.transaction():
                cur = await conn.execute(QUERIES[name], {"id": job_id})
                row = await cur.fetchone()
        except psycopg.errors.UniqueViolation:  # a unique job (unique.py) runs again
            raise InvalidTransition(
                f"job {job_id} is unique and a job with the same key is waiting or running"
            ) from None
        if row is None:
            raise JobNotFound(f"job {job_id} not found")
        if not row["changed"]:
            raise InvalidTransition(f"job {job_id} is {row['state']}: {refusal}")
        return Job.from_row(row)


def _empty(rows: Rows) -> bool:
    return not rows
