"""A web replica's pool on the read replica, claimed against that server's own budget.

The read replica (``TIERLINE_DATABASE_READ_URL``) is another server with its own
``max_connections``: a budget of its own, shared by every web replica's read pool. The
claim lives in the same registry row as the primary's (``read_claimed`` beside
``claimed``, in ``tierline.replicas`` on the primary) and is made under the same budget
lock, so the read claims of live replicas never exceed the replica's budget either.

Unlike the primary's pool, the read pool is optional: a web replica whose read pool does
not fit, or whose read replica is unreachable at start-up, is ready all the same and
sends its reads to the primary; ``Replica.heartbeat`` tries the claim again.
"""

from __future__ import annotations

from typing import Any
from uuid import UUID

from psycopg_pool import AsyncConnectionPool

from tierline import budget
from tierline.cores import Cores
from tierline.database import Conn, connect, describe_error, make_pool
from tierline.logs import get_logger
from tierline.metrics import pool_snapshot
from tierline.queries import QUERIES
from tierline.settings import Settings

log = get_logger(__name__)


class ReadPool:
    """The read pool of one web replica: its plan, its claim, the pool once granted."""

    def __init__(self, settings: Settings, cores: Cores) -> None:
        self.settings = settings
        self.plan = budget.read_pool(settings, cores)
        self.granted: budget.PoolPlan | None = None
        self.budget: budget.Budget | None = None
        self.server: dict[str, int] | None = None  # the replica server's limits
        self.pool: AsyncConnectionPool[Conn] | None = None
        self.reason = "not claimed yet"
        self._logged = ""

    async def read_limits(self) -> bool:
        """The read server's limits (once; not needed with an explicit budget). False when
        it cannot be reached: no claim now, the next heartbeat tries again."""
        if self.server is not None or self.settings.db_read_max_connections is not None:
            return True
        dsn = self.settings.read_dsn()
        assert dsn is not None
        try:
            conn = await connect(
                dsn, self.settings, attempts=1, application_name="tierline-web-read-claim"
            )
            try:
                row = await (await conn.execute(QUERIES["server_limits"])).fetchone()
            finally:
                await conn.close()
        except Exception as exc:
            self._not_granted(f"read replica unreachable: {describe_error(exc)}")
            return False
        assert row is not None
        self.server = {
            "max_connections": row["max_connections"],
            "superuser_reserved": row["superuser_reserved"],
            "reserved": row["reserved"],
        }
        return True

    async def claim(self, conn: Conn, replica_id: UUID) -> None:
        """Fit the read pool into what the replica's budget has left, inside the caller's
        transaction on the primary (which holds the budget lock). Call ``read_limits``
        first, outside the transaction. A pool already open keeps its size (a re-claim
        after a lapsed lease), even over budget, as the primary's pool does."""
        if self.settings.db_read_max_connections is None and self.server is None:
            return
        s = self.server or {"max_connections": 0, "superuser_reserved": 0, "reserved": 0}
        self.budget = budget.budget(
            self.settings, s["max_connections"], s["superuser_reserved"], s["reserved"], read=True
        )
        cur = await conn.execute(QUERIES["live_read_claims"], {"id": replica_id})
        live = await cur.fetchone()
        assert live is not None
        free = self.budget.total - live["claimed"]
        fitted = budget.fit_to_budget(self.plan, free, self.budget.total)
        if self.pool is not None:
            if fitted is None or fitted.max_size < self.granted_max:
                log.error(
                    "read replica budget taken meanwhile; running over it until it frees",
                    free=max(0, free),
                    budget=self.budget.total,
                )
            return
        if fitted is None:
            self._not_granted(
                f"read replica budget exhausted: needs at least "
                f"{budget.MIN_USABLE_POOL['web']} connections, {max(0, free)} of "
                f"{self.budget.total} free ({live['replicas']} live replicas hold "
                f"{live['claimed']}; budget from {self.budget.source}); reads go to the primary"
            )
            return
        self.granted, self.reason = fitted, ""

    async def claim_again(self, pool: AsyncConnectionPool[Conn], replica_id: UUID) -> None:
        """A later try (heartbeat) for a replica that runs without its read pool."""
        if not await self.read_limits():
            return
        async with pool.connection() as conn, conn.transaction():
            await conn.execute(QUERIES["budget_lock"])
            await self.claim(conn, replica_id)
            if self.granted is not None:
                await conn.execute(QUERIES["claim_read"], {"id": replica_id, **self.row()})
        await self.open()

    @property
    def granted_max(self) -> int:
        return self.granted.max_size if self.granted else 0

    @staticmethod
    def no_row() -> dict[str, Any]:
        """The read columns of a replica without a read pool."""
        return {"read_requested_pool": 0, "read_pool_max": 0, "read_claimed": 0}

    def row(self) -> dict[str, Any]:
        """The registry row's read columns."""
        return {
            "read_requested_pool": self.plan.requested_max,
            "read_pool_max": self.granted_max,
            "read_claimed": self.granted.claimed if self.granted else 0,
        }

    async def open(self) -> None:
        """Open the pool once granted (not waiting for its connections)."""
        if self.granted is None or self.pool is not None:
            return
        for cap in self.granted.caps:
            log.warning(
                "pool size capped",
                variable=cap.variable,
                requested=cap.requested,
                applied=cap.applied,
                reason=cap.reason,
            )
        self.pool = make_pool(
            self.settings,
            min_size=self.granted.min_size,
            max_size=self.granted.max_size,
            name="web-read",
            read=True,
        )
        await self.pool.open(wait=False)
        log.info(
            "read pool open",
            pool_max=self.granted.max_size,
            pool_requested_max=self.plan.requested_max,
            budget=self.budget.total if self.budget else None,
        )

    async def close(self) -> None:
        if self.pool is not None:
            await self.pool.close(timeout=5)
            self.pool = None

    def snapshot(self) -> dict[str, Any]:
        """The pool's metrics (``target="replica"``), zeros until it is open."""
        stats = self.pool.get_stats() if self.pool is not None else {}
        return pool_snapshot("web", stats, self.plan.requested_max, target="replica")

    def describe(self) -> dict[str, Any]:
        """For the registry row's stats and ``GET /v1/cluster``."""
        return {
            "pool_requested_max": self.plan.requested_max,
            "pool_max": self.granted_max,
            "claimed_connections": self.granted.claimed if self.granted else 0,
            "reason": self.reason or None,
        }

    def _not_granted(self, reason: str) -> None:
        self.reason = reason
        if reason != self._logged:  # once per reason, not every heartbeat
            log.warning("read pool not granted; reads go to the primary", reason=reason)
            self._logged = reason
