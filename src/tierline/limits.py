"""Cluster-wide queue limits and pause: what a queue may start, stored in the database.

Per queue (``tierline.queues``): ``max_running`` (jobs running at once across every
worker replica), ``rate_limit`` (``"20/s"``: no more than 20 jobs start in any second;
units ``s``, ``m``, ``h``, ``d``), both per value of the argument ``partition_by`` when
given, and ``paused``. Declared in code with ``app.queue(...)`` (every worker writes the
declaration at start), changed live with ``PATCH /v1/queues/{name}`` or ``tierline queue``;
a live change of a field wins over the code's until the queue is reset. The limits are
enforced by the claim (``claims.py``): a limited queue's claimers take turns under the
queue's row lock, so no number of replicas can exceed them. A queue without a row, or
with a row and no limit, claims exactly as it always did.

``overview`` is what ``GET /v1/queues`` and the metrics show of each queue: its
settings, how many live workers serve it, and whether jobs wait in it unserved (no live
worker lists it: they would wait silently forever).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from psycopg.types.json import Jsonb
from psycopg_pool import AsyncConnectionPool

from tierline import metrics
from tierline.database import Conn
from tierline.jobs import QUEUE_PATTERN
from tierline.queries import QUERIES

_RATE = re.compile(r"^\s*(\d{1,9})\s*/\s*(\d{0,6})\s*(s|sec|second|m|min|minute|h|hour|d|day)\s*$")
_UNIT_S = {"s": 1, "sec": 1, "second": 1, "m": 60, "min": 60, "minute": 60}
_UNIT_S |= {"h": 3600, "hour": 3600, "d": 86400, "day": 86400}
FIELDS = ("max_running", "rate_limit", "partition_by")


@dataclass(frozen=True)
class Rate:
    count: int
    period_s: float

    @classmethod
    def parse(cls, text: str) -> Rate:
        """``"20/s"``, ``"100/m"``, ``"5/10s"`` (5 per 10 seconds), ``"1000/h"``, ``"1/d"``."""
        m = _RATE.match(text)
        if m is None or int(m.group(1)) < 1 or m.group(2) == "0":
            raise ValueError(
                f"rate_limit {text!r}: write COUNT/UNIT, e.g. '20/s', '100/m', '5/10s' "
                "(units s, m, h, d; count at least 1)"
            )
        return cls(int(m.group(1)), float(int(m.group(2) or 1) * _UNIT_S[m.group(3)]))


@dataclass(frozen=True)
class QueueSpec:
    """A queue's limits as the code declares them (``app.queue``)."""

    name: str
    max_running: int | None = None
    rate_limit: str | None = None
    partition_by: str | None = None

    @classmethod
    def make(
        cls,
        name: str,
        max_running: int | None,
        rate_limit: str | None,
        partition_by: str | None,
    ) -> QueueSpec:
        if not re.match(QUEUE_PATTERN, name):
            raise ValueError(f"queue name {name!r} does not match {QUEUE_PATTERN}")
        if max_running is not None and max_running < 0:
            raise ValueError(f"queue {name!r}: max_running must be >= 0")
        if rate_limit is not None:
            Rate.parse(rate_limit)
        if partition_by is not None and not partition_by.strip():
            raise ValueError(f"queue {name!r}: partition_by names an argument")
        return cls(name, max_running, rate_limit, partition_by)

    def row(self) -> dict[str, Any]:
        rate = Rate.parse(self.rate_limit) if self.rate_limit else None
        return {
            "name": self.name,
            "max_running": self.max_running,
            "rate_limit": self.rate_limit,
            "rate_count": rate.count if rate else None,
            "rate_period_s": rate.period_s if rate else None,
            "partition_by": self.partition_by,
            "declared": Jsonb(
                {
                    "max_running": self.max_running,
                    "rate_limit": self.rate_limit,
                    "partition_by": self.partition_by,
                }
            ),
        }


def limited(row: dict[str, Any]) -> bool:
    """Whether a stored queue row needs the limited claim (a limit or a pause)."""
    return bool(row["paused"]) or row["max_running"] is not None or row["rate_count"] is not None


async def declare(conn: Conn, specs: list[QueueSpec]) -> None:
    """Store the code's declarations (fields changed live keep their live values)."""
    for spec in specs:
        await conn.execute(QUERIES["queue_declare"], spec.row())


