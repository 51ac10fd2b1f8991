"""What every replica process is, whichever its tier: a ``Tier`` runs one ``Replica``
(jitter, budget claim, pool, heartbeat) and one LISTEN connection beside the tier's own
work, reports readiness, refreshes the database's metrics when scraped, and stops the
same way on both tiers (``lifecycle.Shutdown``: the first signal drains, a second forces).

``WebTier`` (``web_tier.py``) and ``WorkerTier`` (``worker_tier.py``) fill in what
differs: what they serve, what they do once the replica is ready, how they drain.
"""

from __future__ import annotations

import asyncio
from abc import ABC, abstractmethod
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from typing import Any

from psycopg_pool import AsyncConnectionPool

from tierline import limits, tracing
from tierline.app import App
from tierline.database import Conn
from tierline.lifecycle import Shutdown, SideTasks
from tierline.notifications import Handler, Listener
from tierline.queue import Queue
from tierline.recommender import Recommender
from tierline.replica import Replica
from tierline.settings import Settings
from tierline.stats import Stats


class Tier(ABC):
    """One replica process of a tier. ``run`` is the whole life: serve, start the
    replica, run until stopped, drain, release the budget claim."""

    def __init__(self, app: App, settings: Settings, replica: Replica) -> None:
        tracing.setup()  # the application's module, loaded by now, set up OpenTelemetry or not
        self.app = app
        self.settings = settings
        self.replica = replica
        self.shutdown = Shutdown()
        self.side = SideTasks(self.shutdown.stop)
        self.queue: Queue | None = None
        self.stats: Stats | None = None
        self.recommender: Recommender | None = None

    @property
    def stop(self) -> asyncio.Event:
        """Set on the first signal, or when a side task ends."""
        return self.shutdown.stop

    @property
    def draining(self) -> bool:
        return self.stop.is_set()

    def readiness(self) -> tuple[bool, str]:
        if self.draining:
            return False, "shutting down"
        return self.replica.ready, self.replica.reason

    async def run(self) -> int:
        """The process's exit code: 1 when a task crashed, else 0."""
        self.shutdown.install()
        ok = await self.serve()
        await self.side.cancel()
        await self.replica.close()
        await self.close()
        return 0 if ok and not self.side.crashed else 1

    @abstractmethod
    async def serve(self) -> bool:
        """Start serving, run until ``stop``, drain. False when the tier's own work
        crashed (it has logged why)."""

    @abstractmethod
    async def close(self) -> None:
        """Last step, after the replica released its claim."""

    # -- once the replica is ready ----------------------------------------------------------
    def connected(self, pool: AsyncConnectionPool[Conn]) -> Queue:
        """The replica has its pool: the queue, the statistics and the recommender over
        it, and the application's ``enqueue`` on the same pool."""
        self.queue = Queue(self.app, pool, max_args_bytes=self.settings.max_args_bytes)
        self.stats = Stats(pool)
        self.recommender = Recommender(self.settings, pool, self.stats)
        self.app.bind(self.queue)
        return self.queue

    def start_side_tasks(
        self,
        channels: Sequence[str],
        on_notify: Handler,
        on_connect: Callable[[], Awaitable[None]],
        *extra: tuple[Coroutine[Any, Any, Any], str],
    ) -> Listener:
        """The heartbeat, the LISTEN connection and the tier's own loops, supervised."""
        listener = Listener(
            self.settings, channels, on_notify, on_connect=on_connect, name=f"{self.name}-listen"
        )
        self.side.start(self.replica.heartbeat_forever(), "heartbeat")
        self.side.start(listener.run(), "listener")
        for coro, name in extra:
            self.side.start(coro, name)
        return listener

    @property
    def name(self) -> str:
        return self.replica.tier

    # -- metrics --------------------------------------------------------------------------
    async def refresh_database_metrics(self) -> None:
        """Before a scrape: the queue, registry and recommendation gauges from the
        database. Best effort, and skipped when the pool is saturated: a scrape must
        never take a connection the tier's work is waiting for."""
        if self.stats is None or self.recommender is None or not self.replica.ready:
            return
        if self.replica.pool_saturated():
            return
        try:
            await limits.overview(self.stats.pool, await self.stats.queues())
            await self.stats.cluster()
            await self.recommender.current()  # tierline_recommended_replicas
        except Exception:  # database metrics are best effort; the rest still answers
            pass
