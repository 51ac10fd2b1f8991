"""Enqueueing, written once: the steps of an enqueue (validate, insert, settle an
idempotency-key race, count) as a generator of SQL statements, and three small drivers
that run them: on a pool (a tier's, or a producer's own), on the caller's
``psycopg.AsyncConnection``, or on the caller's ``psycopg.Connection``.

On the caller's connection the insert joins the caller's transaction: the job is
invisible to workers until the caller commits, does not exist if it rolls back, and its
wake-up NOTIFY is delivered at commit (PostgreSQL holds notifications until then).
"""

from __future__ import annotations

import functools
import json
from collections.abc import Callable, Generator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, LiteralString, Protocol, TypeVar

import orjson
import psycopg
from psycopg.rows import dict_row
from psycopg.types.json import Jsonb
from psycopg_pool import AsyncConnectionPool

from tierline import metrics
from tierline.database import Conn, borrow, statement_cursor
from tierline.errors import InvalidTransition
from tierline.jobs import Job, JobRequest, State
from tierline.queries import QUERIES

T = TypeVar("T")
Rows = list[dict[str, Any]]
AnyConnection = psycopg.AsyncConnection[Any] | psycopg.Connection[Any]


class Registry(Protocol):
    """What an enqueue needs of the application: the row to insert for a request (the
    handler's defaults filled in, the arguments validated). ``tierline.App`` is one."""

    def prepare(self, request: JobRequest, *, max_args_bytes: int = ...) -> dict[str, Any]: ...

    def prepare_many(
        self, requests: Sequence[JobRequest], *, max_args_bytes: int = ...
    ) -> list[dict[str, Any]]: ...


@dataclass(frozen=True)
class Statement:
    """One statement of the steps. ``repeatable``: safe to run again on a fresh
    connection when its connection broke under it. ``check``: run in a transaction (a
    savepoint inside the caller's) that is rolled back, answering None, when the rows
    fail the check."""

    query: LiteralString
    params: dict[str, Any]
    repeatable: bool = False
    check: Callable[[Rows], bool] | None = None


Steps = Generator[Statement, "Rows | None", T]
KEY_RACE = "idempotency key conflict did not settle; try again"
# The columns a row to insert may set (``App.prepare``); a row leaves out those that stay
# NULL. The batch sends its rows as they are; one job's statement names every column.
ROW_KEYS = (
    "queue", "kind", "args", "priority", "run_at", "delay_s", "max_attempts", "timeout_s",
    "idempotency_key", "trace_context", "unique_key", "unique_period_s", "unique_states",
)  # fmt: skip
_NULLS = dict.fromkeys(ROW_KEYS)


def single_params(row: dict[str, Any]) -> dict[str, Any]:
    """The parameters of ``QUERIES["enqueue"]`` for a prepared row."""
    trace = row.get("trace_context")
    return {
        **_NULLS,
        **row,
        "args": Jsonb(row.get("args") or {}, dumps=dumps),
        "trace_context": trace and Jsonb(trace, dumps=dumps),
    }


def dumps(value: Any) -> bytes | str:
    """JSON for the database: orjson (a batch of 1,000 jobs in 0.1 ms; the standard
    library's encoder took 2 ms, a fifth of the batch's client time), the standard
    library for what orjson refuses (an integer beyond 64 bits, which jsonb stores)."""
    try:
        return orjson.dumps(value)
    except orjson.JSONEncodeError:
        return json.dumps(value, separators=(",", ":"), default=_iso)


def _iso(value: Any) -> str:
    if isinstance(value, datetime):
        return value.isoformat()
    raise TypeError(f"{type(value).__name__} is not JSON")


# -- the steps ------------------------------------------------------------------------------
def one(registry: Registry, request: JobRequest, max_args_bytes: int) -> Steps[tuple[Job, bool]]:
    """Insert one job; ``(job, created)``; created is False for a repeated key."""
    row = registry.prepare(request, max_args_bytes=max_args_bytes)
    params = single_params(row)
    keyed = (row.get("idempotency_key") or row.get("unique_key")) is not None
    for _ in range(3):
        # With a key, running the insert again is safe even if the first one committed.
        rows = yield Statement(QUERIES["enqueue"], params, repeatable=keyed)
        if rows:
            _enqueued(row["queue"]).inc()
            new = rows[0]
            run_at, created_at = new["run_at"], new["created_at"]
            state = State.scheduled if run_at > created_at else State.available
            return _new_job(row, {**new, "state": state}), True
        # Nothing inserted: a job holds the key. Read it (it may have been pruned, or
        # left the unique key's states, in between: then insert again).
        got = yield Statement(QUERIES["job_by_key"], _key_params(row), repeatable=True)
        if got:
            return Job.from_row(got[0]), False
    raise InvalidTransition(KEY_RACE)


