"""Where the web tier's reads go: the read replica while it keeps up, else the primary.

``ReadRouter.run`` measures the replica's replay lag every ``LAG_PROBE_S`` by the
primary's clock alone: it samples the primary's WAL position with the primary's
``clock_timestamp()``, asks the replica how far it has replayed, and the lag is the age
(on the primary's clock) of the newest sample the replica has not yet replayed past,
i.e. how old the oldest write is that the replica is missing (0 when it has replayed
everything the primary had written at the last sample). No host clock, the replica's
included, takes part, so skew between servers cannot fake or hide lag.

Reads leave the replica when the lag is above ``TIERLINE_READ_MAX_LAG_S`` or the replica
does not answer, with a warning and ``tierline_db_read_target``; they come back once the
lag is at most half the limit (half, so a lag hovering at the limit does not flap). A
read that fails on the replica (connection lost, no connection within
``REPLICA_CHECKOUT_S``) is answered by the primary, so a replica that is down or behind
never fails a request.

Reading one's own write: a read that may find nothing because the replica has not
replayed it yet (a job fetched right after its 202, a stream's head) is asked with
``primary_if``: an answer from the replica that fails that test is asked of the primary
again. This holds however far behind the replica is, and with a pooler in front of
several replicas whose positions differ: correctness never rests on the lag estimate,
only the staleness bound of other reads does.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import time
from collections import deque
from collections.abc import AsyncIterator, Callable
from typing import Any, Literal, LiteralString

import psycopg
from psycopg_pool import AsyncConnectionPool

from tierline import metrics
from tierline.database import Conn, describe_error
from tierline.logs import get_logger
from tierline.queries import QUERIES
from tierline.settings import Settings, env_name

log = get_logger(__name__)

Target = Literal["primary", "replica"]
Pool = AsyncConnectionPool[Conn]
Rows = list[dict[str, Any]]

LAG_PROBE_S = 0.5  # how often the lag is measured (seconds)
REPLICA_CHECKOUT_S = 1.0  # longest wait for a replica connection before using the primary
PROBE_TIMEOUT_S = 2.0  # one probe's wait for a connection and its statement
MAX_SAMPLES = 7200  # primary positions kept while the replica stands still (an hour)


class ReadRouter:
    """The web replica's read routing. ``primary`` and ``replica`` give the pools as they
    are now (the read pool may come later, or never)."""

    def __init__(
        self,
        settings: Settings,
        primary: Callable[[], Pool | None],
        replica: Callable[[], Pool | None],
    ) -> None:
        self.settings = settings
        self.configured = settings.read_dsn() is not None
        self.max_lag_s = settings.read_max_lag_s
        self._primary = primary
        self._replica = replica
        self.use_replica = False
        self.lag_s: float | None = None
        self.reason = "measuring the replica's lag" if self.configured else "no read replica"
        self._anchor: tuple[int, float] | None = None  # newest sample the replica replayed
        self._samples: deque[tuple[int, float]] = deque(maxlen=MAX_SAMPLES)
        if self.configured:
            self._publish()

    # -- where a read goes --------------------------------------------------------------------
    @property
    def target(self) -> Target:
        return "replica" if self.use_replica and self._replica() is not None else "primary"

    async def fetch(
        self,
        query: LiteralString,
        params: dict[str, Any],
        *,
        primary_if: Callable[[Rows], bool] | None = None,
    ) -> tuple[Rows, Target]:
        """Run one read statement on the replica when it is usable, else (or when it
        fails there, or its rows fail ``primary_if``) on the primary; the rows and who
        answered. Errors of the primary are raised as they are."""
        pool = self._replica() if self.use_replica else None
        if pool is not None:
            try:
                rows = await self._run(pool, "replica", query, params, REPLICA_CHECKOUT_S)
            except psycopg.OperationalError as exc:  # PoolTimeout is one too
                self._failed(exc)
            else:
                if primary_if is None or not primary_if(rows):
                    return rows, "replica"
                metrics.READ_FALLBACKS.labels("not_replayed").inc()
        elif self.configured:
            metrics.READ_FALLBACKS.labels(self._why()).inc()
        primary = self._primary()
        if primary is None:
            raise psycopg.OperationalError("the replica has no database pool yet")
        return await self._run(primary, "primary", query, params, None, tries=2), "primary"

    @contextlib.asynccontextmanager
    async def connection(self, timeout: float) -> AsyncIterator[Conn]:
        """A read connection for the application's routes: the replica's when usable and
        free within ``REPLICA_CHECKOUT_S``, else the primary's (waiting up to ``timeout``).
        Once lent, a connection's failures are the caller's."""
        pool = self._replica() if self.use_replica else None
        if pool is not None:
            borrowed: Any = pool.connection(timeout=min(timeout, REPLICA_CHECKOUT_S))
            try:
                conn: Conn = await borrowed.__aenter__()
            except psycopg.OperationalError as exc:
                self._failed(exc)
            else:
                try:
                    yield conn
                except BaseException as exc:
                    if not await borrowed.__aexit__(type(exc), exc, exc.__traceback__):
                        raise
                else:
                    await borrowed.__aexit__(None, None, None)
                return
        elif self.configured:
            metrics.READ_FALLBACKS.labels(self._why()).inc()
        primary = self._primary()
        if primary is None:
            raise psycopg.OperationalError("the replica has no database pool yet")
        async with primary.connection(timeout=timeout) as conn:
            yield conn

    async def _run(
        self,
        pool: Pool,
        target: Target,
        query: LiteralString,
        params: dict[str, Any],
        timeout: float | None,
        *,
        tries: int = 1,
    ) -> Rows:
        """One statement; once more on a fresh connection when its connection died under
        it and ``tries`` allows (reads are safe to repeat)."""
        for attempt in range(1, tries + 1):
            used: Conn | None = None
            try:
                async with pool.connection(timeout=timeout) as conn:
                    used = conn
                    start = time.perf_counter()
                    rows = await (await conn.execute(query, params)).fetchall()
                    metrics.QUERY_DURATION.labels(target).observe(time.perf_counter() - start)
                    return rows
            except psycopg.OperationalError:
                if attempt == tries or used is None or not used.broken:
                    raise
        raise AssertionError("unreachable")

    def _failed(self, exc: BaseException) -> None:
        """A read on the replica failed: this one goes to the primary, and so do the next
        ones until a probe finds the replica answering again."""
        metrics.READ_FALLBACKS.labels("unreachable").inc()
        self._switch(False, f"read replica unreachable: {describe_error(exc)}")

    def _why(self) -> str:
        return "unreachable" if self.reason.startswith("read replica unreachable") else "lag"

    # -- measuring the lag ----------------------------------------------------------------------
    async def run(self) -> None:
        """Probe until cancelled (only with a read replica configured)."""
        if not self.configured:
            return
        while True:
            await self.probe()
            await asyncio.sleep(LAG_PROBE_S)

    async def probe(self) -> None:
        """One measurement, and the routing decision that follows from it."""
        primary, replica = self._primary(), self._replica()
        if primary is None:
            return
        if replica is None:
            self._switch(False, "no read pool (see the read pool's warning)")
            return
        try:
            async with primary.connection(timeout=PROBE_TIMEOUT_S) as conn:
                row = await (await conn.execute(QUERIES["primary_wal_position"])).fetchone()
        except psycopg.OperationalError:
            return  # the primary's own trouble shows elsewhere; keep the last decision
        assert row is not None
        lsn, now = int(row["lsn"]), float(row["t"])
        try:
            async with replica.connection(timeout=PROBE_TIMEOUT_S) as conn:
                rep = await (await conn.execute(QUERIES["replica_replay_position"])).fetchone()
        except psycopg.OperationalError as exc:
            self.lag_s = None
            self._switch(False, f"read replica unreachable: {describe_error(exc)}")
            return
        assert rep is not None
        self.lag_s = self._lag(lsn, now, None if rep["lsn"] is None else int(rep["lsn"]))
        self._decide()

    def _lag(self, lsn: int, now: float, replayed: int | None) -> float | None:
        """The replica's lag, given the primary's position and time now and what the
        replica has replayed (None: it is no replica, it reads what it writes)."""
        if replayed is None or replayed >= lsn:
            self._anchor, self._samples = (lsn, now), deque(maxlen=MAX_SAMPLES)
            return 0.0
        self._samples.append((lsn, now))
        while self._samples and self._samples[0][0] <= replayed:
            self._anchor = self._samples.popleft()
        if self._anchor is None:
            return None  # behind every position seen so far: not known yet
        return max(0.0, now - self._anchor[1])

    def _decide(self) -> None:
        lag = self.lag_s
        limit = env_name("read_max_lag_s")
        if lag is None:
            self._switch(False, "the replica's replay position is not confirmed yet")
        elif lag > self.max_lag_s:
            self._switch(False, f"replica lag {lag:.1f} s above {limit} {self.max_lag_s:g} s")
        elif self.use_replica or lag <= self.max_lag_s / 2:
            self._switch(True, "")
        self._publish()

    def _switch(self, use: bool, reason: str) -> None:
        if use and not self.use_replica:
            log.info("reads back on the read replica", lag_s=_round(self.lag_s))
        elif not use and (self.use_replica or reason.split(":")[0] != self.reason.split(":")[0]):
            log.warning("reads moved to the primary", reason=reason, lag_s=_round(self.lag_s))
        self.use_replica, self.reason = use, reason
        self._publish()

    def _publish(self) -> None:
        lag = self.lag_s
        metrics.REPLICA_LAG.labels("replica").set(math.nan if lag is None else lag)
        metrics.READ_TARGET.labels("replica").set(int(self.use_replica))
        metrics.READ_TARGET.labels("primary").set(int(not self.use_replica))

    def describe(self) -> dict[str, Any]:
        """For ``GET /v1/cluster`` and the dashboard."""
        return {
            "configured": self.configured,
            "target": self.target,
            "lag_s": _round(self.lag_s),
            "max_lag_s": self.max_lag_s,
            "reason": self.reason or None,
        }


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 3)
