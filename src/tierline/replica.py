"""A replica's life in the registry: jittered start, budget claim, pool, heartbeat.

Both tiers run one ``Replica``. It claims its pool maximum plus its LISTEN connection in
``tierline.replicas`` inside a transaction holding the budget lock, so the sum of live
claims never exceeds the budget. Until a claim succeeds the replica is not ready and
holds no connection; it retries with jittered backoff.
"""

from __future__ import annotations

import asyncio
import os
import random
import socket
import uuid
from collections.abc import Callable
from typing import Any

from psycopg.types.json import Jsonb
from psycopg_pool import AsyncConnectionPool, PoolTimeout

from tierline import __version__, budget, metrics, migrations
from tierline.backoff import backoff_delays
from tierline.cores import Cores, usable_cores
from tierline.database import Conn, connect, describe_error, make_pool
from tierline.errors import SchemaError
from tierline.logs import get_logger
from tierline.queries import QUERIES
from tierline.read_pool import ReadPool
from tierline.settings import Settings, Tier, env_name

log = get_logger(__name__)


class Replica:
    """One process of a tier, as the registry and the budget see it."""

    def __init__(
        self,
        settings: Settings,
        tier: Tier,
        *,
        cores: Cores | None = None,
        stats: Callable[[], dict[str, Any]] | None = None,
        pool_need: int | None = None,
    ) -> None:
        self.settings = settings
        self.tier: Tier = tier
        self.id = uuid.uuid4()
        self.cores = cores or usable_cores()
        self.plan = budget.cpu_capped_pool(settings, tier, self.cores)
        self.granted: budget.PoolPlan | None = None
        self.budget: budget.Budget | None = None
        self.pool: AsyncConnectionPool[Conn] | None = None
        self.ready = False
        self.reason = "starting"
        self.stats = stats or (lambda: {})
        self.pool_need = pool_need
        self.healthy_db = True
        self._connect_errors = 0  # the pool's failed connection attempts, at the last beat
        # The web tier's pool on the read replica, claimed against that server's budget.
        wants_reads = tier == "web" and settings.read_dsn() is not None
        self.reads = ReadPool(settings, self.cores) if wants_reads else None
        metrics.POOLS.source = self.pool_snapshots

    # -- start-up -----------------------------------------------------------------------------
    async def start(self, stop: asyncio.Event) -> bool:
        """Wait the jitter, claim budget, open the pool. False when stopped first."""
        jitter = random.uniform(0, self.settings.startup_jitter_s)
        if jitter:
            log.info("start-up jitter", wait_s=round(jitter, 3))
            if await _wait(stop, jitter):
                return False
        for cap in self.plan.caps:
            _log_cap(cap)
        self._warn_pool_need()
        # Retries refresh the registry row (with the reason); keep them within the lease so
        # a waiting replica shows as alive and not ready, not as dead.
        delays = backoff_delays(base=0.5, cap=min(10.0, self.settings.replica_lease_s / 2))
        last_reason = ""
        while not stop.is_set():
            try:
                granted = await self._claim()
            except SchemaError as exc:
                granted, self.reason = None, str(exc)
            except Exception as exc:
                granted, self.reason = None, _unreachable(exc)
            if granted is not None:
                break
            if self.reason != last_reason:
                log.warning("replica not ready", reason=self.reason)
                last_reason = self.reason
            if await _wait(stop, next(delays)):
                return False
        else:
            return False
        self.granted = granted
        for cap in granted.caps:
            if cap not in self.plan.caps:  # the budget's caps; the CPU's were logged above
                _log_cap(cap)
        self.pool = make_pool(
            self.settings, min_size=granted.min_size, max_size=granted.max_size, name=self.tier
        )
        await self.pool.open(wait=False)
        if self.reads is not None:
            await self.reads.open()
        self.ready, self.reason = True, ""
        log.info(
            "replica ready",
            replica=str(self.id),
            pool_max=granted.max_size,
            pool_requested_max=self.plan.requested_max,
            claimed=granted.claimed,
            budget=self.budget.total if self.budget else None,
        )
        return True

    def _warn_pool_need(self) -> None:
        if self.pool_need is not None and self.plan.max_size < self.pool_need:
            log.warning(
                "worker pool is smaller than its concurrency needs",
                variable=env_name("worker_db_pool_max"),
                pool_max=self.plan.max_size,
                needed=self.pool_need,
                concurrency=self.settings.worker_concurrency,
                advice="jobs will wait for connections; raise the pool or lower "
                f"{env_name('worker_concurrency')}",
            )

    async def _claim(self) -> budget.PoolPlan | None:
        # The claim is one transaction (transaction-scoped lock): fine through PgBouncer, so
        # it uses the pool URL; a broken direct URL then only costs LISTEN (polling remains).
        conn = await connect(
            self.settings.dsn(),
            self.settings,
            attempts=1,
            application_name=f"tierline-{self.tier}-claim",
        )
        try:
            await migrations.check(conn)
            if self.reads is not None:
                await self.reads.read_limits()  # another server: not under the lock
            async with conn.transaction():
                await conn.execute(QUERIES["budget_lock"])
                limits = await (await conn.execute(QUERIES["server_limits"])).fetchone()
                assert limits is not None
                self.budget = budget.budget(
                    self.settings,
                    limits["max_connections"],
                    limits["superuser_reserved"],
                    limits["reserved"],
                )
                metrics.BUDGET.labels("total").set(self.budget.total)
                live = await (
                    await conn.execute(QUERIES["live_claims"], {"id": self.id})
                ).fetchone()
                assert live is not None
                free = self.budget.total - live["claimed"]
                granted = budget.fit_to_budget(self.plan, free, self.budget.total)
                if granted is None:
                    need = budget.MIN_USABLE_POOL[self.tier] + budget.LISTEN_CONNECTIONS
                    self.reason = (
                        f"connection budget exhausted: needs at least {need} connections, "
                        f"{max(0, free)} of {self.budget.total} free "
                        f"({live['replicas']} live replicas hold {live['claimed']}; "
                        f"budget from {self.budget.source})"
                    )
                if granted is not None and self.reads is not None:
                    await self.reads.claim(conn, self.id)
                await conn.execute(QUERIES["upsert_replica"], self._row(granted))
            return granted
        finally:
            await conn.close()

    def _row(self, granted: budget.PoolPlan | None) -> dict[str, Any]:
        return {
            "id": self.id,
            "tier": self.tier,
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "version": __version__,
            "lease_s": self.settings.replica_lease_s,
            "requested_pool": self.plan.requested_max,
            "pool_max": granted.max_size if granted else 0,
            "claimed": granted.claimed if granted else 0,
            "ready": granted is not None,
            "reason": None if granted else self.reason,
            "stats": Jsonb(self.snapshot()),
            **(self.reads.row() if self.reads is not None and granted else ReadPool.no_row()),
        }

    # -- running --------------------------------------------------------------------------------
    async def heartbeat_forever(self) -> None:
        """Refresh the registry row every ``heartbeat_s``; re-claim if the lease lapsed."""
        while True:
            await asyncio.sleep(self.settings.heartbeat_s * random.uniform(0.9, 1.0))
            await self.heartbeat()

    async def heartbeat(self) -> None:
        if self.pool is None:
            return
        # A saturated pool is not a dead database: the heartbeat queues for a connection
        # like any request, but longer, because a lapsed lease would hand connections this
        # replica still holds to another replica.
        wait_s = max(self.settings.db_pool_timeout_s, self.settings.replica_lease_s / 2)
        for attempt in (1, 2):
            used: Conn | None = None
            try:
                async with self.pool.connection(timeout=wait_s) as conn:
                    used = conn
                    cur = await conn.execute(
                        QUERIES["heartbeat"],
                        {
                            "id": self.id,
                            "stats": Jsonb(self.snapshot()),
                            "ready": self.ready,
                            "reason": self.reason or None,
                        },
                    )
                    alive = await cur.fetchone()
                self.healthy_db = True
                self._connect_errors = self.pool.get_stats().get("connections_errors", 0)
                if self.reason.startswith("database unreachable"):
                    self.ready, self.reason = True, ""
                if self.reads is not None and self.reads.granted is None:
                    await self._claim_read_again()
                break
            except PoolTimeout:
                failed = self.pool.get_stats().get("connections_errors", 0)
                if failed > self._connect_errors:
                    # The pool's own connection attempts fail meanwhile: the database is
                    # unreachable, not busy (a saturated pool opens no new connections).
                    self._connect_errors = failed
                    self.healthy_db = False
                    self.ready = False
                    self.reason = "database unreachable: the pool cannot open connections"
                    log.warning("heartbeat failed", error=self.reason, waited_s=wait_s)
                    return
                log.warning(
                    "heartbeat found no free pool connection; the pool is saturated",
                    waited_s=wait_s,
                    pool=self.pool_snapshot(),
                )
                return
            except Exception as exc:
                # One pooled connection that died under the heartbeat (terminated by an
                # admin, a failover) says nothing of the database: one more try on a fresh
                # connection before the replica turns not ready.
                if attempt == 1 and used is not None and used.broken:
                    continue
                self.healthy_db = False
                self.ready, self.reason = False, f"database unreachable: {describe_error(exc)}"
                log.warning("heartbeat failed", error=describe_error(exc))
                return
        if alive is None:
            # Our lease ran out (a long outage or pause): the claim is void; make it again.
            log.warning("replica lease lapsed; claiming the budget again")
            try:
                again = await self._claim()
            except Exception as exc:
                log.warning("re-claim failed", error=describe_error(exc))
                return
            if again is None:
                log.error(
                    "connection budget taken meanwhile; running over budget until it frees",
                    reason=self.reason,
                )

    async def _claim_read_again(self) -> None:
        assert self.reads is not None and self.pool is not None
        try:
            await self.reads.claim_again(self.pool, self.id)
        except Exception as exc:
            log.warning("read pool claim failed", error=describe_error(exc))

    def snapshot(self) -> dict[str, Any]:
        out: dict[str, Any] = {"cores": self.cores.usable, "cores_source": self.cores.source}
        pool = self.pool_snapshot()
        if pool:
            out["pool"] = pool
        if self.reads is not None:
            out["read_pool"] = {**self.reads.snapshot(), **self.reads.describe()}
        out.update(self.stats())
        return out

    def pool_saturated(self) -> bool:
        """True when a caller would wait for a connection (or there is no pool yet).

        Scrapes then skip their database reads: queued behind requests, they would be
        late, and their give-ups would count as pool timeouts the users never saw.
        """
        snap = self.pool_snapshot()
        return snap is None or (snap["idle"] == 0 and snap["size"] >= snap["max"])

    def pool_snapshots(self) -> list[dict[str, Any]]:
        """Every pool's metrics: the primary's, and the read replica's when configured."""
        snaps = [s for s in (self.pool_snapshot(),) if s]
        if self.reads is not None:
            snaps.append(self.reads.snapshot())
        return snaps

    def pool_snapshot(self) -> dict[str, Any] | None:
        if self.pool is None:
            return {
                "tier": self.tier,
                "target": "primary",
                "size": 0,
                "in_use": 0,
                "idle": 0,
                "max": 0,
                "requested_max": self.plan.requested_max,
                "waiting": 0,
                "waits": 0,
                "wait_s": 0.0,
                "timeouts": 0,
                "utilization": 0.0,
            }
        return metrics.pool_snapshot(self.tier, self.pool.get_stats(), self.plan.requested_max)

    async def close(self) -> None:
        """Close the pool, then leave the registry (releasing the claim at once).

        In this order because a claim released first could be granted to a starting
        replica while this one still holds its pool: for a moment, over budget. The one
        connection that deregisters is covered by the claim it releases.
        """
        if self.reads is not None:
            await self.reads.close()
        if self.pool is not None:
            await self.pool.close(timeout=5)
        if self.pool is not None or self.budget is not None:  # we wrote a registry row
            try:
                conn = await connect(
                    self.settings.dsn(),
                    self.settings,
                    attempts=1,
                    application_name=f"tierline-{self.tier}-leave",
                )
                try:
                    await conn.execute(QUERIES["stop_replica"], {"id": self.id})
                finally:
                    await conn.close()
            except Exception as exc:
                log.warning(
                    "could not deregister; the claim lapses with the lease",
                    error=describe_error(exc),
                )
        self.ready, self.reason = False, "stopped"


def _unreachable(exc: BaseException) -> str:
    """The not-ready reason for a failed claim connection."""
    text = describe_error(exc)
    # A full server is not a down server: the operator's fix differs (budget, reserves).
    if "too many clients" in text or "remaining connection slots" in text:
        return f"database full, retrying with backoff: {text}"
    return f"database unreachable: {text}"


def _log_cap(cap: budget.Cap) -> None:
    log.warning(
        "pool size capped",
        variable=cap.variable,
        requested=cap.requested,
        applied=cap.applied,
        reason=cap.reason,
    )


async def _wait(stop: asyncio.Event, seconds: float) -> bool:
    """Sleep ``seconds`` unless ``stop`` is set first; True when stopped."""
    try:
        await asyncio.wait_for(stop.wait(), timeout=seconds)
        return True
    except TimeoutError:
        return False
