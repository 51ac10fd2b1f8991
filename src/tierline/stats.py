"""Shared statistics: queue depth, age and throughput, and the replica registry view.

Counting the jobs table is the one expensive read; it happens at most every few seconds
in the whole deployment: whoever finds the shared snapshot stale recomputes it under a
try-lock and stores it, everyone else reads the small stored row.
"""

from __future__ import annotations

import time
from typing import Any

from psycopg.types.json import Jsonb
from psycopg_pool import AsyncConnectionPool

from tierline import metrics
from tierline.database import Conn
from tierline.jobs import State
from tierline.queries import QUERIES
from tierline.queue import Reads

FRESH_S = 5.0  # a snapshot younger than this is used as it is
LOCAL_CACHE_S = 2.0  # and read from the database at most this often per process


class Stats:
    """``reads``: where the snapshot and the registry are read (the web tier's read
    routing); computing and storing a snapshot always happens on ``pool``."""

    def __init__(self, pool: AsyncConnectionPool[Conn], reads: Reads | None = None) -> None:
        self.pool = pool
        self.reads = reads
        self._queues: tuple[float, dict[str, Any]] | None = None
        self._cluster: tuple[float, dict[str, Any]] | None = None

    async def queues(self) -> dict[str, Any]:
        now = time.monotonic()
        if self._queues and now - self._queues[0] < LOCAL_CACHE_S:
            return self._queues[1]
        stored = None
        if self.reads is not None:
            rows, _ = await self.reads.fetch(QUERIES["stats_get_as_of"], {"key": "queues"})
            if rows and rows[0]["age_s"] < FRESH_S:
                stored = rows[0]["value"]
        if stored is not None:
            return self._publish_queues(now, stored)
        async with self.pool.connection() as conn:
            row = await (await conn.execute(QUERIES["stats_get"], {"key": "queues"})).fetchone()
            if row is not None and row["age_s"] < FRESH_S:
                snap = row["value"]
            else:
                async with conn.transaction():
                    locked = await (await conn.execute(QUERIES["stats_lock"])).fetchone()
                    if locked and locked["ok"]:
                        snap = await compute_queue_stats(conn)
                        await conn.execute(
                            QUERIES["stats_put"], {"key": "queues", "value": Jsonb(snap)}
                        )
                    elif row is not None:
                        snap = row["value"]  # someone else is refreshing it right now
                    else:
                        snap = await compute_queue_stats(conn)
        return self._publish_queues(now, snap)

    def _publish_queues(self, now: float, stored: dict[str, Any]) -> dict[str, Any]:
        snap = dict(stored)
        self._queues = (now, snap)
        for q in snap["queues"]:
            for state, n in q["counts"].items():
                metrics.QUEUE_DEPTH.labels(q["queue"], state).set(n)
            metrics.QUEUE_OLDEST.labels(q["queue"]).set(q["oldest_available_age_s"] or 0.0)
        return snap

    async def cluster(self) -> dict[str, Any]:
        """The registry: replicas with liveness, per-tier totals and the budget."""
        now = time.monotonic()
        if self._cluster and now - self._cluster[0] < 1.0:
            return self._cluster[1]
        if self.reads is not None:
            rows, _ = await self.reads.fetch(QUERIES["list_replicas"], {})
        else:
            async with self.pool.connection() as conn:
                rows = await (await conn.execute(QUERIES["list_replicas"])).fetchall()
        async with self.pool.connection() as conn:
            limits = await (await conn.execute(QUERIES["server_limits"])).fetchone()
            conns = await (await conn.execute(QUERIES["server_connections"])).fetchone()
        replicas = []
        tiers: dict[str, dict[str, int]] = {
            t: {
                "alive": 0,
                "ready": 0,
                "dead": 0,
                "claimed_connections": 0,
                "pool_max": 0,
                "read_claimed_connections": 0,
            }
            for t in ("web", "worker")
        }
        for r in rows:
            alive = bool(r["alive"])
            t = tiers[r["tier"]]
            if alive:
                t["alive"] += 1
                t["ready"] += int(bool(r["ready"]))
                t["claimed_connections"] += r["claimed"]
                t["pool_max"] += r["pool_max"]
                t["read_claimed_connections"] += r["read_claimed"]
            elif r["stopped_at"] is None:
                t["dead"] += 1
            replicas.append(
                {
                    "id": str(r["id"]),
                    "tier": r["tier"],
                    "host": r["host"],
                    "pid": r["pid"],
                    "version": r["version"],
                    "started_at": r["started_at"].isoformat(),
                    "heartbeat_at": r["heartbeat_at"].isoformat(),
                    "heartbeat_age_s": round(float(r["heartbeat_age_s"]), 3),
                    "status": "alive" if alive else ("stopped" if r["stopped_at"] else "dead"),
                    "alive": alive,
                    "ready": bool(r["ready"]) and alive,
                    "reason": r["reason"],
                    "pool_requested_max": r["requested_pool"],
                    "pool_max": r["pool_max"],
                    "claimed_connections": r["claimed"] if alive else 0,
                    "read_pool_requested_max": r["read_requested_pool"],
                    "read_pool_max": r["read_pool_max"],
                    "read_claimed_connections": r["read_claimed"] if alive else 0,
                    "stats": r["stats"],
                }
            )
        claimed = sum(t["claimed_connections"] for t in tiers.values())
        read_claimed = sum(t["read_claimed_connections"] for t in tiers.values())
        server = {
            "max_connections": limits["max_connections"] if limits else None,
            "superuser_reserved_connections": limits["superuser_reserved"] if limits else None,
            "connections": conns["connections"] if conns else None,
        }
        snap = {
            "replicas": replicas,
            "tiers": tiers,
            "claimed_connections": claimed,
            "read_claimed_connections": read_claimed,
            "server": server,
        }
        self._cluster = (now, snap)
        for tier, t in tiers.items():
            metrics.REPLICAS.labels(tier).set(t["alive"])
        metrics.BUDGET.labels("claimed").set(claimed)
        if conns:
            metrics.SERVER_CONNECTIONS.set(conns["connections"])
        if limits:
            metrics.SERVER_MAX_CONNECTIONS.set(limits["max_connections"])
        return snap


