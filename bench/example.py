"""The example application (``examples/reports``) as the web benchmarks host it (``--mix
app``): its environment, its table migrated by ``tierline migrate``, report rows to read
and a held backlog of its ``build_report`` jobs for the worker tier.

Started processes import ``examples`` through ``PYTHONPATH`` (``bench/NAME`` puts the
repository root on it).
"""

from __future__ import annotations

import subprocess
import sys
from datetime import datetime
from typing import Any

from bench import jobs
from tierline.testing.databases import query
from tierline.testing.processes import plain_env

# What the web replicas serve and the worker replicas run (see examples/reports).
ENV = {
    "TIERLINE_APP": "examples.reports.jobs:app",
    "TIERLINE_WEB_APP": "examples.reports.web:api",
}
API_PREFIX = "/tierline"  # Tierline's own API when an application is hosted (the default)
BACKLOG_QUEUE = "backlog"  # the held backlog, apart from the jobs POST /reports enqueues
# Each backlog job: 5 rows without a pause, so 5 progress events, then the UPDATE of its
# report row through ctx.connection(), and its result.
BACKLOG_ARGS: dict[str, Any] = {"rows": 5, "delay": 0.0}


def migrate(url: str) -> None:
    """``tierline migrate`` with the example as ``TIERLINE_APP``: its ``public.reports``."""
    done = subprocess.run(
        [sys.executable, "-m", "tierline", "migrate"],
        env=plain_env(url, TIERLINE_APP=ENV["TIERLINE_APP"]),
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    if done.returncode != 0:
        raise RuntimeError(f"tierline migrate (example) failed:\n{done.stderr[-3000:]}")


def insert_reports(url: str, n: int, *, title: str, status: str) -> tuple[int, int]:
    """``n`` rows in ``public.reports`` (one statement); their id range."""
    rows = query(
        url,
        "WITH r AS (INSERT INTO public.reports (title, rows, status, total, finished_at) "
        "SELECT %(t)s || ' ' || i, 5, %(s)s, CASE WHEN %(s)s = 'done' THEN i END, "
        "CASE WHEN %(s)s = 'done' THEN now() END FROM generate_series(1, %(n)s) AS i "
        "RETURNING id) SELECT min(id) AS lo, max(id) AS hi FROM r",
        {"t": title, "s": status, "n": n},
    )
    return int(rows[0]["lo"]), int(rows[0]["hi"])


def seed_for_reads(url: str, n: int) -> tuple[int, int]:
    """Migrate the example's table, then ``n`` finished reports to GET; their id range."""
    migrate(url)
    return insert_reports(url, n, title="seeded", status="done")


async def seed_backlog(url: str, n: int, batch: int = 1000) -> None:
    """``n`` queued reports and their ``build_report`` jobs (``BACKLOG_ARGS``) in queue
    ``BACKLOG_QUEUE``, held until ``jobs.release(url, BACKLOG_QUEUE)``."""
    from examples.reports.jobs import app as example_app

    from tierline.app import App
    from tierline.jobs import JobRequest

    lo, hi = insert_reports(url, n, title="backlog", status="queued")
    app = App("bench-example-producer", database_url=url)
    app.handlers.update(example_app.handlers)
    try:
        for start in range(lo, hi + 1, batch):
            await app.enqueue_many(
                [
                    JobRequest(
                        kind="build_report",
                        args={"report_id": rid, **BACKLOG_ARGS},
                        queue=BACKLOG_QUEUE,
                        delay_s=jobs.HELD_DELAY_S,
                    )
                    for rid in range(start, min(start + batch, hi + 1))
                ]
            )
    finally:
        queue = getattr(app, "_queue", None)  # App has no public close (yet)
        if queue is not None:
            await queue.pool.close()


def finished_since(url: str, queue: str, since: datetime) -> int:
    """Jobs of ``queue`` that finished (any final state) at or after ``since``."""
    rows = query(
        url,
        "SELECT count(*) AS n FROM tierline.jobs WHERE finished_at >= %(t)s AND queue = %(q)s",
        {"t": since, "q": queue},
    )
    return int(rows[0]["n"])
