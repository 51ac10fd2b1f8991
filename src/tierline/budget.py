"""The connection budget: pool caps and the arithmetic of a deployment.

Pure functions; the replica registry (``replica.py``) applies them against the live
claims in the database, ``tierline plan`` against a planned deployment. The usable
cores they cap pools by come from ``cores.py``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace

from tierline.cores import Cores
from tierline.settings import Settings, Tier, env_name

LISTEN_CONNECTIONS = 1  # every replica holds one LISTEN connection outside its pool
MIN_USABLE_POOL = {"web": 1, "worker": 2}  # worker: one claimer, one flusher


@dataclass(frozen=True)
class Cap:
    """One reduction of a requested setting, with the reason (logged as a WARNING)."""

    variable: str
    requested: int
    applied: int
    reason: str


@dataclass(frozen=True)
class PoolPlan:
    """A pool's size. ``pool``: the settings it comes from (``web_db_pool``,
    ``worker_db_pool``, ``web_db_read_pool``: ``TIERLINE_<POOL>_MIN/MAX``); ``listen``:
    the connections claimed beside it on the same server (the LISTEN connection on the
    primary; none on a read replica)."""

    tier: Tier
    requested_min: int
    requested_max: int
    min_size: int
    max_size: int
    caps: list[Cap] = field(default_factory=list)
    pool: str = ""
    listen: int = LISTEN_CONNECTIONS

    @property
    def setting(self) -> str:
        return self.pool or f"{self.tier}_db_pool"

    @property
    def claimed(self) -> int:
        return self.max_size + self.listen

    def sized(self, min_size: int, max_size: int, caps: list[Cap]) -> PoolPlan:
        return replace(self, min_size=min_size, max_size=max_size, caps=caps)


@dataclass(frozen=True)
class Budget:
    total: int
    source: str


def budget(
    settings: Settings,
    max_connections: int,
    superuser_reserved: int,
    server_reserved: int = 0,
    *,
    read: bool = False,
) -> Budget:
    """A server's budget: the explicit setting, or what the server allows minus reserves.
    ``read``: the read replica's (``TIERLINE_DB_READ_MAX_CONNECTIONS``), else the primary's
    (``TIERLINE_DB_MAX_CONNECTIONS``)."""
    explicit = "db_read_max_connections" if read else "db_max_connections"
    if getattr(settings, explicit) is not None:
        return Budget(getattr(settings, explicit), env_name(explicit))
    total = (
        max_connections - superuser_reserved - server_reserved - settings.db_reserved_connections
    )
    return Budget(
        max(0, total),
        f"server max_connections {max_connections} - superuser_reserved_connections "
        f"{superuser_reserved}"
        + (f" - reserved_connections {server_reserved}" if server_reserved else "")
        + f" - {env_name('db_reserved_connections')} {settings.db_reserved_connections}",
    )


def cpu_capped_pool(settings: Settings, tier: Tier, cores: Cores) -> PoolPlan:
    """The pool after the CPU cap, before the budget is consulted."""
    req_min, req_max = settings.pool_bounds(tier)
    return _cpu_capped(PoolPlan(tier, req_min, req_max, req_min, req_max), settings, cores)


def read_pool(settings: Settings, cores: Cores) -> PoolPlan:
    """The web tier's read pool on the replica, after the CPU cap: the same cap as the
    primary's pool (more connections than cores x factor only queue), counted against
    the replica server's budget, with no LISTEN connection beside it."""
    lo, hi = settings.web_db_read_pool_min, settings.web_db_read_pool_max
    plan = PoolPlan("web", lo, hi, lo, hi, pool="web_db_read_pool", listen=0)
    return _cpu_capped(plan, settings, cores)


def _cpu_capped(plan: PoolPlan, settings: Settings, cores: Cores) -> PoolPlan:
    caps: list[Cap] = []
    size = plan.requested_max
    cpu_cap = max(1, math.floor(cores.usable * settings.db_pool_cpu_factor))
    if size > cpu_cap:
        caps.append(
            Cap(
                env_name(f"{plan.setting}_max"),
                plan.requested_max,
                cpu_cap,
                f"{cores.usable} usable core{'' if cores.usable == 1 else 's'} "
                f"({cores.source}) x "
                f"{env_name('db_pool_cpu_factor')} {settings.db_pool_cpu_factor:g}",
            )
        )
        size = cpu_cap
    return _with_min(plan.sized(min(plan.requested_min, size), size, caps))


def fit_to_budget(plan: PoolPlan, free: int, budget_total: int) -> PoolPlan | None:
    """Shrink the pool to what the budget has left (after the LISTEN connection).

    None when not even the smallest usable pool fits: the replica must wait.
    """
    room = free - plan.listen
    if room >= plan.max_size:
        return plan
    if room < MIN_USABLE_POOL[plan.tier]:
        return None
    cap = Cap(
        env_name(f"{plan.setting}_max"),
        plan.requested_max,
        room,
        f"connection budget: {free} of {budget_total} connections left"
        + (f" ({plan.listen} for LISTEN)" if plan.listen else ""),
    )
    # The minimum follows the new maximum: a _MIN cap made against the CPU cap is stale.
    caps = [c for c in plan.caps if not c.variable.endswith("_MIN")]
    return _with_min(plan.sized(min(plan.requested_min, room), room, [*caps, cap]))


def _with_min(plan: PoolPlan) -> PoolPlan:
    """Cap the pool minimum at its maximum, with a Cap saying so."""
    if plan.requested_min <= plan.max_size:
        return plan
    return plan.sized(
        plan.max_size,
        plan.max_size,
        [
            *(c for c in plan.caps if not c.variable.endswith("_MIN")),
            Cap(
                env_name(f"{plan.setting}_min"),
                plan.requested_min,
                plan.max_size,
                "the pool's effective maximum is lower",
            ),
        ],
    )


def worker_pool_need(concurrency: int, handlers_use_db: bool) -> int:
    """Connections a worker replica uses at once: claimer and flusher, plus one per
    concurrent handler when handlers borrow connections (``ctx.connection()``)."""
    return MIN_USABLE_POOL["worker"] + (concurrency if handlers_use_db else 0)
