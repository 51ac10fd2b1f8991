"""Queue upkeep, done by one worker at a time: rescue expired leases, promote due jobs,
enqueue the schedules' due slots (``schedules.py``), prune finished jobs and old rate
window entries. Each worker first stores its application's queue limits and schedules.

Every worker ticks; a transaction-scoped advisory lock picks one per tick (safe behind
PgBouncer), and every statement uses SKIP LOCKED so an overlap costs nothing.
"""

from __future__ import annotations

import asyncio
import random
import time
from typing import TYPE_CHECKING

from psycopg_pool import AsyncConnectionPool

from tierline import limits, metrics
from tierline.database import Conn, describe_error
from tierline.logs import get_logger
from tierline.queries import QUERIES
from tierline.schedules import Scheduler
from tierline.settings import Settings

if TYPE_CHECKING:
    from tierline.app import App

log = get_logger(__name__)

PRUNE_EVERY_S = 10.0
PRUNE_BATCH = 5000
PRUNE_MAX_BATCHES = 50
RESCUE_OUTCOME = {"failed": "failed", "cancelled": "cancelled", "available": "rescued"}


class Maintenance:
    def __init__(
        self,
        settings: Settings,
        pool: AsyncConnectionPool[Conn],
        interval_s: float = 1.0,
        *,
        app: App | None = None,
    ) -> None:
        self.settings = settings
        self.pool = pool
        self.interval_s = interval_s
        self._last_prune = 0.0
        self.app = app
        schedules = list(app.schedules.values()) if app is not None else []
        self.scheduler = Scheduler(app, schedules, settings.max_args_bytes) if app else None
        self._declared = app is None

    async def declare(self) -> None:
        """Store the application's queue limits and schedules (every worker, at start)."""
        assert self.app is not None and self.scheduler is not None
        async with self.pool.connection() as conn, conn.transaction():
            await limits.declare(conn, list(self.app.queues.values()))
            await self.scheduler.declare(conn)
        self._declared = True

    async def run(self) -> None:
        while True:
            await asyncio.sleep(self.interval_s * random.uniform(0.5, 1.5))
            try:
                await self.tick()
            except Exception as exc:
                log.warning("maintenance failed", error=describe_error(exc))

    async def tick(self) -> dict[str, int]:
        done = {"rescued": 0, "promoted": 0, "pruned": 0}
        if not self._declared:
            await self.declare()
        async with self.pool.connection() as conn, conn.transaction():
            if not await _leader(conn):
                return done
            rows = await (await conn.execute(QUERIES["rescue_expired"])).fetchall()
            for r in rows:
                metrics.JOBS_FINISHED.labels(r["queue"], RESCUE_OUTCOME[r["state"]]).inc()
            done["rescued"] = len(rows)
            if rows:
                log.warning("rescued jobs whose replica stopped heartbeating", jobs=len(rows))
            promoted = await (await conn.execute(QUERIES["promote_due"])).fetchall()
            done["promoted"] = len(promoted)
            if self.scheduler is not None and self.scheduler.schedules:
                done["scheduled"] = await self.scheduler.tick(conn)
        now = time.monotonic()
        if now - self._last_prune > PRUNE_EVERY_S:
            self._last_prune = now
            done["pruned"] = await self.prune()
        return done

    async def prune(self) -> int:
        """Delete finished jobs past retention, in short transactions of ``PRUNE_BATCH``
        (a long one would hold back vacuum and the event firehose)."""
        total = 0
        for _ in range(PRUNE_MAX_BATCHES):
            async with self.pool.connection() as conn, conn.transaction():
                if not await _leader(conn):
                    break
                row = await (
                    await conn.execute(
                        QUERIES["prune"],
                        {"retention_s": self.settings.job_retention_s, "limit": PRUNE_BATCH},
                    )
                ).fetchone()
                pruned = int(row["pruned"]) if row else 0
                if total == 0:
                    await conn.execute(QUERIES["prune_replicas"])
                    await conn.execute(QUERIES["prune_queue_starts"])
            total += pruned
            if pruned < PRUNE_BATCH:
                break
        if total:
            log.info("pruned finished jobs", jobs=total)
        return total


async def _leader(conn: Conn) -> bool:
    """Whether this transaction holds the maintenance lock (one worker per round)."""
    got = await (await conn.execute(QUERIES["maintenance_lock"])).fetchone()
    return bool(got and got["ok"])
