"""Replica recommendations per tier: how many web and worker replicas the load needs.

Workers follow Little's law: jobs in service = arrival rate x service time, so the slots
needed to keep each at ``TIERLINE_TARGET_UTILIZATION`` are ``rate x time / utilisation``;
draining the backlog within ``TIERLINE_BACKLOG_TARGET_S`` adds ``backlog / target`` jobs
per second, i.e. ``backlog / target x time`` slots. Web replicas follow the request rate
against what one replica serves at the latency target (``TIERLINE_WEB_REPLICA_CAPACITY_RPS``).
Both are clamped to the configured minimum and maximum, then to what the connection
budget can hold; each result names the limit that bound it.

``recommend`` is a pure function of ``Inputs``; ``read_inputs`` and ``Recommender`` read
them from the database (bounded, index-only samples) and the shared statistics.
"""

from __future__ import annotations

import asyncio
import math
import time
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from typing import Any

from psycopg.rows import dict_row
from psycopg_pool import AsyncConnectionPool

from tierline import budget, metrics
from tierline.cores import usable_cores
from tierline.database import Conn
from tierline.queries import QUERIES
from tierline.settings import Settings, Tier
from tierline.stats import Stats

ARRIVAL_WINDOW_S = 300.0  # jobs enqueued over the last 5 minutes
SERVICE_WINDOW_S = 900.0  # run times of jobs finished over the last 15 minutes
SAMPLE_LIMIT = 10_000  # rows read at most per statistic
CACHE_S = 10.0  # a replica recomputes at most this often

# The limit that decided a recommendation.
LITTLE = "little's law"
BACKLOG = "backlog"
REQUEST_RATE = "request rate"
NO_DATA = "no data"
MIN = "min"
MAX = "max"
BUDGET = "connection budget"


@dataclass(frozen=True)
class Inputs:
    """What the recommendation is computed from; rates per second, times in seconds."""

    arrival_rate: float = 0.0  # jobs enqueued per second
    service_time_s: float | None = None  # mean run time of recently finished jobs
    service_samples: int = 0
    backlog: int = 0  # due jobs waiting for a slot
    oldest_age_s: float | None = None
    throughput: float = 0.0  # jobs finished per second (5 minutes)
    worker_concurrency: float = 10.0  # slots per worker replica
    worker_replicas: int = 0  # live now
    web_rps: float = 0.0  # requests per second over all live web replicas
    web_p99_ms: float | None = None  # the worst replica's
    web_replicas: int = 0
    budget_total: int | None = None  # connections all replicas may claim
    budget_source: str = ""
    web_claim: int = 5  # connections one web replica claims (pool max + LISTEN)
    worker_claim: int = 5
    sources: dict[str, str] = field(default_factory=dict)  # where each input came from


@dataclass(frozen=True)
class TierRecommendation:
    tier: Tier
    current: int
    recommended: int
    bound: str  # little's law | backlog | request rate | no data | min | max | connection budget
    formula: str
    raw: float  # the formula's replicas before rounding and limits
    minimum: int
    maximum: int
    budget_max: int | None  # most replicas the connection budget leaves this tier

    @property
    def change(self) -> int:
        return self.recommended - self.current


@dataclass(frozen=True)
class Recommendations:
    inputs: Inputs
    web: TierRecommendation
    worker: TierRecommendation
    computed_at: datetime = field(default_factory=lambda: datetime.now(UTC))

    def tiers(self) -> list[TierRecommendation]:
        return [self.web, self.worker]

    def as_dict(self) -> dict[str, Any]:
        return {
            "computed_at": self.computed_at.isoformat(),
            "tiers": {
                t.tier: {**asdict(t), "change": t.change, "raw": round(t.raw, 3)}
                for t in self.tiers()
            },
            "inputs": asdict(self.inputs),
        }


def _ceil(x: float) -> int:
    """Ceiling that ignores float noise (4.0000000001 slots are 4)."""
    return max(0, math.ceil(x - 1e-9))


def worker_replicas(inputs: Inputs, settings: Settings) -> tuple[float, int, str, str]:
    """Little's law plus the backlog term: (raw replicas, replicas, bound, formula)."""
    slots_per_replica = max(1.0, inputs.worker_concurrency)
    s = inputs.service_time_s
    if s is None:
        # Nothing finished recently: no service time to size by. Keep what runs, and at
        # least one replica while work waits (it is what will produce a service time).
        waiting = inputs.backlog > 0 or inputs.arrival_rate > 0
        n = max(inputs.worker_replicas, 1 if waiting else 0)
        return float(n), n, NO_DATA, f"no job finished in the last {SERVICE_WINDOW_S:g} s"
    rho = settings.target_utilization
    steady = inputs.arrival_rate * s / rho
    extra = inputs.backlog / settings.backlog_target_s * s
    raw = (steady + extra) / slots_per_replica
    n = _ceil(raw)
    bound = BACKLOG if n > _ceil(steady / slots_per_replica) else LITTLE
    formula = (
        f"ceil(({inputs.arrival_rate:.3g}/s x {s:.3g} s / {rho:g} + {inputs.backlog} / "
        f"{settings.backlog_target_s:g} s x {s:.3g} s) / {slots_per_replica:g} slots) = {n}"
    )
    return raw, n, bound, formula


def web_replicas(inputs: Inputs, settings: Settings) -> tuple[float, int, str, str]:
    """Request rate over per-replica capacity at the target utilisation."""
    per_replica = settings.web_replica_capacity_rps * settings.target_utilization
    raw = inputs.web_rps / per_replica
    n = _ceil(raw)
    formula = (
        f"ceil({inputs.web_rps:.3g} req/s / ({settings.web_replica_capacity_rps:g} req/s x "
        f"{settings.target_utilization:g})) = {n}"
    )
    return raw, n, REQUEST_RATE, formula


