"""Queue upkeep, done by one worker at a time: rescue expired leases, promote due jobs,
prune finished ones.

Every worker ticks; a transaction-scoped advisory lock picks one per tick (safe behind
PgBouncer), and every statement uses SKIP LOCKED so an overlap costs nothing.
"""

from __future__ import annotations

import asyncio
import random
import time

from psycopg_pool import AsyncConnectionPool

from tierline import metrics
from tierline.database import Conn, describe_error
from tierline.logs import get_logger
from tierline.queries import QUERIES
from tierline.settings import Settings

log = get_logger(__name__)

MAINTENANCE_LOCK = 7347123002
RESCUE_OUTCOME = {"failed": "failed", "cancelled": "cancelled", "available": "rescued"}


class Maintenance:
    def __init__(
        self, settings: Settings, pool: AsyncConnectionPool[Conn], interval_s: float = 1.0
    ) -> None:
        self.settings = settings
        self.pool = pool
        self.interval_s = interval_s
        self._last_prune = 0.0

    async def run(self) -> None:
        while True:
            await asyncio.sleep(self.interval_s * random.uniform(0.5, 1.5))
            try:
                await self.tick()
            except Exception as exc:
                log.warning("maintenance failed", error=describe_error(exc))

    async def tick(self) -> dict[str, int]:
        done = {"rescued": 0, "promoted": 0, "pruned": 0}
        async with self.pool.connection() as conn, conn.transaction():
            got = await (
                await conn.execute(
                    "SELECT pg_try_advisory_xact_lock(%s) AS ok", (MAINTENANCE_LOCK,)
                )
            ).fetchone()
            if not got or not got["ok"]:
                return done
            rows = await (await conn.execute(QUERIES["rescue_expired"])).fetchall()
            for r in rows:
                metrics.JOBS_FINISHED.labels(r["queue"], RESCUE_OUTCOME[r["state"]]).inc()
            done["rescued"] = len(rows)
            if rows:
                log.warning("rescued jobs whose replica stopped heartbeating", jobs=len(rows))
            promoted = await (await conn.execute(QUERIES["promote_due"])).fetchall()
            done["promoted"] = len(promoted)
            now = time.monotonic()
            if now - self._last_prune > 60:
                self._last_prune = now
                pruned = await (
                    await conn.execute(
                        QUERIES["prune"],
                        {
                            "retention_s": self.settings.job_retention_s,
                            "limit": 10_000,
                        },
                    )
                ).fetchone()
                done["pruned"] = int(pruned["pruned"]) if pruned else 0
                await conn.execute(QUERIES["prune_replicas"])
        return done
