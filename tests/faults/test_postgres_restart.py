"""PostgreSQL stops and starts again under load: a clean shutdown, then a crash.

The server is the test's own (initdb/pg_ctl in a temporary folder, on a free port): the
machine's shared server is never touched. During each outage the web tier answers 503
at once (no request hangs), and afterwards both tiers recover without a restart and no
job whose enqueue was answered 202 is lost.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.faults.support import Load, keys_in_db
from tests.helpers import report
from tests.jobs_app import RUNS_TABLE, TEST_APP
from tierline.testing.databases import migrate
from tierline.testing.postgres import PostgresServer
from tierline.testing.processes import Cluster
from tierline.testing.waiting import wait_for

pytestmark = [pytest.mark.faults, pytest.mark.e2e]

OUTAGE_S = 5.0
# A request may wait for a pooled connection up to TIERLINE_DB_POOL_TIMEOUT_S (5 s) before
# it is answered 503; nothing may take much longer than that.
MAX_REQUEST_S = 8.0


@pytest.fixture
def own_pg() -> Iterator[PostgresServer]:
    server = PostgresServer().start()
    try:
        migrate(server.url(), RUNS_TABLE)
        yield server
    finally:
        server.close()


def ready(url: str) -> bool:
    try:
        return httpx.get(f"{url}/readyz", timeout=3).status_code == 200
    except httpx.HTTPError:
        return False


@pytest.mark.timeout(240)
def test_postgres_restart_under_load(own_pg: PostgresServer, tmp_path: Path) -> None:
    cluster = Cluster(own_pg.url(), tmp_path, TIERLINE_APP=TEST_APP)
    try:
        web, url = cluster.web()
        worker, wurl = cluster.worker(TIERLINE_WORKER_CONCURRENCY=4)
        cluster.wait_ready(url, web)
        cluster.wait_ready(wurl, worker)
        outage_statuses: dict[str, dict[int, int]] = {}
        readyz: dict[str, tuple[int, float]] = {}
        with Load(url, threads=3, timeout_s=30) as load:
            wait_for(lambda: len(load.tally.accepted) >= 20, 30, "some accepted jobs")
            for mode in ("fast", "immediate"):  # a clean shutdown, then a crash
                before = dict(load.tally.statuses)
                own_pg.stop(mode)
                time.sleep(OUTAGE_S)
                # Both tiers notice: not ready (a load balancer stops sending traffic),
                # and from then on requests are answered 503 at once.
                wait_for(
                    lambda: not ready(url) and not ready(wurl), 20, "both tiers to be not ready"
                )
                noticed = time.monotonic()
                r = httpx.get(f"{url}/v1/jobs/1", timeout=10)
                readyz[mode] = (r.status_code, round(time.monotonic() - noticed, 2))
                assert r.status_code == 503 and r.json()["error"]["code"] == "not_ready"
                during = {code: n - before.get(code, 0) for code, n in load.tally.statuses.items()}
                outage_statuses[mode] = {c: n for c, n in during.items() if n}
                own_pg.start()
                wait_for(lambda: ready(url) and ready(wurl), 60, "both tiers to recover")
                mark = len(load.tally.accepted)
                wait_for(lambda: len(load.tally.accepted) > mark + 20, 60, "new accepts")  # noqa: B023
        summary = load.tally.summary()

        # Both tiers recovered by themselves: same processes, never restarted.
        assert web.proc.poll() is None and worker.proc.poll() is None
        accepted = dict(load.tally.accepted)
        wait_for(
            lambda: all(
                j["state"] == "succeeded" for j in keys_in_db(own_pg.url(), set(accepted)).values()
            ),
            90,
            "every accepted job to succeed",
        )
        found = keys_in_db(own_pg.url(), set(accepted))
        lost = set(accepted) - set(found)
        assert not lost, f"{len(lost)} accepted jobs are gone"
        assert {found[k]["id"] for k in accepted} == set(accepted.values())
        # During each outage the web tier answered, quickly, with 503s.
        for mode, during in outage_statuses.items():
            assert during.get(503, 0) > 0, f"{mode}: no 503 during the outage: {during}"
        assert set(load.tally.statuses) <= {200, 202, 503}, summary
        assert not load.tally.errors, f"transport errors from a live web tier: {summary}"
        assert load.tally.slowest_s < MAX_REQUEST_S, f"a request hung: {load.tally.slow}"
        for p in (web, worker):
            assert p.stop() == 0
        report(
            "postgres_restart",
            outages=list(outage_statuses),
            outage_s=OUTAGE_S,
            accepted=len(accepted),
            lost=len(lost),
            statuses=summary["statuses"],
            outage_statuses=outage_statuses,
            not_ready_answer=readyz,
            slowest_request_s=summary["slowest_s"],
        )
    finally:
        cluster.close()
