"""The benchmarks' database and jobs: a fresh migrated database per run, jobs seeded
through a producer ``App`` (held until released, so workers start first), their release
and the count of unfinished ones."""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import AsyncIterator, Iterator
from datetime import datetime
from typing import Any

from tierline.testing.databases import migrate, query, scratch_database


@contextlib.contextmanager
def fresh_database(server_url: str) -> Iterator[str]:
    """A new, migrated ``tierline_bench_*`` database, dropped afterwards."""
    with scratch_database(server_url, f"tierline_bench_{uuid.uuid4().hex[:10]}") as url:
        migrate(url)
        yield url


HELD_DELAY_S = 30 * 86400.0  # "pre-enqueued": due far in the future until released


@contextlib.asynccontextmanager
async def producer(url: str) -> AsyncIterator[Any]:
    """An ``App`` that knows the benchmark's job kinds and enqueues into ``url``, as a
    separate producer process would; its private pool is closed at the end."""
    from bench.apps import app as bench_app
    from tierline.app import App

    app = App("bench-producer", database_url=url)
    app.handlers.update(bench_app.handlers)
    try:
        yield app
    finally:
        # App has no public close (yet): the private pool of this event loop's queue.
        own = getattr(app.producer, "_own", {})
        queue = own.get(asyncio.get_running_loop())
        if queue is not None:
            await queue.pool.close()


async def seed(
    url: str,
    kind: str,
    args: dict[str, Any],
    n: int,
    *,
    held: bool = False,
    batch: int = 1000,
    queue: str | None = None,
) -> None:
    """Enqueue ``n`` demo jobs with ``App.enqueue_many``; ``held`` ones wait until
    ``release`` makes them due, so workers can be started and ready first."""
    from tierline.jobs import JobRequest

    options: dict[str, Any] = {"delay_s": HELD_DELAY_S} if held else {}
    if queue:
        options["queue"] = queue
    async with producer(url) as app:
        for start in range(0, n, batch):
            count = min(batch, n - start)
            await app.enqueue_many([JobRequest(kind=kind, args=args, **options)] * count)


def release(url: str, queue: str = "default") -> datetime:
    """Make every held job due now and wake the workers; returns the commit's time."""
    rows = query(
        url,
        "WITH u AS (UPDATE tierline.jobs SET run_at = now(), state = 'available' "
        "WHERE state = 'scheduled' AND queue = %(q)s RETURNING 1) "
        "SELECT count(*) AS n, pg_notify('tierline_jobs', %(q)s) IS NULL AS x, "
        "clock_timestamp() AS at FROM u",
        {"q": queue},
    )
    at: datetime = rows[0]["at"]
    return at


def unfinished(url: str, queue: str = "default") -> int:
    """Jobs of ``queue`` not yet finished (cheap: both partial indexes)."""
    rows = query(
        url,
        "SELECT (SELECT count(*) FROM tierline.jobs WHERE queue = %(q)s AND state IN "
        "('scheduled', 'available', 'retrying', 'running')) AS n",
        {"q": queue},
    )
    return int(rows[0]["n"])