async def change(conn: Conn, name: str, changes: dict[str, Any]) -> dict[str, Any]:
    """Apply a live change (any of max_running, rate_limit, partition_by, paused, or
    reset=True: back to the code's declaration, unpaused stays as it is); the stored row.
    Workers are woken for the queue, so a resume or a raised limit takes effect now."""
    rate = changes.get("rate_limit")
    parsed = Rate.parse(rate) if isinstance(rate, str) else None
    given = [f for f in FIELDS if f in changes]
    params = {
        "name": name,
        "fields": given,
        "reset": bool(changes.get("reset")),
        "set_max_running": "max_running" in changes,
        "max_running": changes.get("max_running"),
        "set_rate": "rate_limit" in changes,
        "rate_limit": rate,
        "rate_count": parsed.count if parsed else None,
        "rate_period_s": parsed.period_s if parsed else None,
        "set_partition_by": "partition_by" in changes,
        "partition_by": changes.get("partition_by"),
        "paused": changes.get("paused"),
    }
    async with conn.transaction():
        await conn.execute(QUERIES["queue_ensure"], {"name": name})
        row = await (await conn.execute(QUERIES["queue_change"], params)).fetchone()
        assert row is not None
        if params["reset"] and not params["set_rate"] and row["rate_limit"]:
            code = Rate.parse(row["rate_limit"])  # the declared text, parsed again
            row = await (
                await conn.execute(
                    QUERIES["queue_reset_rate"],
                    {"name": name, "rate_count": code.count, "rate_period_s": code.period_s},
                )
            ).fetchone()
    assert row is not None
    return public(row)


def public(row: dict[str, Any]) -> dict[str, Any]:
    """A stored queue row as the API shows it."""
    return {
        "queue": row["name"],
        "paused": bool(row["paused"]),
        "paused_at": row["paused_at"].isoformat() if row.get("paused_at") else None,
        "max_running": row["max_running"],
        "rate_limit": row["rate_limit"],
        "partition_by": row["partition_by"],
        "declared": row.get("declared") or {},
        "overrides": list(row.get("overrides") or []),
    }


async def stored(conn: Conn) -> dict[str, dict[str, Any]]:
    """Every stored queue row, by name, as the API shows it."""
    rows = await (await conn.execute(QUERIES["queue_list"])).fetchall()
    return {r["name"]: public(r) for r in rows}


async def overview(pool: AsyncConnectionPool[Conn], snap: dict[str, Any]) -> dict[str, Any]:
    """The queue statistics (``Stats.queues``) with each queue's settings and serving
    workers; queues with settings but no jobs are listed too. Sets the queue gauges."""
    async with pool.connection() as conn:
        settings = await stored(conn)
        rows = await (await conn.execute(QUERIES["served_queues"])).fetchall()
    served = {r["queue"]: int(r["workers"]) for r in rows}
    out = []
    known = {q["queue"]: q for q in snap["queues"]}
    for name in sorted(set(known) | set(settings)):
        q = dict(known.get(name) or _empty(name))
        cfg = settings.get(name) or public(_NO_SETTINGS | {"name": name})
        counts = q["counts"]
        waiting = counts.get("available", 0) + counts.get("retrying", 0)
        waiting += counts.get("scheduled", 0) if q.get("oldest_available_age_s") else 0
        q.update({k: v for k, v in cfg.items() if k != "queue"})
        q["workers"] = served.get(name, 0)
        q["unserved"] = waiting > 0 and q["workers"] == 0
        metrics.QUEUE_PAUSED.labels(name).set(int(q["paused"]))
        metrics.QUEUE_UNSERVED.labels(name).set(int(q["unserved"]))
        out.append(q)
    return {**snap, "queues": out}


_NO_SETTINGS: dict[str, Any] = {
    "paused": False,
    "paused_at": None,
    "max_running": None,
    "rate_limit": None,
    "partition_by": None,
    "declared": {},
    "overrides": [],
}


def _empty(name: str) -> dict[str, Any]:
    states = ("scheduled", "available", "running", "retrying", "succeeded", "failed", "cancelled")
    return {
        "queue": name,
        "counts": dict.fromkeys(states, 0),
        "oldest_available_age_s": None,
        "throughput_per_s": {"1m": 0.0, "5m": 0.0, "15m": 0.0},
        "finished": {"1m": 0, "5m": 0, "15m": 0},
        "failed_15m": 0,
    }
