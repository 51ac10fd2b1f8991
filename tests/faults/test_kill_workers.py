"""kill -9 of random worker replicas while 10,000 jobs run.

Every job must end ``succeeded``. Delivery is at least once: a job may run again only
because the replica running it was killed (its lease ran out and upkeep made it
available). Each extra run is checked against the killed pids.
"""

from __future__ import annotations

import random
import time
from typing import Any

import pytest

from tests.faults.support import states
from tests.helpers import report
from tests.jobs_app import TEST_APP
from tierline.testing.databases import query
from tierline.testing.http import enqueue_batch, tokens
from tierline.testing.processes import Cluster, Proc

pytestmark = [pytest.mark.faults, pytest.mark.e2e, pytest.mark.slow]

JOBS = 10_000
WORKERS = 4
KILL_EVERY_S = (2.0, 4.0)
ENV: dict[str, Any] = {
    "TIERLINE_APP": TEST_APP,
    "TIERLINE_JOB_LEASE_S": 4,
    # `record` borrows a pool connection per running job: keep the pool above concurrency.
    "TIERLINE_WORKER_CONCURRENCY": 6,
    "TIERLINE_WORKER_DB_POOL_MAX": 8,
    "TIERLINE_WORKER_SHUTDOWN_GRACE_S": 5,
}


@pytest.mark.timeout(400)
def test_kill_9_random_workers_while_10000_jobs_run(cluster: Cluster, db_url: str) -> None:
    web, url = cluster.web(**ENV)
    cluster.wait_ready(url, web)
    ids = enqueue_batch(url, tokens("record", JOBS), timeout=60)
    assert len(set(ids)) == JOBS

    live: list[Proc] = [cluster.worker(**ENV)[0] for _ in range(WORKERS)]
    killed: dict[int, float] = {}  # pid -> when
    rng = random.Random(8)
    deadline = time.monotonic() + 300
    next_kill = time.monotonic() + rng.uniform(*KILL_EVERY_S)
    while time.monotonic() < deadline:
        if states(db_url).get("succeeded", 0) == JOBS:
            break
        if time.monotonic() >= next_kill:
            victim = rng.choice(live)
            victim.kill()  # SIGKILL: no drain, no hand-back, leases just stop
            killed[victim.pid] = time.monotonic()
            live.remove(victim)
            live.append(cluster.worker(**ENV)[0])  # what an orchestrator would do
            next_kill = time.monotonic() + rng.uniform(*KILL_EVERY_S)
        time.sleep(0.1)
    final = states(db_url)
    assert final == {"succeeded": JOBS}, f"not every job succeeded: {final}"

    runs = query(
        db_url,
        "SELECT job_id, array_agg(pid ORDER BY at) AS pids, "
        "array_agg(attempt ORDER BY at) AS attempts FROM public.runs GROUP BY job_id",
    )
    assert {r["job_id"] for r in runs} == set(ids), "a job never ran"
    duplicates = [r for r in runs if len(r["pids"]) > 1]
    for r in duplicates:
        # Every run but the last happened in a process that was then killed.
        for pid in r["pids"][:-1]:
            assert pid in killed, f"job {r['job_id']} ran again without a kill: {r}"
    # Jobs whose only run was killed mid-way reran too: attempts say so, runs agree.
    attempts = query(db_url, "SELECT max(attempt) AS top, sum(attempt) AS total FROM tierline.jobs")
    extra_runs = sum(len(r["pids"]) - 1 for r in duplicates)
    kills_with_duplicates = len({pid for r in duplicates for pid in r["pids"][:-1]})
    for proc in live:
        assert proc.stop() == 0
    report(
        "kill_9_workers",
        jobs=JOBS,
        workers=WORKERS,
        kills=len(killed),
        lost=JOBS - final.get("succeeded", 0),
        duplicate_jobs=len(duplicates),
        extra_runs=extra_runs,
        killed_pids_with_duplicates=kills_with_duplicates,
        max_attempt=attempts[0]["top"],
        total_attempts=attempts[0]["total"],
    )
    assert len(killed) >= 3, "too few kills to mean anything; slow machine?"
