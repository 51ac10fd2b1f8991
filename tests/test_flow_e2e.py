"""Flow control with real ``tierline`` processes on a real PostgreSQL: schedules across
replicas and restarts, cluster-wide max_running and rate limits, pause and resume that
survive restarts, unique jobs over HTTP. Figures are sampled from the database."""

from __future__ import annotations

import itertools
import threading
import time
from datetime import timedelta
from typing import Any

import httpx
import psycopg
import pytest
from psycopg.rows import dict_row

from tests.flow_app import FLOW_APP
from tierline.testing.http import enqueue_batch
from tierline.testing.processes import Cluster, Proc
from tierline.testing.waiting import wait_for

pytestmark = pytest.mark.e2e


def start(cluster: Cluster, workers: int, **env: Any) -> tuple[str, Proc, list[tuple[Proc, str]]]:
    web, url = cluster.web(TIERLINE_APP=FLOW_APP)
    started = [cluster.worker(TIERLINE_APP=FLOW_APP, **env) for _ in range(workers)]
    cluster.wait_ready(url, web)
    for proc, wurl in started:
        cluster.wait_ready(wurl, proc)
    return url, web, started


def sql(db_url: str, query: str, params: Any = None) -> list[dict[str, Any]]:
    with psycopg.connect(db_url, autocommit=True, row_factory=dict_row) as conn:
        return conn.execute(query, params).fetchall()


class Sampler:
    """Counts a queue's running jobs in the database every ``interval`` seconds."""

    def __init__(self, db_url: str, queue: str, interval: float = 0.05) -> None:
        self.db_url, self.queue, self.interval = db_url, queue, interval
        self.samples: list[int] = []
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        with psycopg.connect(self.db_url, autocommit=True) as conn:
            while not self.stop.is_set():
                row = conn.execute(
                    "SELECT count(*) FROM tierline.jobs WHERE queue = %s AND state = 'running'",
                    (self.queue,),
                ).fetchone()
                self.samples.append(int(row[0]) if row else 0)
                self.stop.wait(self.interval)

    def __enter__(self) -> Sampler:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.thread.join(timeout=10)


def patch(url: str, queue: str, **body: Any) -> dict[str, Any]:
    r = httpx.patch(f"{url}/v1/queues/{queue}", json=body, timeout=10)
    assert r.status_code == 200, r.text
    out: dict[str, Any] = r.json()
    return out


@pytest.mark.slow
def test_schedule_every_2s_one_job_per_slot_across_replicas_and_a_restart(
    cluster: Cluster, db_url: str
) -> None:
    _url, _web, workers = start(cluster, 3)
    t0 = sql(db_url, "SELECT now() AS t")[0]["t"]
    time.sleep(7)
    victim, _ = workers[0]
    victim.kill()  # kill -9 mid-way, then a new replica in its place
    time.sleep(4)
    proc, wurl = cluster.worker(TIERLINE_APP=FLOW_APP)
    cluster.wait_ready(wurl, proc)
    time.sleep(9)
    t1 = sql(db_url, "SELECT now() AS t")[0]["t"]
    rows = sql(
        db_url,
        "SELECT run_at, idempotency_key, count(*) OVER (PARTITION BY idempotency_key) AS n "
        "FROM tierline.jobs WHERE idempotency_key LIKE 'schedule:tick:%%' ORDER BY run_at",
    )
    slots = [r["run_at"] for r in rows if t0 < r["run_at"] <= t1]
    assert all(r["n"] == 1 for r in rows), "one job per slot"
    assert len(slots) >= 9, slots
    gaps = {b - a for a, b in itertools.pairwise(slots)}
    assert gaps == {timedelta(seconds=2)}, f"no slot missed or doubled: {slots}"
    assert all(s.timestamp() % 2 == 0 for s in slots)
    # Every slot's job ran (the killed replica's, if it held one, after its lease).
    ran = sql(
        db_url,
        "SELECT count(*) AS n FROM tierline.jobs WHERE idempotency_key LIKE 'schedule:tick:%%' "
        "AND state = 'succeeded' AND run_at <= %s",
        (t1 - timedelta(seconds=2),),
    )[0]["n"]
    assert ran >= len(slots) - 2
    listed = httpx.get(f"{_url}/v1/schedules", timeout=10).json()["schedules"]
    tick = next(s for s in listed if s["name"] == "tick")
    assert tick["every_s"] == 2 and tick["last_slot"] and tick["next_run"]