def many(
    registry: Registry, requests: Sequence[JobRequest], max_args_bytes: int, *, jobs: bool
) -> Steps[list[tuple[Any, bool]]]:
    """Insert many jobs in one statement and one transaction; ``(job, created)`` in
    input order, or ``(id, created)`` when ``jobs`` is False (the fast path)."""
    rows = registry.prepare_many(requests, max_args_bytes=max_args_bytes)
    if not rows:
        return []
    unique, position = _dedupe(rows)
    params = {"batch": Jsonb(unique, dumps=dumps)}
    for _ in range(3):
        # A key committed by someone else meanwhile leaves a row without an id: undo, again.
        found = yield Statement(
            QUERIES["enqueue_batch"],
            params,
            check=lambda got: len(got) == len(unique) and all(r["id"] is not None for r in got),
        )
        if found is not None:
            break
    else:  # pragma: no cover - three concurrent collisions in a row
        raise InvalidTransition(KEY_RACE)
    _count(unique, found)
    if not jobs:
        return _expand([(r["id"], bool(r["created"])) for r in found], position)
    existing = [r["id"] for r in found if not r["created"]]
    known: dict[int, Job] = {}
    if existing:
        got = yield Statement(QUERIES["get_jobs"], {"ids": existing}, repeatable=True)
        known = {r["id"]: Job.from_row(r) for r in got or []}
    now = found[0]["now"]
    made = [
        (_batch_job(row, r, now) if r["created"] else known[r["id"]], bool(r["created"]))
        for row, r in zip(unique, found, strict=True)
    ]
    return _expand(made, position)


# -- the drivers ----------------------------------------------------------------------------
async def on_pool(pool: AsyncConnectionPool[Conn], steps: Steps[T]) -> T:
    """Each statement on a pooled connection of its own (its own transaction)."""
    rows: Rows | None = None
    while True:
        try:
            statement = steps.send(rows)
        except StopIteration as done:
            return done.value  # type: ignore[no-any-return]
        rows = await _pooled(pool, statement)


async def on_connection(conn: psycopg.AsyncConnection[Any], steps: Steps[T]) -> T:
    """Every statement on the caller's connection, inside its transaction if it has one."""
    rows: Rows | None = None
    while True:
        try:
            statement = steps.send(rows)
        except StopIteration as done:
            return done.value  # type: ignore[no-any-return]
        cur = conn.cursor(row_factory=dict_row)
        if statement.check is None:
            await cur.execute(statement.query, statement.params)
            rows = await cur.fetchall()
            continue
        try:
            async with conn.transaction():  # a savepoint inside the caller's transaction
                await cur.execute(statement.query, statement.params)
                rows = _checked(statement, await cur.fetchall())
        except _Undo:
            rows = None


def on_sync_connection(conn: psycopg.Connection[Any], steps: Steps[T]) -> T:
    """``on_connection`` for a synchronous caller's connection."""
    rows: Rows | None = None
    while True:
        try:
            statement = steps.send(rows)
        except StopIteration as done:
            return done.value  # type: ignore[no-any-return]
        cur = conn.cursor(row_factory=dict_row)
        if statement.check is None:
            cur.execute(statement.query, statement.params)
            rows = cur.fetchall()
            continue
        try:
            with conn.transaction():
                cur.execute(statement.query, statement.params)
                rows = _checked(statement, cur.fetchall())
        except _Undo:
            rows = None


async def _pooled(pool: AsyncConnectionPool[Conn], statement: Statement) -> Rows | None:
    """Run one statement on a pooled (autocommit) connection, in a transaction only when
    it has a check; when its connection dies under it (terminated, server restarted:
    ``conn.broken``), run it once more on a fresh connection if it is ``repeatable``."""
    tries = 2 if statement.repeatable else 1
    for attempt in range(1, tries + 1):
        used: Conn | None = None
        try:
            async with borrow(pool) as conn:
                used = conn
                if statement.check is None:
                    cur = await statement_cursor(conn).execute(statement.query, statement.params)
                    return await cur.fetchall()
                async with conn.transaction():
                    cur = await statement_cursor(conn).execute(statement.query, statement.params)
                    return _checked(statement, await cur.fetchall())
        except _Undo:
            return None
        except psycopg.OperationalError:
            if attempt == tries or used is None or not used.broken:
                raise  # a pool timeout, a query error, or no tries left
    raise AssertionError("unreachable")