async def read_server(pool: AsyncConnectionPool[Conn]) -> dict[str, Any]:
    """The read replica's server as ``GET /v1/cluster`` shows it (one short query)."""
    async with pool.connection(timeout=1.0) as conn:
        row = await (await conn.execute(QUERIES["replica_server"])).fetchone()
    assert row is not None
    return {
        "max_connections": row["max_connections"],
        "superuser_reserved_connections": row["superuser_reserved"],
        "connections": row["connections"],
        "in_recovery": row["in_recovery"],
    }


async def compute_queue_stats(conn: Conn) -> dict[str, Any]:
    depth = await (await conn.execute(QUERIES["queue_stats"])).fetchall()
    thru = await (await conn.execute(QUERIES["queue_throughput"])).fetchall()
    queues: dict[str, dict[str, Any]] = {}

    def entry(name: str) -> dict[str, Any]:
        return queues.setdefault(
            name,
            {
                "queue": name,
                "counts": {state.value: 0 for state in State},
                "oldest_available_age_s": None,
                "throughput_per_s": {"1m": 0.0, "5m": 0.0, "15m": 0.0},
                "finished": {"1m": 0, "5m": 0, "15m": 0},
                "failed_15m": 0,
            },
        )

    for r in depth:
        e = entry(r["queue"])
        e["counts"][r["state"]] = int(r["n"])
        if r["oldest_s"] is not None:
            age = max(0.0, float(r["oldest_s"]))
            old = e["oldest_available_age_s"]
            e["oldest_available_age_s"] = age if old is None else max(old, age)
    for r in thru:
        e = entry(r["queue"])
        e["finished"] = {"1m": int(r["m1"]), "5m": int(r["m5"]), "15m": int(r["m15"])}
        e["throughput_per_s"] = {
            "1m": round(r["m1"] / 60, 3),
            "5m": round(r["m5"] / 300, 3),
            "15m": round(r["m15"] / 900, 3),
        }
        e["failed_15m"] = int(r["failed_m15"])
    return {"queues": sorted(queues.values(), key=lambda q: q["queue"])}
