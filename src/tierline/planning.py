"""``tierline plan``: the connection arithmetic of a planned deployment, against the
primary's budget and, with a read replica (``TIERLINE_DATABASE_READ_URL``), against the
replica's own budget, which only the web tier's read pools use."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from tierline import budget
from tierline.budget import Budget
from tierline.cores import Cores, usable_cores
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
class ReadPlan:
    """The read replica's side: every web replica's read pool against its budget."""

    budget: Budget
    web: TierPlan  # the web tier's read pool (no LISTEN connection on the replica)
    problems: list[str] = field(default_factory=list)

    @property
    def total(self) -> int:
        return self.web.total

    @property
    def fits(self) -> bool:
        return self.total <= self.budget.total


@dataclass
class Plan:
    budget: Budget
    cores: Cores
    tiers: list[TierPlan]
    warnings: list[str] = field(default_factory=list)  # caps and undersized pools
    problems: list[str] = field(default_factory=list)  # why it does not fit, what would
    notes: list[str] = field(default_factory=list)
    read: ReadPlan | None = None

    @property
    def total(self) -> int:
        return sum(t.total for t in self.tiers)

    @property
    def primary_fits(self) -> bool:
        return self.total <= self.budget.total

    @property
    def fits(self) -> bool:
        """Both servers' budgets hold the plan."""
        return self.primary_fits and (self.read is None or self.read.fits)

    @property
    def shortfall(self) -> int:
        """Connections missing from the budget (0 when the plan fits)."""
        return max(0, self.total - self.budget.total)


async def read_server_limits(settings: Settings, *, read: bool = False) -> tuple[int, int, int]:
    """(max_connections, superuser_reserved, reserved) of the primary, or of the read
    replica (``read``)."""
    from tierline.database import connect
    from tierline.queries import QUERIES

    dsn = settings.read_dsn() if read else settings.direct_dsn()
    assert dsn is not None
    conn = await connect(dsn, settings, attempts=3)
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
    read_server: tuple[int, int, int] | None = None,
) -> Plan:
    """The connection arithmetic of ``web`` and ``workers`` replicas against the budget.

    ``cores`` (per replica, may be fractional like a pod's CPU limit) defaults to what
    this machine allows; ``server`` is (max_connections, superuser_reserved, reserved)
    when the budget comes from the server rather than ``TIERLINE_DB_MAX_CONNECTIONS``;
    ``read_server`` the same of the read replica, when one is configured
    (``TIERLINE_DATABASE_READ_URL``) and ``TIERLINE_DB_READ_MAX_CONNECTIONS`` is unset.
    """
    if cores is not None:
        usable = max(1, math.ceil(cores - 1e-9))
        core_info = Cores(usable=usable, host=usable, source="--cores", quota=cores)
    else:
        core_info = usable_cores()
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
    worker = tiers[1]
    need = budget.worker_pool_need(settings.worker_concurrency, False)
    need_db = budget.worker_pool_need(settings.worker_concurrency, True)
    if workers and worker.pool.max_size < need:
        result.warnings.append(
            f"worker pool {worker.pool.max_size} is below the {need} connections a worker "
            "needs (claimer and result writer); raise TIERLINE_WORKER_DB_POOL_MAX"
        )
    elif workers and worker.pool.max_size < need_db:
        result.notes.append(
            f"if handlers use ctx.connection(), a worker needs 2 + "
            f"TIERLINE_WORKER_CONCURRENCY = {need_db} connections; with a pool of "
            f"{worker.pool.max_size} they queue for connections (pool timeouts retry the job)"
        )
    if settings.read_dsn() is not None:
        result.read = _read_plan(settings, web, core_info, read_server)
        for cap in result.read.web.pool.caps:
            result.warnings.append(
                f"{cap.variable}: requested {cap.requested}, capped to {cap.applied} ({cap.reason})"
            )
    if not result.primary_fits:
        result.problems = _shortfall(result)
    return result


def _read_plan(
    settings: Settings, web: int, cores: Cores, server: tuple[int, int, int] | None
) -> ReadPlan:
    if settings.db_read_max_connections is not None:
        b = budget.budget(settings, 0, 0, read=True)
    else:
        assert server is not None, "the read replica's limits, or TIERLINE_DB_READ_MAX_CONNECTIONS"
        b = budget.budget(settings, *server, read=True)
    read = ReadPlan(b, TierPlan("web", web, budget.read_pool(settings, cores)))
    if not read.fits:
        per = read.web.per_replica
        fit = b.total // per if per else 0
        pool_max = b.total // web if web else 0
        line = (
            f"web tier's read pools: {web} x {per} = {read.total} connections on the "
            f"read replica; at most {fit} web replicas fit its budget"
        )
        if pool_max >= budget.MIN_USABLE_POOL["web"]:
            line += f", or keep {web} with TIERLINE_WEB_DB_READ_POOL_MAX={pool_max}"
        read.problems = [
            line,
            "deployed anyway, the web replicas whose read pool does not fit send their "
            "reads to the primary (logged as a WARNING) until read budget frees",
            f"or raise the read budget by {read.total - b.total} to {read.total} "
            "(TIERLINE_DB_READ_MAX_CONNECTIONS, or the replica's max_connections)",
        ]
    return read


