"""Replica recommendations per tier: how many web and worker replicas the load needs.

Workers follow Little's law: jobs in service = arrival rate x service time, so the slots
needed to keep each at ``TIERLINE_TARGET_UTILIZATION`` are ``rate x time / utilisation``;
draining the backlog within ``TIERLINE_BACKLOG_TARGET_S`` adds ``backlog / target`` jobs
per second, i.e. ``backlog / target x time`` slots. Web replicas follow the request rate
against what one replica serves at the latency target (``TIERLINE_WEB_REPLICA_CAPACITY_RPS``).
Both are clamped to the configured minimum and maximum, then to what the connection
budget can hold; each result names the limit that bound it.

``recommend`` is a pure function of ``Inputs``; ``recommender.py`` reads them from the
database and the shared statistics, ``recommend_report.py`` renders the result for
``tierline recommend``.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from typing import Any

from tierline.settings import Settings, Tier

SERVICE_WINDOW_S = 900.0  # run times of jobs finished over the last 15 minutes

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


def ceil_count(x: float) -> int:
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
    n = ceil_count(raw)
    bound = BACKLOG if n > ceil_count(steady / slots_per_replica) else LITTLE
    formula = (
        f"ceil(({inputs.arrival_rate:.3g}/s x {s:.3g} s / {rho:g} + {inputs.backlog} / "
        f"{settings.backlog_target_s:g} s x {s:.3g} s) / {slots_per_replica:g} slots) = {n}"
    )
    return raw, n, bound, formula


def web_replicas(inputs: Inputs, settings: Settings) -> tuple[float, int, str, str]:
    """Request rate over per-replica capacity at the target utilisation."""
    per_replica = settings.web_replica_capacity_rps * settings.target_utilization
    raw = inputs.web_rps / per_replica
    n = ceil_count(raw)
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
