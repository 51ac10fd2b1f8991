"""``pg_terminate_backend`` of random pool and LISTEN connections under load.

Every few hundred milliseconds one of the replicas' connections (pools of both tiers and
both LISTEN connections, picked by ``application_name``) is terminated by the server.
Pools replace dead connections, listeners reconnect and catch up; every job ends
``succeeded`` and streams still deliver final events afterwards.
"""

from __future__ import annotations

import random
import time
from collections import Counter

import httpx
import pytest

from tests.faults.support import Load, keys_in_db, states
from tests.helpers import report
from tests.jobs_app import TEST_APP
from tierline.testing.databases import query
from tierline.testing.processes import Cluster
from tierline.testing.waiting import wait_for

pytestmark = [pytest.mark.faults, pytest.mark.e2e]

CHAOS_S = 20.0
NAMES = ("tierline-web", "tierline-worker", "tierline-web-listen", "tierline-worker-listen")


def terminate_one(db_url: str, rng: random.Random) -> str | None:
    rows = query(
        db_url,
        "SELECT pid, application_name AS name FROM pg_stat_activity "
        "WHERE datname = current_database() AND application_name = ANY(%s) "
        "AND pid <> pg_backend_pid()",
        (list(NAMES),),
    )
    if not rows:
        return None
    # Listeners are one connection each among many pooled ones: give them their share.
    by_name: dict[str, list[int]] = {}
    for r in rows:
        by_name.setdefault(r["name"], []).append(r["pid"])
    name = rng.choice(sorted(by_name))
    query(db_url, "SELECT pg_terminate_backend(%s)", (rng.choice(by_name[name]),))
    return str(name)


def final_event(url: str, job_id: int) -> str:
    """Follow a job's stream until its final event; return that event's type."""
    with (
        httpx.Client(timeout=httpx.Timeout(10, read=30)) as client,
        client.stream("GET", f"{url}/v1/jobs/{job_id}/events") as r,
    ):
        assert r.status_code == 200
        event = ""
        for line in r.iter_lines():
            if line.startswith("event:"):
                event = line.split(":", 1)[1].strip()
                if event in ("succeeded", "failed", "cancelled"):
                    return event
    return event


@pytest.mark.timeout(240)
def test_terminated_connections_are_replaced_transparently(cluster: Cluster, db_url: str) -> None:
    env = {"TIERLINE_APP": TEST_APP, "TIERLINE_JOB_LEASE_S": 10}
    web, url = cluster.web(**env)
    workers = [cluster.worker(**env, TIERLINE_WORKER_CONCURRENCY=4) for _ in range(2)]
    cluster.wait_ready(url, web)
    for proc, wurl in workers:
        cluster.wait_ready(wurl, proc)
    rng = random.Random(5)
    killed: Counter[str] = Counter()
    with Load(url, threads=3, pause_s=0.01) as load:
        wait_for(lambda: len(load.tally.accepted) >= 20, 30, "some accepted jobs")
        end = time.monotonic() + CHAOS_S
        while time.monotonic() < end:
            name = terminate_one(db_url, rng)
            if name:
                killed[name] += 1
            time.sleep(rng.uniform(0.1, 0.4))
    summary = load.tally.summary()
    accepted = dict(load.tally.accepted)
    wait_for(
        lambda: all(j["state"] == "succeeded" for j in keys_in_db(db_url, set(accepted)).values()),
        90,
        "every accepted job to succeed",
    )
    assert set(keys_in_db(db_url, set(accepted))) == set(accepted), "accepted jobs were lost"
    assert set(states(db_url)) == {"succeeded"}, states(db_url)
    for name in NAMES:
        assert killed[name] > 0, f"no {name} connection was terminated: {killed}"
    # Listeners came back: notifications reach the web tier's streams and wake workers.
    with httpx.Client(timeout=30) as client:
        fresh = [
            client.post(f"{url}/v1/jobs", json={"kind": "record", "args": {"token": f"f{i}"}})
            for i in range(3)
        ]
    assert [final_event(url, r.json()["id"]) for r in fresh] == ["succeeded"] * 3
    listeners = query(
        db_url,
        "SELECT application_name AS name, count(*) AS n FROM pg_stat_activity "
        "WHERE datname = current_database() AND application_name LIKE '%%-listen' GROUP BY 1",
    )
    assert {r["name"]: r["n"] for r in listeners} == {
        "tierline-web-listen": 1,
        "tierline-worker-listen": 2,
    }
    # Nothing failed on the server side; what clients saw is reported.
    assert 500 not in load.tally.statuses, summary
    assert set(load.tally.statuses) <= {200, 202, 503}, summary
    # Reads, keyed enqueues and heartbeats run once more on a fresh connection when theirs
    # is terminated, so clients see nothing (two terminations in a row on the same path
    # could still show as one 503: tolerated, and reported).
    assert load.tally.statuses.get(503, 0) <= 2, summary
    assert not load.tally.errors, summary
    for proc in [web, *(p for p, _ in workers)]:
        assert proc.proc.poll() is None, "a replica died"
        log = proc.output()
        assert "unhandled error" not in log and "task crashed" not in log, log[-3000:]
    runs = query(db_url, "SELECT count(*) AS n, count(DISTINCT job_id) AS jobs FROM public.runs")
    report(
        "terminate_backends",
        chaos_s=CHAOS_S,
        terminated=dict(killed),
        accepted=len(accepted),
        lost=0,
        client_statuses=summary["statuses"],
        client_errors=summary["errors"],
        client_error_codes=summary["error_codes"],
        runs=runs[0]["n"],
        jobs_run=runs[0]["jobs"],
    )
