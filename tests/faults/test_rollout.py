"""A graceful rollout under load: every replica replaced, one by one.

Two web replicas share one port (``--reuse-port``, the kernel balances connections), two
workers run the jobs. Each replica in turn gets a successor (started, waited ready),
then SIGTERM. Nothing is lost, no job runs twice, and clients see no 5xx beyond what a
load balancer retries: a connection refused or reset while a replica exits, and a 503
from a replica that is not ready yet. Those are counted separately.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from tests.faults.support import RETRYABLE_EXC, Load, keys_in_db
from tests.helpers import report
from tests.jobs_app import TEST_APP
from tierline.testing.databases import query
from tierline.testing.ports import free_port
from tierline.testing.processes import Cluster, Proc, tierline_env
from tierline.testing.waiting import wait_for

pytestmark = [pytest.mark.faults, pytest.mark.e2e]

ENV = {
    "TIERLINE_APP": TEST_APP,
    "TIERLINE_WORKER_CONCURRENCY": 4,
    "TIERLINE_WORKER_SHUTDOWN_GRACE_S": 10,
}


def start_web(cluster: Cluster, db_url: str, port: int, tmp: Path, n: int) -> Proc:
    env = tierline_env(db_url, TIERLINE_WEB_PORT=port, **ENV)
    proc = Proc(["web", "--reuse-port"], env, tmp / f"web-{n}.log")
    cluster.procs.append(proc)
    return proc


def wait_replica_ready(db_url: str, proc: Proc) -> None:
    """Ready as the registry sees it (behind a shared port, /readyz reaches any replica)."""

    def ready() -> bool:
        if proc.proc.poll() is not None:
            raise AssertionError(f"replica exited early:\n{proc.output()[-3000:]}")
        rows = query(
            db_url,
            "SELECT ready FROM tierline.replicas WHERE pid = %s AND stopped_at IS NULL",
            (proc.pid,),
        )
        return bool(rows and rows[0]["ready"])

    wait_for(ready, 30, f"replica {proc.pid} to be ready")


@pytest.mark.timeout(300)
def test_rolling_every_replica_under_load_loses_nothing(
    cluster: Cluster, db_url: str, tmp_path: Path
) -> None:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    webs = [start_web(cluster, db_url, port, tmp_path, n) for n in range(2)]
    for w in webs:
        wait_replica_ready(db_url, w)
    workers = [cluster.worker(**ENV) for _ in range(2)]
    for proc, wurl in workers:
        cluster.wait_ready(wurl, proc)

    exits: dict[str, int] = {}
    with (
        Load(url, threads=3, pause_s=0.01) as keep_alive,
        Load(url, threads=2, pause_s=0.01, fresh_connections=True) as fresh,
    ):
        wait_for(lambda: len(keep_alive.tally.accepted) >= 30, 30, "some accepted jobs")
        for n, old in enumerate(list(webs), start=2):
            new = start_web(cluster, db_url, port, tmp_path, n)
            wait_replica_ready(db_url, new)
            exits[f"web {old.pid}"] = old.stop(timeout=30)
            time.sleep(1)
        for old_proc, _ in list(workers):
            new_proc, new_url = cluster.worker(**ENV)
            cluster.wait_ready(new_url, new_proc)
            exits[f"worker {old_proc.pid}"] = old_proc.stop(timeout=40)
            time.sleep(1)
        mark = len(keep_alive.tally.accepted)
        wait_for(lambda: len(keep_alive.tally.accepted) > mark + 30, 30, "load after the roll")

    assert set(exits.values()) == {0}, exits
    accepted = {**keep_alive.tally.accepted, **fresh.tally.accepted}
    wait_for(
        lambda: all(j["state"] == "succeeded" for j in keys_in_db(db_url, set(accepted)).values()),
        90,
        "every accepted job to succeed",
    )
    found = keys_in_db(db_url, set(accepted))
    assert set(found) == set(accepted), "accepted jobs were lost"
    runs = query(
        db_url, "SELECT job_id, count(*) AS n FROM public.runs GROUP BY job_id HAVING count(*) > 1"
    )
    assert not runs, f"jobs ran twice in a graceful rollout: {runs}"
    summaries = {"keep_alive": keep_alive.tally.summary(), "fresh": fresh.tally.summary()}
    for name, load in (("keep_alive", keep_alive), ("fresh", fresh)):
        bad = {code: n for code, n in load.tally.statuses.items() if code >= 500 and code != 503}
        assert not bad, f"{name}: 5xx a load balancer would not retry: {summaries[name]}"
        for code in load.tally.codes:  # 503s come from replicas not ready (yet, or any more)
            assert not code.startswith("5") or code.startswith("503 "), summaries[name]
        assert set(load.tally.errors) <= {e.__name__ for e in RETRYABLE_EXC}, summaries[name]
    report(
        "rollout",
        replaced={"web": 2, "worker": 2},
        accepted=len(accepted),
        lost=0,
        duplicate_runs=0,
        keep_alive=summaries["keep_alive"],
        fresh_connections=summaries["fresh"],
    )