@pytest.mark.slow
def test_max_running_4_across_three_replicas_of_concurrency_10(
    cluster: Cluster, db_url: str
) -> None:
    url, _web, _workers = start(
        cluster, 3, TIERLINE_WORKER_QUEUES="lim", TIERLINE_WORKER_CONCURRENCY=10
    )
    patch(url, "lim", max_running=4)
    duration = 0.5
    enqueue_batch(url, [{"kind": "sleeper", "args": {"seconds": duration}, "queue": "lim"}] * 400)
    with Sampler(db_url, "lim") as sampler:
        wait_for(lambda: max(sampler.samples, default=0) > 0, 20, "jobs running")
        t0 = time.monotonic()
        done0 = _succeeded(db_url, "lim")
        time.sleep(30)
        done = _succeeded(db_url, "lim") - done0
        elapsed = time.monotonic() - t0
    assert max(sampler.samples) <= 4, max(sampler.samples)
    assert len(sampler.samples) > 300
    rate = done / elapsed
    assert rate >= 0.8 * 4 / duration, f"{rate:.2f} jobs/s, limit allows {4 / duration}"
    queues = httpx.get(f"{url}/v1/queues", timeout=10).json()["queues"]
    lim = next(q for q in queues if q["queue"] == "lim")
    assert lim["max_running"] == 4 and lim["workers"] == 3 and not lim["unserved"]


def _succeeded(db_url: str, queue: str) -> int:
    return int(
        sql(
            db_url,
            "SELECT count(*) AS n FROM tierline.jobs WHERE queue = %s AND state = 'succeeded'",
            (queue,),
        )[0]["n"]
    )


@pytest.mark.slow
def test_rate_limit_20_per_s_and_per_partition(cluster: Cluster, db_url: str) -> None:
    url, _web, _workers = start(cluster, 3, TIERLINE_WORKER_QUEUES="rate,prate")
    patch(url, "rate", rate_limit="20/s")
    patch(url, "prate", rate_limit="5/s", partition_by="a")
    enqueue_batch(url, [{"kind": "noop", "queue": "rate"}] * 400)
    enqueue_batch(
        url, [{"kind": "add", "args": {"a": i % 3, "b": i}, "queue": "prate"} for i in range(90)]
    )
    first = wait_for(
        lambda: sql(db_url, "SELECT min(started_at) AS t FROM tierline.jobs WHERE queue = 'rate'")[
            0
        ]["t"],
        20,
        "the first start",
    )
    time.sleep(11)
    n = sql(
        db_url,
        "SELECT count(*) AS n FROM tierline.jobs WHERE queue = 'rate' AND started_at >= %s "
        "AND started_at < %s",
        (first, first + timedelta(seconds=10)),
    )[0]["n"]
    assert 180 <= n <= 220, n
    # Per partition: never more than 5 starts in any one-second window, all three served.
    worst = sql(
        db_url,
        "SELECT j.args->>'a' AS part, j.started_at, (SELECT count(*) FROM tierline.jobs k "
        " WHERE k.queue = 'prate' AND k.args->>'a' = j.args->>'a' AND k.started_at >= "
        " j.started_at AND k.started_at < j.started_at + interval '1 second') AS n "
        "FROM tierline.jobs j WHERE j.queue = 'prate' AND j.started_at IS NOT NULL "
        "ORDER BY n DESC LIMIT 1",
    )[0]
    assert worst["n"] <= 5, worst
    per = sql(
        db_url,
        "SELECT args->>'a' AS part, count(*) AS n FROM tierline.jobs WHERE queue = 'prate' "
        "AND started_at IS NOT NULL GROUP BY 1",
    )
    assert {r["part"] for r in per} == {"0", "1", "2"} and all(r["n"] >= 15 for r in per), per


