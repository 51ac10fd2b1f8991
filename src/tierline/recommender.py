"""Live recommendations: their ``Inputs`` sampled from the database and the shared
statistics, recomputed at most every ``CACHE_S`` and published as a gauge.

The database samples are bounded (``SAMPLE_LIMIT`` rows at most) and index-only. The
formula itself is ``recommend.py``.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

from psycopg_pool import AsyncConnectionPool

from tierline import budget, metrics
from tierline.cores import usable_cores
from tierline.database import Conn, make_pool
from tierline.queries import QUERIES
from tierline.recommend import (
    SERVICE_WINDOW_S,
    Inputs,
    Recommendations,
    ceil_count,
    recommend,
)
from tierline.settings import Settings, Tier
from tierline.stats import Stats

ARRIVAL_WINDOW_S = 300.0  # jobs enqueued over the last 5 minutes
SAMPLE_LIMIT = 10_000  # rows read at most per statistic
CACHE_S = 10.0  # a replica recomputes at most this often


async def read_inputs(
    conn: Conn, settings: Settings, *, queues: dict[str, Any], replicas: list[dict[str, Any]]
) -> Inputs:
    """Inputs from the database (``conn``), the shared queue statistics (``queues``, as
    ``Stats.queues``) and the replica registry (``replicas``, as ``Stats.cluster``)."""
    sources: dict[str, str] = {}
    arr = await (
        await conn.execute(
            QUERIES["recent_arrivals"], {"window_s": ARRIVAL_WINDOW_S, "limit": SAMPLE_LIMIT}
        )
    ).fetchone()
    rate = 0.0
    if arr is not None and arr["sampled"]:
        if arr["sampled"] >= SAMPLE_LIMIT and arr["in_window"] >= SAMPLE_LIMIT:
            rate = arr["sampled"] / max(1.0, float(arr["span_s"]))
            sources["arrival_rate"] = (
                f"newest {SAMPLE_LIMIT} jobs over {float(arr['span_s']):.0f} s"
            )
        else:
            rate = arr["in_window"] / ARRIVAL_WINDOW_S
            sources["arrival_rate"] = f"{arr['in_window']} jobs enqueued in {ARRIVAL_WINDOW_S:g} s"
    else:
        sources["arrival_rate"] = "no jobs"
    svc = await (
        await conn.execute(
            QUERIES["recent_service_time"], {"window_s": SERVICE_WINDOW_S, "limit": SAMPLE_LIMIT}
        )
    ).fetchone()
    samples = int(svc["n"]) if svc else 0
    service = float(svc["mean_s"]) if svc and samples and svc["mean_s"] is not None else None
    sources["service_time_s"] = (
        f"mean of {samples} jobs finished in {SERVICE_WINDOW_S:g} s" if samples else "no data"
    )
    limits = await (await conn.execute(QUERIES["server_limits"])).fetchone()
    assert limits is not None
    b = budget.budget(
        settings, limits["max_connections"], limits["superuser_reserved"], limits["reserved"]
    )

    backlog = sum(int(q["counts"].get("available", 0)) for q in queues.get("queues", []))
    ages = [
        float(q["oldest_available_age_s"])
        for q in queues.get("queues", [])
        if q.get("oldest_available_age_s") is not None
    ]
    throughput = sum(
        float(q.get("throughput_per_s", {}).get("5m", 0.0)) for q in queues.get("queues", [])
    )

    live = [r for r in replicas if r.get("alive")]
    webs = [r for r in live if r["tier"] == "web"]
    workers = [r for r in live if r["tier"] == "worker"]
    slots = [
        int(s["busy"]) + int(s["free"])
        for r in workers
        if isinstance(s := (r.get("stats") or {}).get("slots"), dict)
    ]
    http = [h for r in webs if isinstance(h := (r.get("stats") or {}).get("http"), dict)]
    if slots:
        concurrency = sum(slots) / len(slots)
        sources["worker_concurrency"] = f"mean of {len(slots)} live workers"
    else:
        concurrency = float(settings.worker_concurrency)
        sources["worker_concurrency"] = "TIERLINE_WORKER_CONCURRENCY; no live worker"
    claims: dict[str, int] = {}
    for tier, rows in (("web", webs), ("worker", workers)):
        claimed = [int(r["claimed_connections"]) for r in rows if r.get("claimed_connections")]
        if claimed:
            claims[tier] = ceil_count(sum(claimed) / len(claimed))
            sources[f"{tier}_claim"] = f"mean claim of {len(claimed)} live {tier} replicas"
        else:
            t: Tier = "web" if tier == "web" else "worker"
            claims[tier] = budget.cpu_capped_pool(settings, t, usable_cores()).claimed
            sources[f"{tier}_claim"] = "this process's pool settings; no live replica"
    return Inputs(
        arrival_rate=rate,
        service_time_s=service,
        service_samples=samples,
        backlog=backlog,
        oldest_age_s=max(ages) if ages else None,
        throughput=throughput,
        worker_concurrency=concurrency,
        worker_replicas=len(workers),
        web_rps=sum(float(h.get("rps", 0.0)) for h in http),
        web_p99_ms=max((float(h.get("p99_ms", 0.0)) for h in http), default=None),
        web_replicas=len(webs),
        budget_total=b.total,
        budget_source=b.source,
        web_claim=claims["web"],
        worker_claim=claims["worker"],
        sources=sources,
    )


class Recommender:
    """Computes recommendations at most every ``cache_s`` and publishes the gauge."""

    def __init__(
        self,
        settings: Settings,
        pool: AsyncConnectionPool[Conn],
        stats: Stats,
        cache_s: float = CACHE_S,
    ) -> None:
        self.settings = settings
        self.pool = pool
        self.stats = stats
        self.cache_s = cache_s
        self._cached: tuple[float, Recommendations] | None = None
        self._lock = asyncio.Lock()

    async def current(self) -> Recommendations:
        async with self._lock:  # concurrent scrapes share one computation
            now = time.monotonic()
            if self._cached and now - self._cached[0] < self.cache_s:
                return self._cached[1]
            queues = await self.stats.queues()
            cluster = await self.stats.cluster()
            async with self.pool.connection() as conn:
                inputs = await read_inputs(
                    conn, self.settings, queues=queues, replicas=cluster["replicas"]
                )
            result = recommend(inputs, self.settings)
            for t in result.tiers():
                metrics.RECOMMENDED.labels(t.tier).set(t.recommended)
            self._cached = (now, result)
            return result


async def live(settings: Settings) -> Recommendations:
    """Read the database once and recommend (``tierline recommend``)."""
    pool = make_pool(settings, min_size=1, max_size=1, name="recommend", direct=True)
    await pool.open(wait=True, timeout=settings.db_connect_timeout_s + 5)
    try:
        return await Recommender(settings, pool, Stats(pool), cache_s=0).current()
    finally:
        await pool.close()