def _clamp(n: int, bound: str, lo: int, hi: int) -> tuple[int, str]:
    if n < lo:
        return lo, MIN
    if n > hi:
        return hi, MAX
    return n, bound


def recommend(inputs: Inputs, settings: Settings) -> Recommendations:
    """Replicas per tier for ``inputs``; pure.

    The budget is shared: the web tier is sized first (requests cannot wait in a queue;
    jobs can), leaving room for the worker tier's minimum; workers get what remains.
    """
    web_raw, web_n, web_bound, web_formula = web_replicas(inputs, settings)
    web_n, web_bound = _clamp(
        web_n, web_bound, settings.web_replicas_min, settings.web_replicas_max
    )
    wk_raw, wk_n, wk_bound, wk_formula = worker_replicas(inputs, settings)
    wk_n, wk_bound = _clamp(
        wk_n, wk_bound, settings.worker_replicas_min, settings.worker_replicas_max
    )
    web_cap = wk_cap = None
    if inputs.budget_total is not None:
        web_claim, wk_claim = max(1, inputs.web_claim), max(1, inputs.worker_claim)
        reserve = min(wk_n, settings.worker_replicas_min) * wk_claim
        web_cap = max(0, (inputs.budget_total - reserve) // web_claim)
        if web_n > web_cap:
            web_n, web_bound = web_cap, BUDGET
        wk_cap = max(0, (inputs.budget_total - web_n * web_claim) // wk_claim)
        if wk_n > wk_cap:
            wk_n, wk_bound = wk_cap, BUDGET
    return Recommendations(
        inputs=inputs,
        web=TierRecommendation(
            "web",
            inputs.web_replicas,
            web_n,
            web_bound,
            web_formula,
            web_raw,
            settings.web_replicas_min,
            settings.web_replicas_max,
            web_cap,
        ),
        worker=TierRecommendation(
            "worker",
            inputs.worker_replicas,
            wk_n,
            wk_bound,
            wk_formula,
            wk_raw,
            settings.worker_replicas_min,
            settings.worker_replicas_max,
            wk_cap,
        ),
    )


# -- live inputs ---------------------------------------------------------------------------
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
            claims[tier] = _ceil(sum(claimed) / len(claimed))
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
    pool: AsyncConnectionPool[Conn] = AsyncConnectionPool(
        settings.direct_dsn(),
        min_size=1,
        max_size=1,
        open=False,
        name="recommend",
        connection_class=Conn,
        kwargs={"autocommit": True, "row_factory": dict_row},
    )
    await pool.open(wait=True, timeout=settings.db_connect_timeout_s + 5)
    try:
        return await Recommender(settings, pool, Stats(pool), cache_s=0).current()
    finally:
        await pool.close()


# -- rendering -----------------------------------------------------------------------------
def render(rec: Recommendations, settings: Settings) -> str:
    """The CLI table with its reasoning: inputs, formula, result, binding limit."""
    i = rec.inputs
    rows = [("tier", "now", "recommended", "bound by", "formula")]
    for t in rec.tiers():
        rows.append((t.tier, str(t.current), str(t.recommended), t.bound, t.formula))
    widths = [max(len(r[c]) for r in rows) for c in range(4)]
    lines = ["  ".join([*(r[c].ljust(widths[c]) for c in range(4)), r[4]]).rstrip() for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths) + "  " + "-" * 7)

    def fmt(x: float | None, unit: str, digits: int = 3) -> str:
        return "-" if x is None else f"{x:.{digits}g} {unit}".strip()

    src = i.sources
    lines += [
        "",
        "inputs:",
        f"  arrival rate        {fmt(i.arrival_rate, 'jobs/s')}  ({src.get('arrival_rate', '')})",
        f"  service time        {fmt(i.service_time_s, 's')}  ({src.get('service_time_s', '')})",
        f"  backlog             {i.backlog} due jobs waiting, oldest {fmt(i.oldest_age_s, 's')}",
        f"  throughput          {fmt(i.throughput, 'jobs/s')} (finished, 5 min)",
        f"  worker slots        {i.worker_concurrency:g} per replica "
        f"({src.get('worker_concurrency', '')})",
        f"  web requests        {fmt(i.web_rps, 'req/s')}, worst p99 {fmt(i.web_p99_ms, 'ms')}",
        f"  connection budget   {i.budget_total} ({i.budget_source})",
        f"  claim per replica   web {i.web_claim}, worker {i.worker_claim} (pool max + 1 LISTEN)",
        "",
        "targets:",
        f"  utilisation         {settings.target_utilization:g} (TIERLINE_TARGET_UTILIZATION)",
        f"  backlog drained in  {settings.backlog_target_s:g} s (TIERLINE_BACKLOG_TARGET_S)",
        f"  web capacity        {settings.web_replica_capacity_rps:g} req/s per replica "
        "(TIERLINE_WEB_REPLICA_CAPACITY_RPS)",
    ]
    for t in rec.tiers():
        cap = "no budget cap" if t.budget_max is None else f"budget allows {t.budget_max}"
        lines.append(
            f"  {t.tier + ' replicas':<19} {t.minimum}..{t.maximum} "
            f"(TIERLINE_{t.tier.upper()}_REPLICAS_MIN/MAX); {cap}"
        )
    advice = []
    for t in rec.tiers():
        if t.change > 0:
            advice.append(f"add {t.change} {t.tier} replica(s) ({t.bound})")
        elif t.change < 0:
            advice.append(f"{t.tier} could lose {-t.change} replica(s) ({t.bound})")
    lines += ["", "advice: " + ("; ".join(advice) if advice else "no change")]
    return "\n".join(lines)
