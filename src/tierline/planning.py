"""``tierline plan``: the connection arithmetic of a planned deployment."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from tierline import budget
from tierline.budget import Budget, Cores
from tierline.settings import Settings, Tier


@dataclass
class TierPlan:
    tier: Tier
    replicas: int
    pool: budget.PoolPlan

    @property
    def per_replica(self) -> int:
        return self.pool.claimed

    @property
    def total(self) -> int:
        return self.replicas * self.per_replica


@dataclass
class Plan:
    budget: Budget
    cores: Cores
    tiers: list[TierPlan]
    warnings: list[str] = field(default_factory=list)

    @property
    def total(self) -> int:
        return sum(t.total for t in self.tiers)

    @property
    def fits(self) -> bool:
        return self.total <= self.budget.total


async def read_server_limits(settings: Settings) -> tuple[int, int, int]:
    from tierline.database import connect
    from tierline.queries import QUERIES

    conn = await connect(settings.direct_dsn(), settings, attempts=3)
    try:
        row = await (await conn.execute(QUERIES["server_limits"])).fetchone()
    finally:
        await conn.close()
    assert row is not None
    return row["max_connections"], row["superuser_reserved"], row["reserved"]


def plan(
    settings: Settings,
    *,
    web: int,
    workers: int,
    cores: float | None = None,
    server: tuple[int, int, int] | None = None,
) -> Plan:
    if cores is not None:
        usable = max(1, math.ceil(cores - 1e-9))
        core_info = budget.Cores(usable=usable, host=usable, source="--cores", quota=cores)
    else:
        core_info = budget.usable_cores()
    if server is not None:
        b = budget.budget(settings, *server)
    else:
        assert settings.db_max_connections is not None
        b = budget.Budget(settings.db_max_connections, "TIERLINE_DB_MAX_CONNECTIONS")
    tiers = [
        TierPlan("web", web, budget.cpu_capped_pool(settings, "web", core_info)),
        TierPlan("worker", workers, budget.cpu_capped_pool(settings, "worker", core_info)),
    ]
    result = Plan(b, core_info, tiers)
    for t in tiers:
        for cap in t.pool.caps:
            result.warnings.append(
                f"{cap.variable}: requested {cap.requested}, capped to {cap.applied} ({cap.reason})"
            )
    need = budget.worker_pool_need(settings.worker_concurrency, False)
    if workers and tiers[1].pool.max_size < need:
        result.warnings.append(
            f"worker pool {tiers[1].pool.max_size} is below the {need} connections a worker needs"
        )
    if not result.fits:
        short = result.total - b.total
        for t in sorted(tiers, key=lambda t: -t.total):
            if t.replicas:
                fit = max(0, (b.total - (result.total - t.total)) // t.per_replica)
                result.warnings.append(
                    f"does not fit: short by {short} connections; the {t.tier} tier needs "
                    f"{t.total} ({t.replicas} x {t.per_replica}); at most {fit} {t.tier} "
                    f"replicas fit beside the rest"
                )
        smallest = {
            tp.tier: budget.MIN_USABLE_POOL[tp.tier] + budget.LISTEN_CONNECTIONS for tp in tiers
        }
        floor = sum(tp.replicas * smallest[tp.tier] for tp in tiers)
        if floor <= b.total:
            result.warnings.append(
                "replicas past the budget start with smaller pools (each cap is logged), "
                f"down to {smallest['web']} (web) / {smallest['worker']} (worker) connections"
            )
        else:
            result.warnings.append(
                f"even at the smallest pools ({floor} connections) some replicas would stay "
                "not-ready until budget frees"
            )
    return result


def render(p: Plan) -> str:
    rows = [("tier", "replicas", "pool max (requested)", "listen", "per replica", "total")]
    for t in p.tiers:
        rows.append(
            (
                t.tier,
                str(t.replicas),
                f"{t.pool.max_size} ({t.pool.requested_max})",
                str(budget.LISTEN_CONNECTIONS),
                str(t.per_replica),
                str(t.total),
            )
        )
    rows.append(("all", str(sum(t.replicas for t in p.tiers)), "", "", "", str(p.total)))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    verdict = "fits" if p.fits else "DOES NOT FIT"
    lines += [
        "",
        f"budget: {p.budget.total} connections ({p.budget.source})",
        f"cores per replica: {p.cores.usable} ({p.cores.source})",
        f"planned: {p.total} of {p.budget.total} -> {verdict}"
        + (
            f" ({p.budget.total - p.total} spare)"
            if p.fits
            else f" (short by {p.total - p.budget.total})"
        ),
    ]
    if p.warnings:
        lines += ["", "warnings:"] + [f"  - {w}" for w in p.warnings]
    return "\n".join(lines)
