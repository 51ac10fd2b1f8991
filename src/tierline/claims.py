"""The worker's claim: queues without limits in one statement, limited ones each under
their queue's lock.

``claim`` (``sql/queries.sql``) takes due jobs of every queue of the worker in one
statement, as it always did, and skips by itself any queue whose stored settings say
paused or limited (``limits.py``). Those go through ``claim_limited``, one transaction
per queue: ``queue_lock`` makes the queue's claimers take turns, so the running count
and the recent starts it reads include every claim committed before, on any replica.

Which of its queues are limited the worker learns from ``queue_limited``, re-read every
``ROUTES_TTL_S``; a stale answer only delays a claim, it never breaks a limit.
"""

from __future__ import annotations

import time
from typing import Any

from psycopg_pool import AsyncConnectionPool

from tierline.database import Conn, borrow, one_round_trip
from tierline.queries import QUERIES

ROUTES_TTL_S = 1.0
PARTITION_SCAN = 1000  # waiting jobs a partitioned claim looks at (see claim_limited)
Rows = list[dict[str, Any]]


class Claims:
    """Claims for one worker: ``take(limit, skip)`` answers the claimed rows."""

    def __init__(
        self, pool: AsyncConnectionPool[Conn], owner: str, queues: list[str], lease_s: float
    ) -> None:
        self.pool = pool
        self.owner = owner
        self.queues = queues
        self.lease_s = lease_s
        self.limited: dict[str, dict[str, Any]] = {}  # name -> queue_limited row
        self._routes_at = -ROUTES_TTL_S
        self._turn = 0
        self.rate_limited = False  # the last claim left jobs waiting for a rate window

    async def take(self, limit: int, skip: list[int]) -> Rows:
        await self._routes()
        if not self.limited:
            return await self._open(limit, skip)
        # Alternate which side goes first, so neither starves the other of free slots.
        self._turn += 1
        rows: Rows = []
        if self._turn % 2:
            rows += await self._open(limit, skip)
        for name, route in self.limited.items():
            if len(rows) >= limit:
                break
            if not route["paused"]:
                rows += await self._limited(name, limit - len(rows), skip)
        if not self._turn % 2 and len(rows) < limit:
            rows += await self._open(limit - len(rows), skip)
        return rows

    def wait_s(self, poll_s: float) -> float:
        """How long an idle claimer may wait: a rate-limited queue gets another look
        sooner (its window moves on by itself, with no notification to say so)."""
        return min(poll_s, 0.1) if self.rate_limited else poll_s

    def limits(self, queue: str) -> bool:
        """Whether ``queue`` has a running-jobs limit (its finished jobs free room)."""
        route = self.limited.get(queue)
        return route is not None and route["max_running"] is not None

    async def _routes(self) -> None:
        now = time.monotonic()
        if now - self._routes_at < ROUTES_TTL_S:
            return
        async with borrow(self.pool) as conn:
            cur = await conn.execute(QUERIES["queue_limited"], {"queues": self.queues})
            self.limited = {r["name"]: r for r in await cur.fetchall()}
        self._routes_at = now
        if not any(r["rate_count"] for r in self.limited.values()):
            self.rate_limited = False

    async def _open(self, limit: int, skip: list[int]) -> Rows:
        if limit <= 0:
            return []
        async with borrow(self.pool) as conn:
            async with one_round_trip(conn):
                await conn.execute(QUERIES["claim_plan"])  # the index walk, whatever the stats
                cur = await conn.execute(
                    QUERIES["claim"],
                    {
                        "queues": self.queues,
                        "limit": limit,
                        "owner": self.owner,
                        "lease_s": self.lease_s,
                        "skip": skip,
                    },
                )
            return await cur.fetchall()

    async def _limited(self, queue: str, limit: int, skip: list[int]) -> Rows:
        async with self.pool.connection() as conn, conn.transaction():
            await conn.execute(QUERIES["claim_plan"])
            cfg = await (await conn.execute(QUERIES["queue_lock"], {"queue": queue})).fetchone()
            if cfg is None or cfg["paused"]:
                return []
            cur = await conn.execute(
                QUERIES["claim_limited"],
                {
                    "queue": queue,
                    "partition_by": cfg["partition_by"],
                    "max_running": cfg["max_running"],
                    "rate_count": cfg["rate_count"],
                    "rate_period_s": cfg["rate_period_s"],
                    "scan": PARTITION_SCAN if cfg["partition_by"] else limit,
                    "limit": limit,
                    "skip": skip,
                    "owner": self.owner,
                    "lease_s": self.lease_s,
                },
            )
            rows = await cur.fetchall()
        if cfg["rate_count"] is not None:
            self.rate_limited = len(rows) < limit
        return rows