def _checked(statement: Statement, rows: Rows) -> Rows:
    if statement.check is not None and not statement.check(rows):
        raise _Undo
    return rows


class _Undo(Exception):
    """Roll the statement's transaction (or savepoint) back."""


# -- helpers --------------------------------------------------------------------------------
def _dedupe(rows: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], list[int]]:
    """A key (idempotency or unique) repeated inside the batch is one job: later copies
    map to the first."""
    if not any("idempotency_key" in row or "unique_key" in row for row in rows):
        return rows, list(range(len(rows)))  # no keys, no duplicates: the common case
    first_of: dict[tuple[Any, ...], int] = {}
    unique: list[dict[str, Any]] = []
    position: list[int] = []
    for row in rows:
        keys: list[tuple[Any, ...]] = []
        if row.get("idempotency_key") is not None:
            keys.append(("idempotency", row["idempotency_key"]))
        if row.get("unique_key") is not None:
            keys.append(("unique", row["unique_key"], row.get("unique_period_s")))
        seen = next((first_of[k] for k in keys if k in first_of), None)
        if seen is not None:
            position.append(seen)
            continue
        for k in keys:
            first_of[k] = len(unique)
        position.append(len(unique))
        unique.append(row)
    return unique, position


def _count(unique: list[dict[str, Any]], found: Rows) -> None:
    created_per_queue: dict[str, int] = {}
    for row, r in zip(unique, found, strict=True):
        if r["created"]:
            created_per_queue[row["queue"]] = created_per_queue.get(row["queue"], 0) + 1
    for queue, n in created_per_queue.items():
        _enqueued(queue).inc(n)


def _expand(items: list[tuple[Any, bool]], position: list[int]) -> list[tuple[Any, bool]]:
    """Map de-duplicated results back to the caller's rows (a repeat is not 'created')."""
    seen: set[int] = set()
    out = []
    for pos in position:
        item, created = items[pos]
        out.append((item, created and pos not in seen))
        seen.add(pos)
    return out


def _batch_job(row: dict[str, Any], r: dict[str, Any], now: datetime) -> Job:
    """A new job of a batch: the statement answers ``run_at`` only where it is not the
    statement's ``now`` (a delayed or scheduled job), and the state follows from the two
    as the statement's own ``CASE`` made it."""
    run_at = r["run_at"] or now
    state = State.scheduled if run_at > now else State.available
    return _new_job(row, {"id": r["id"], "state": state, "run_at": run_at, "created_at": now})


def _new_job(row: dict[str, Any], r: dict[str, Any]) -> Job:
    """The Job a fresh insert made, from its input and what the database added: a copy of
    a blank job with those fields set (every value is validated already: the input by
    ``prepare``, the rest by the database), 40 % cheaper than validating a new one."""
    return _BLANK.model_copy(
        update={
            "id": r["id"],
            "kind": row["kind"],
            "queue": row["queue"],
            "state": State(r["state"]),
            "args": row.get("args") or {},
            "priority": row["priority"],
            "max_attempts": row["max_attempts"],
            "timeout_s": None if row.get("timeout_s") is None else float(row["timeout_s"]),
            "idempotency_key": row.get("idempotency_key"),
            "run_at": r["run_at"],
            "created_at": r["created_at"],
            "updated_at": r["created_at"],
        }
    )


_BLANK = Job(
    id=0,
    kind="",
    queue="",
    state=State.available,
    args={},
    priority=0,
    attempt=0,
    max_attempts=1,
    timeout_s=None,
    idempotency_key=None,
    run_at=datetime.fromtimestamp(0, UTC),
    created_at=datetime.fromtimestamp(0, UTC),
    updated_at=datetime.fromtimestamp(0, UTC),
    started_at=None,
    finished_at=None,
)


@functools.cache
def _enqueued(queue: str) -> Any:
    return metrics.JOBS_ENQUEUED.labels(queue)  # labels() costs a lock and a lookup


def _key_params(row: dict[str, Any]) -> dict[str, Any]:
    return {
        "idempotency_key": row.get("idempotency_key"),
        "unique_key": row.get("unique_key"),
        "unique_period_s": row.get("unique_period_s"),
    }
