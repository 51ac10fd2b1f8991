"""What only Tierline's own tests share: the repository's folders, the headless browser,
the reliability report, and a backlog with stale statistics for plan tests.

The harness they use (databases, servers, processes, HTTP) is ``tierline.testing``.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
ARTIFACTS = ROOT / "test-artifacts"
REPORT = ARTIFACTS / "reliability.jsonl"
# Debian's Chromium, headless and offline (no background calls out of this machine).
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]


def report(test: str, **figures: Any) -> None:
    """Append one test's figures to ``test-artifacts/reliability.jsonl`` (for the docs)."""
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    line = {"test": test, "at": time.strftime("%Y-%m-%dT%H:%M:%S"), **figures}
    with REPORT.open("a") as f:
        f.write(json.dumps(line, default=str) + "\n")


async def plan_with_stale_statistics(
    pool: Any, query: str, params: Any = None, *, before: str | None = None
) -> list[dict[str, Any]]:
    """The ``EXPLAIN ANALYZE`` plan (JSON) of ``query`` on a backlog whose statistics
    promise almost no due job: 5,000 jobs enqueued for later, analysed, then all made due.
    ``before`` runs first in the same (rolled back) transaction."""
    from tests.jobs_app import app
    from tierline.jobs import JobRequest
    from tierline.queue import Queue

    await Queue(app, pool).enqueue_batch(
        [JobRequest(kind="noop", delay_s=3600) for _ in range(5000)]
    )
    async with pool.connection() as conn:
        await conn.execute("ANALYZE tierline.jobs")  # every job in the future
        await conn.execute("UPDATE tierline.jobs SET run_at = now(), state = 'available'")
        async with conn.transaction(force_rollback=True):
            if before:
                await conn.execute(before)
            cur = await conn.execute("EXPLAIN (ANALYZE, FORMAT JSON) " + query, params)
            (row,) = await cur.fetchall()
    plan: list[dict[str, Any]] = row["QUERY PLAN"]
    return plan