def _shortfall(p: Plan) -> list[str]:
    """Say which tier needs what, and the changes that would make the plan fit."""
    b = p.budget.total
    lines = []
    for t in sorted(p.tiers, key=lambda t: -t.total):
        if not t.replicas:
            continue
        other = p.total - t.total
        others = ", ".join(_replicas(o.replicas, o.tier) for o in p.tiers if o is not t)
        line = f"{t.tier} tier: {t.replicas} x {t.per_replica} = {t.total} connections"
        if other > b:
            line += (
                f"; the rest of the plan alone ({others}: {other}) exceeds the budget, so "
                f"fewer {t.tier} replicas cannot make it fit"
            )
        else:
            fit = (b - other) // t.per_replica
            line += f"; beside {others} as planned, at most {fit} {t.tier} replicas fit"
            pool_max = (b - other) // t.replicas - budget.LISTEN_CONNECTIONS
            if pool_max >= budget.MIN_USABLE_POOL[t.tier]:
                line += (
                    f", or keep {t.replicas} with TIERLINE_{t.tier.upper()}_DB_POOL_MAX="
                    f"{pool_max} ({pool_max + budget.LISTEN_CONNECTIONS} per replica)"
                )
        lines.append(line)
    smallest = {t: budget.MIN_USABLE_POOL[t] + budget.LISTEN_CONNECTIONS for t in ("web", "worker")}
    floor = sum(t.replicas * smallest[t.tier] for t in p.tiers)
    if floor <= b:
        lines.append(
            "deployed anyway, replicas that start after the budget is spent get smaller "
            f"pools (each cap logged as a WARNING), down to {smallest['web']} (web) / "
            f"{smallest['worker']} (worker) connections per replica: {floor} in all"
        )
    else:
        lines.append(
            f"deployed anyway, even the smallest pools ({smallest['web']} per web, "
            f"{smallest['worker']} per worker replica: {floor} in all) exceed the budget: "
            "some replicas stay not-ready (/readyz 503) until others stop"
        )
    lines.append(
        f"or raise the budget by {p.shortfall} to {p.total} (TIERLINE_DB_MAX_CONNECTIONS, "
        "or the server's max_connections; see docs/pool-sizing.md)"
    )
    return lines


def _replicas(n: int, tier: str) -> str:
    return f"{n} {tier} replica" + ("" if n == 1 else "s")


def render(p: Plan) -> str:
    """The plan as the table and lists ``tierline plan`` prints."""
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
    verdict = "fits" if p.primary_fits else "DOES NOT FIT"
    lines += [
        "",
        f"budget: {p.budget.total} connections ({p.budget.source})",
        f"cores per replica: {p.cores.usable} ({p.cores.source})",
        f"planned: {p.total} of {p.budget.total} -> {verdict}"
        + (
            f" ({p.budget.total - p.total} spare)"
            if p.primary_fits
            else f" (short by {p.total - p.budget.total})"
        ),
    ]
    if p.problems:
        lines += ["", f"does not fit, short by {p.shortfall} connections:"]
        lines += [f"  - {w}" for w in p.problems]
    if p.read is not None:
        lines += ["", *_render_read(p.read)]
    if p.warnings:
        lines += ["", "warnings:"] + [f"  - {w}" for w in p.warnings]
    if p.notes:
        lines += ["", "notes:"] + [f"  - {w}" for w in p.notes]
    return "\n".join(lines)


def _render_read(r: ReadPlan) -> list[str]:
    """The read replica's table and verdict."""
    t = r.web
    rows = [
        ("read replica", "replicas", "read pool max (requested)", "per replica", "total"),
        ("web", str(t.replicas), f"{t.pool.max_size} ({t.pool.requested_max})",
         str(t.per_replica), str(t.total)),
    ]  # fmt: skip
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = [
        "  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() for row in rows
    ]
    lines.insert(1, "  ".join("-" * w for w in widths))
    spare = r.budget.total - r.total
    lines += [
        "",
        f"read budget: {r.budget.total} connections ({r.budget.source})",
        f"planned on the read replica: {r.total} of {r.budget.total} -> "
        + (f"fits ({spare} spare)" if r.fits else f"DOES NOT FIT (short by {-spare})"),
    ]
    if r.problems:
        lines += ["", f"the read replica does not fit, short by {-spare} connections:"]
        lines += [f"  - {w}" for w in r.problems]
    return lines
