"""End-to-end: real `tierline` processes over HTTP and a real PostgreSQL."""

from __future__ import annotations

import re
import time
from pathlib import Path

import httpx
import pytest

from tests.jobs_app import TEST_APP
from tierline.testing.databases import query
from tierline.testing.http import enqueue_batch, tokens
from tierline.testing.ports import free_port
from tierline.testing.processes import Cluster, Proc, tierline_env
from tierline.testing.waiting import wait_for

pytestmark = pytest.mark.e2e


def test_eight_workers_race_over_5000_jobs_each_runs_once(cluster: Cluster, db_url: str) -> None:
    web, url = cluster.web(TIERLINE_APP=TEST_APP)
    cluster.wait_ready(url, web)
    ids = enqueue_batch(url, tokens("record", 5000))
    workers = [
        cluster.worker(
            TIERLINE_APP=TEST_APP, TIERLINE_WORKER_CONCURRENCY=20, TIERLINE_WORKER_DB_POOL_MAX=6
        )
        for _ in range(8)
    ]

    def finished() -> bool:
        rows = query(db_url, "SELECT count(*) AS n FROM tierline.jobs WHERE state = 'succeeded'")
        return bool(rows[0]["n"] == 5000)

    wait_for(finished, 180, "5000 jobs to succeed")
    runs = query(
        db_url,
        "SELECT job_id, count(*) AS n, count(DISTINCT pid) AS pids "
        "FROM public.runs GROUP BY job_id",
    )
    assert len(runs) == 5000 and {r["job_id"] for r in runs} == set(ids)
    assert max(r["n"] for r in runs) == 1, "a job ran twice"
    pids = {r["pid"] for r in query(db_url, "SELECT DISTINCT pid FROM public.runs")}
    assert len(pids) >= 6, f"work was not spread over the workers: {len(pids)} pids"
    for proc, _ in workers:
        assert proc.stop() == 0


def test_kill_9_worker_jobs_run_again_after_lease(cluster: Cluster, db_url: str) -> None:
    env = {"TIERLINE_APP": TEST_APP, "TIERLINE_JOB_LEASE_S": "3"}
    web, url = cluster.web(**env)
    cluster.wait_ready(url, web)
    victim, vurl = cluster.worker(**env, TIERLINE_WORKER_CONCURRENCY=10)
    cluster.wait_ready(vurl, victim)
    enqueue_batch(url, tokens("slow_record", 10))
    with httpx.Client() as c:
        wait_for(
            lambda: c.get(f"{url}/v1/jobs?state=running").json()["jobs"].__len__() == 10,
            20,
            "10 running jobs",
        )
    victim.kill()
    survivor, _ = cluster.worker(**env, TIERLINE_WORKER_CONCURRENCY=10)
    wait_for(
        lambda: (
            query(db_url, "SELECT count(*) AS n FROM tierline.jobs WHERE state = 'succeeded'")[0][
                "n"
            ]
            == 10
        ),
        60,
        "the killed worker's jobs to succeed elsewhere",
    )
    rows = query(
        db_url,
        "SELECT job_id, count(*) AS n, count(DISTINCT pid) AS pids "
        "FROM public.runs GROUP BY job_id",
    )
    assert all(r["n"] == 2 and r["pids"] == 2 for r in rows), rows
    attempts = query(db_url, "SELECT attempt FROM tierline.jobs")
    assert {a["attempt"] for a in attempts} == {2}
    assert survivor.stop() == 0


def test_sigterm_finishes_or_hands_back_and_exits_0(cluster: Cluster, db_url: str) -> None:
    env = {"TIERLINE_APP": TEST_APP, "TIERLINE_WORKER_SHUTDOWN_GRACE_S": "2"}
    web, url = cluster.web(**env)
    cluster.wait_ready(url, web)
    worker, wurl = cluster.worker(**env, TIERLINE_WORKER_CONCURRENCY=4)
    cluster.wait_ready(wurl, worker)
    with httpx.Client() as c:
        short = [
            c.post(f"{url}/v1/jobs", json={"kind": "sleeper", "args": {"seconds": 0.5}}).json()[
                "id"
            ]
            for _ in range(2)
        ]
        long = [
            c.post(f"{url}/v1/jobs", json={"kind": "sleeper", "args": {"seconds": 60}}).json()["id"]
            for _ in range(2)
        ]
        wait_for(
            lambda: len(c.get(f"{url}/v1/jobs?state=running").json()["jobs"]) == 4,
            20,
            "4 running jobs",
        )
        start = time.monotonic()
        code = worker.stop(timeout=20)
        took = time.monotonic() - start
        assert code == 0
        assert took < 2 + 5, f"shutdown took {took:.1f}s with a 2s grace"
        states = {i: c.get(f"{url}/v1/jobs/{i}").json() for i in short + long}
    assert all(states[i]["state"] == "succeeded" for i in short)
    for i in long:  # handed back, the interrupted attempt not counted
        assert states[i]["state"] == "available" and states[i]["attempt"] == 0
    assert "handed running jobs back" in worker.output()


def test_up_on_embedded_database(tmp_path: Path) -> None:
    """README command 1: `tierline up` with no database URL, then a demo job over HTTP."""
    port = free_port()
    env = tierline_env("", TIERLINE_WEB_PORT=port, TIERLINE_WORKER_METRICS_PORT=free_port())
    del env["TIERLINE_DATABASE_URL"]
    up = Proc(["up", "--workers", "1"], env, tmp_path / "up.log", cwd=tmp_path)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_for(
            lambda: httpx.get(f"{url}/readyz", timeout=2).status_code == 200,
            90,
            "the web tier of `tierline up`",
        )
        r = httpx.post(f"{url}/v1/jobs", json={"kind": "echo", "args": {"hello": "world"}})
        assert r.status_code == 202, r.text
        job_id = r.json()["id"]
        job = wait_for(
            lambda: (
                (j := httpx.get(f"{url}/v1/jobs/{job_id}").json())["state"] == "succeeded" and j
            ),
            60,
            "the demo job to succeed",
        )
        assert job["result"] == {"hello": "world"}
        assert (tmp_path / ".tierline" / "pgdata").is_dir()
    finally:
        code = up.interrupt()
    text = up.output()
    assert re.search(r"embedded PostgreSQL \d+\.\d+ at ", text), text[:2000]  # its version
    assert code == 0, text[-3000:]
    assert "all replicas stopped" in text
