"""Replica recommendations: the pure arithmetic, then live against synthetic jobs."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from dataclasses import replace
from typing import Any

import httpx
import pytest
from hypothesis import given
from hypothesis import strategies as st

from tierline.recommend import Inputs, recommend
from tierline.settings import Settings
from tierline.testing.databases import query
from tierline.testing.processes import Cluster, tierline_env
from tierline.testing.waiting import wait_for


def targets(**overrides: Any) -> Settings:
    values: dict[str, Any] = {
        "target_utilization": 0.5,
        "backlog_target_s": 300,
        "web_replica_capacity_rps": 100,
        "web_replicas_min": 0,
        "web_replicas_max": 1000,
        "worker_replicas_min": 0,
        "worker_replicas_max": 1000,
    }
    values.update(overrides)
    return Settings.from_env({}, **values)


# -- Little's law -------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("rate", "service_s", "utilisation", "slots", "expected"),
    [
        (10.0, 2.0, 0.5, 10, 4),  # 10/s x 2 s = 20 busy slots; at 50 %: 40 slots = 4 x 10
        (10.0, 2.0, 0.8, 10, 3),  # 25 slots -> 3 replicas
        (100.0, 0.05, 0.5, 4, 3),  # 10 slots of 4 -> 3 replicas
        (0.5, 60.0, 0.75, 20, 2),  # 40 slots -> 2 replicas
        (1.0, 1.0, 1.0, 1, 1),  # exactly full
        (0.0, 2.0, 0.5, 10, 0),  # no arrivals, no backlog: nothing to run
    ],
)
def test_worker_replicas_follow_littles_law(
    rate: float, service_s: float, utilisation: float, slots: int, expected: int
) -> None:
    inputs = Inputs(arrival_rate=rate, service_time_s=service_s, worker_concurrency=slots)
    rec = recommend(inputs, targets(target_utilization=utilisation)).worker
    assert rec.recommended == expected == math.ceil(rate * service_s / utilisation / slots)
    assert rec.bound == "little's law"


@given(
    rate=st.floats(0.01, 10_000),
    service_s=st.floats(0.001, 600),
    utilisation=st.floats(0.05, 1.0),
    slots=st.integers(1, 500),
)
def test_worker_replicas_are_the_fewest_that_hold_the_load(
    rate: float, service_s: float, utilisation: float, slots: int
) -> None:
    """n replicas keep utilisation at or under the target; n - 1 would not."""
    inputs = Inputs(arrival_rate=rate, service_time_s=service_s, worker_concurrency=slots)
    n = recommend(inputs, targets(target_utilization=utilisation, worker_replicas_max=10**9))
    busy = rate * service_s  # slots busy on average (Little's law)
    assert busy <= n.worker.recommended * slots * utilisation * (1 + 1e-9)
    assert busy > (n.worker.recommended - 1) * slots * utilisation * (1 - 1e-9)


def test_backlog_adds_the_slots_that_drain_it_in_time() -> None:
    # 600 waiting / 300 s = 2 jobs/s more; x 2 s = 4 slots more, on top of 8 x 2 / 0.5 = 32.
    inputs = Inputs(arrival_rate=8, service_time_s=2, backlog=600, worker_concurrency=4)
    rec = recommend(inputs, targets()).worker
    assert rec.recommended == 9  # 36 slots / 4
    assert rec.bound == "backlog"
    assert "600 / 300 s x 2 s" in rec.formula


def test_web_replicas_follow_the_request_rate() -> None:
    inputs = Inputs(web_rps=420, web_replicas=2)
    rec = recommend(inputs, targets()).web  # 100 req/s each at 50 %: 50 req/s
    assert (rec.recommended, rec.bound, rec.current, rec.change) == (9, "request rate", 2, 7)


def test_min_and_max_bound_the_recommendation() -> None:
    settings = targets(worker_replicas_min=2, worker_replicas_max=5, web_replicas_min=1)
    idle = recommend(Inputs(service_time_s=1.0), settings)
    assert (idle.worker.recommended, idle.worker.bound) == (2, "min")
    assert (idle.web.recommended, idle.web.bound) == (1, "min")
    busy = recommend(Inputs(arrival_rate=1000, service_time_s=1.0), settings)
    assert (busy.worker.recommended, busy.worker.bound) == (5, "max")


def test_no_service_time_keeps_what_runs_and_at_least_one_for_waiting_work() -> None:
    rec = recommend(Inputs(backlog=50, worker_replicas=0), targets()).worker
    assert (rec.recommended, rec.bound) == (1, "no data")
    rec = recommend(Inputs(backlog=50, worker_replicas=3), targets()).worker
    assert (rec.recommended, rec.bound) == (3, "no data")


def test_recommendation_is_held_at_the_connection_budget() -> None:
    # Little's law wants 100/s x 1 s / 0.5 = 200 slots = 20 workers of 10.
    inputs = Inputs(
        arrival_rate=100,
        service_time_s=1.0,
        worker_concurrency=10,
        web_rps=10,
        budget_total=50,
        web_claim=5,
        worker_claim=5,
    )
    unbounded = recommend(replace(inputs, budget_total=None), targets())
    assert unbounded.worker.recommended == 20
    rec = recommend(inputs, targets())
    assert rec.web.recommended == 1  # sized first: 5 connections
    assert rec.worker.recommended == 9  # (50 - 5) // 5
    assert rec.worker.bound == "connection budget"
    assert rec.worker.budget_max == 9
    assert rec.web.recommended * 5 + rec.worker.recommended * 5 <= 50


def test_web_leaves_room_for_the_workers_minimum() -> None:
    inputs = Inputs(web_rps=10_000, budget_total=40, web_claim=4, worker_claim=6)
    rec = recommend(inputs, targets(worker_replicas_min=2))
    assert rec.web.recommended == 7  # (40 - 2 x 6) // 4
    assert rec.web.bound == "connection budget"
    assert rec.worker.recommended == 2 and rec.worker.bound == "min"


# -- live: synthetic jobs, the HTTP route, the gauge and the command ------------------------
def synthetic_jobs(db_url: str) -> None:
    """3000 jobs enqueued over the last 200 s (10/s over the 300 s window), each run 2 s."""
    query(
        db_url,
        "INSERT INTO tierline.jobs (queue, kind, state, created_at, started_at, finished_at) "
        "SELECT 'default', 'noop', 'succeeded', t, t + interval '1 second', "
        "       t + interval '3 seconds' "
        "FROM (SELECT now() - interval '203 seconds' + i * interval '66 milliseconds' AS t "
        "      FROM generate_series(0, 2999) i) s",
    )


ENV = {
    "TIERLINE_TARGET_UTILIZATION": "0.5",
    "TIERLINE_WORKER_CONCURRENCY": "10",
    "TIERLINE_WORKER_REPLICAS_MIN": "1",
}


def check_worker(worker: dict[str, Any]) -> None:
    # 10/s x 2 s / 0.5 = 40 slots; 10 per replica (the live worker's slots) -> 4 replicas.
    assert worker["recommended"] == 4, worker
    assert worker["bound"] == "little's law"
    assert worker["current"] == 1


@pytest.mark.e2e
def test_recommendations_route_gauge_and_command(cluster: Cluster, db_url: str) -> None:
    synthetic_jobs(db_url)
    web, url = cluster.web(**ENV)
    worker, wurl = cluster.worker(**ENV)
    cluster.wait_ready(url, web)
    cluster.wait_ready(wurl, worker)
    wait_for(
        lambda: httpx.get(f"{url}/v1/cluster").json()["tiers"]["worker"]["alive"] == 1,
        10,
        "the worker in the registry",
    )
    r = httpx.get(f"{url}/v1/recommendations", timeout=10)
    assert r.status_code == 200, r.text
    body = r.json()
    check_worker(body["tiers"]["worker"])
    inputs = body["inputs"]
    assert inputs["arrival_rate"] == pytest.approx(10.0)
    assert inputs["service_time_s"] == pytest.approx(2.0)
    assert inputs["service_samples"] == 3000 and inputs["backlog"] == 0
    assert body["tiers"]["web"]["current"] == 1
    assert body["tiers"]["worker"]["budget_max"] is not None

    def gauge(base: str) -> bool:
        text = httpx.get(f"{base}/metrics", timeout=10).text
        return 'tierline_recommended_replicas{tier="worker"} 4.0' in text

    # Both tiers export it, so a worker autoscaler does not depend on the web tier.
    wait_for(lambda: gauge(url), 10, "the recommendation gauge of the web tier")
    wait_for(lambda: gauge(wurl), 10, "the recommendation gauge of the worker tier")

    env = tierline_env(db_url, **ENV)
    out = subprocess.run(
        [sys.executable, "-m", "tierline", "recommend", "--json"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    check_worker(json.loads(out.stdout)["tiers"]["worker"])
    table = subprocess.run(
        [sys.executable, "-m", "tierline", "recommend"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    ).stdout
    line = next(x for x in table.splitlines() if x.startswith("worker "))
    assert (
        "little's law" in line
        and "ceil((10/s x 2 s / 0.5 + 0 / 300 s x 2 s) / 10 slots) = 4" in line
    )
    assert "arrival rate" in table and "connection budget" in table
    assert web.stop() == 0 and worker.stop() == 0