@pytest.mark.slow
def test_pause_holds_running_jobs_finish_survives_restarts_resume(
    cluster: Cluster, db_url: str
) -> None:
    url, web, workers = start(cluster, 3, TIERLINE_WORKER_QUEUES="pq")
    enqueue_batch(url, [{"kind": "sleeper", "args": {"seconds": 0.3}, "queue": "pq"}] * 600)
    wait_for(lambda: _succeeded(db_url, "pq") > 20, 30, "jobs finishing")
    answer = patch(url, "pq", paused=True)
    paused_at = sql(db_url, "SELECT now() AS t")[0]["t"]
    assert answer["paused"] is True
    # Running jobs finish; none starts after the pause returned (+ one claim interval).
    wait_for(
        lambda: (
            sql(
                db_url,
                "SELECT count(*) AS n FROM tierline.jobs WHERE queue = 'pq' AND state = 'running'",
            )[0]["n"]
            == 0
        ),
        10,
        "running jobs to finish",
    )
    time.sleep(2)
    late = sql(
        db_url,
        "SELECT count(*) AS n FROM tierline.jobs WHERE queue = 'pq' AND started_at > %s",
        (paused_at + timedelta(seconds=0.2),),
    )[0]["n"]
    assert late == 0
    r = httpx.post(f"{url}/v1/jobs", json={"kind": "noop", "queue": "pq"}, timeout=10)
    assert r.status_code == 202  # enqueueing still works
    # Every replica restarts: the pause holds.
    for proc in [web, *(p for p, _ in workers)]:
        assert proc.stop() == 0
    url, web, workers = start(cluster, 3, TIERLINE_WORKER_QUEUES="pq")
    time.sleep(3)
    assert (
        sql(
            db_url,
            "SELECT count(*) AS n FROM tierline.jobs WHERE queue = 'pq' AND started_at > %s",
            (paused_at + timedelta(seconds=0.2),),
        )[0]["n"]
        == 0
    )
    queues = httpx.get(f"{url}/v1/queues", timeout=10).json()["queues"]
    assert next(q for q in queues if q["queue"] == "pq")["paused"] is True
    assert 'tierline_queue_paused{queue="pq"} 1.0' in httpx.get(f"{url}/metrics").text
    patch(url, "pq", paused=False)
    before = _succeeded(db_url, "pq")
    wait_for(lambda: _succeeded(db_url, "pq") > before + 20, 30, "jobs after resume")


def test_unique_over_http_and_unserved_queues(cluster: Cluster, db_url: str) -> None:
    web, url = cluster.web(TIERLINE_APP=FLOW_APP)
    cluster.wait_ready(url, web)
    body = {"kind": "add", "args": {"a": 1}, "unique": {"args": ["a"]}, "queue": "nobody"}
    first = httpx.post(f"{url}/v1/jobs", json=body, timeout=10)
    again = httpx.post(f"{url}/v1/jobs", json={**body, "args": {"a": 1, "b": 2}}, timeout=10)
    assert first.status_code == 202 and again.status_code == 200, again.text
    assert first.json()["id"] == again.json()["id"]
    bad = httpx.patch(f"{url}/v1/queues/nobody", json={"rate_limit": "fast"}, timeout=10)
    assert bad.status_code == 422
    queues = httpx.get(f"{url}/v1/queues", timeout=10).json()["queues"]
    nobody = next(q for q in queues if q["queue"] == "nobody")
    assert nobody["unserved"] is True and nobody["workers"] == 0
    assert 'tierline_queue_unserved{queue="nobody"} 1.0' in httpx.get(f"{url}/metrics").text
