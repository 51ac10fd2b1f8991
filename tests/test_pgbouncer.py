"""Tierline behind a real PgBouncer in transaction mode, with real processes.

The pools connect through PgBouncer (``TIERLINE_DATABASE_URL``); LISTEN goes direct
(``TIERLINE_DATABASE_DIRECT_URL``). Nothing may rely on session state: no ``SET``, no
session advisory locks, no server-side prepared statements (``prepare_threshold`` is off
when the two URLs differ). This file runs always; ``TIERLINE_TEST_PGBOUNCER=1`` runs the
whole suite this way.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from tests.jobs_app import TEST_APP
from tierline.testing.databases import dbname, query
from tierline.testing.http import enqueue, job
from tierline.testing.pgbouncer import PGBOUNCER, PgBouncer
from tierline.testing.processes import Cluster, tierline_env
from tierline.testing.waiting import wait_for

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.skipif(
        not (shutil.which("pgbouncer") or os.access(PGBOUNCER, os.X_OK)),
        reason="pgbouncer is not installed (scripts/system-deps installs it)",
    ),
]


@pytest.fixture(scope="module")
def bouncer(server_url: str) -> Iterator[PgBouncer]:
    with PgBouncer(server_url, pool_size=10) as b:
        yield b


class BouncedCluster(Cluster):
    """A cluster whose pools reach the database through PgBouncer."""

    def __init__(self, db_url: str, tmp: Any, bouncer: PgBouncer, **env: Any) -> None:
        super().__init__(
            db_url,
            tmp,
            TIERLINE_DATABASE_URL=bouncer.url(db_url),
            TIERLINE_DATABASE_DIRECT_URL=db_url,
            **env,
        )


def final(url: str, job_id: int, state: str, timeout: float = 30) -> dict[str, Any]:
    def reached() -> dict[str, Any] | None:
        j = job(url, job_id)
        return j if j["state"] == state else None

    found: dict[str, Any] = wait_for(reached, timeout, f"job {job_id} to be {state}")
    return found


def sse_events(url: str, job_id: int, timeout: float = 30) -> list[tuple[str, str]]:
    """(event, id) of a job's stream until the server ends it."""
    out: list[tuple[str, str]] = []
    kind = ident = ""
    with httpx.stream("GET", f"{url}/v1/jobs/{job_id}/events", timeout=timeout) as resp:
        assert resp.status_code == 200
        for line in resp.iter_lines():
            if line.startswith("event:"):
                kind = line.split(":", 1)[1].strip()
            elif line.startswith("id:"):
                ident = line.split(":", 1)[1].strip()
            elif line == "" and kind:
                out.append((kind, ident))
                kind = ident = ""
    return out


def test_the_core_paths_through_pgbouncer(bouncer: PgBouncer, db_url: str, tmp_path: Any) -> None:
    env = {"TIERLINE_APP": TEST_APP, "TIERLINE_JOB_LEASE_S": "5"}
    cluster = BouncedCluster(db_url, tmp_path, bouncer, **env)
    try:
        web, url = cluster.web()
        cluster.wait_ready(url, web)
        worker, wurl = cluster.worker(TIERLINE_WORKER_CONCURRENCY=8)
        cluster.wait_ready(wurl, worker)

        # Enqueue (with an idempotency key: exactly once), claim, finish.
        ids = [enqueue(url, "record", {"token": f"t{i}"}, expect=(200, 202)) for i in range(20)]
        again = enqueue(url, "add", {"a": 2, "b": 3}, idempotency_key="k1", expect=(200, 202))
        assert (
            enqueue(url, "add", {"a": 2, "b": 3}, idempotency_key="k1", expect=(200, 202)) == again
        )
        for i in ids:
            final(url, i, "succeeded")
        assert final(url, again, "succeeded")["result"] == 5
        runs = query(db_url, "SELECT job_id, count(*) AS n FROM public.runs GROUP BY job_id")
        assert sorted(r["job_id"] for r in runs) == sorted(ids)
        assert all(r["n"] == 1 for r in runs)

        # Progress events, stored in batches and streamed over SSE until the end.
        progress = enqueue(url, "progress_sync", {"steps": 5}, expect=(200, 202))
        events = sse_events(url, progress)
        kinds = [k for k, _ in events]
        assert kinds[0] == "enqueued" and kinds[-1] == "succeeded"
        assert kinds.count("progress") == 5

        # Retry with backoff: fails once, then succeeds on the second attempt.
        flaky = enqueue(url, "flaky", {"succeed_on": 2}, expect=(200, 202))
        done = final(url, flaky, "succeeded")
        assert (done["attempt"], done["result"]) == (2, 2)

        # Cancel a running job (the request travels by NOTIFY on the direct connection).
        obedient = enqueue(url, "obedient", expect=(200, 202))
        final(url, obedient, "running")
        r = httpx.post(f"{url}/v1/jobs/{obedient}/cancel", timeout=10)
        assert r.status_code == 200, r.text
        final(url, obedient, "cancelled")

        # Retry a failed job by hand.
        failed = enqueue(url, "flaky", {"succeed_on": 9}, max_attempts=1, expect=(200, 202))
        final(url, failed, "failed")
        r = httpx.post(f"{url}/v1/jobs/{failed}/retry", timeout=10)
        assert r.status_code == 200, r.text
        assert job(url, failed)["state"] in ("available", "running", "failed", "retrying")

        # The registry: both replicas claimed their pool + LISTEN within the budget.
        snap = httpx.get(f"{url}/v1/cluster", timeout=10).json()
        alive = [r for r in snap["replicas"] if r["alive"]]
        assert sorted(r["tier"] for r in alive) == ["web", "worker"]
        for r in alive:
            assert r["ready"] and r["claimed_connections"] == r["pool_max"] + 1
        assert snap["budget"]["claimed"] <= snap["budget"]["total"]

        # The pools really went through PgBouncer, LISTEN really went direct.
        name = dbname(db_url)
        [stats] = [s for s in bouncer.show("STATS") if s["database"] == name]
        assert stats["total_xact_count"] > 50
        clients = {c["application_name"] for c in bouncer.show("CLIENTS")}
        assert {"tierline-web", "tierline-worker"} <= clients
        direct = {
            r["application_name"]
            for r in query(
                db_url,
                "SELECT application_name FROM pg_stat_activity WHERE datname = current_database()",
            )
        }
        assert {"tierline-web-listen", "tierline-worker-listen"} <= direct

        for proc in (worker, web):
            assert proc.stop() == 0
            out = proc.output()
            assert "prepared statement" not in out, out[-3000:]
            assert "unhandled error" not in out and "crashed" not in out, out[-3000:]
    finally:
        cluster.close()


def test_replicas_share_few_server_connections(
    bouncer: PgBouncer, db_url: str, tmp_path: Any
) -> None:
    """Many replicas' pools, few server connections: what PgBouncer is for."""
    cluster = BouncedCluster(db_url, tmp_path, bouncer, TIERLINE_APP=TEST_APP)
    try:
        workers = [cluster.worker(TIERLINE_WORKER_DB_POOL_MAX=4) for _ in range(4)]
        for proc, wurl in workers:
            cluster.wait_ready(wurl, proc)
        web, url = cluster.web()
        cluster.wait_ready(url, web)
        ids = [enqueue(url, "record", {"token": f"t{i}"}, expect=(200, 202)) for i in range(40)]
        for i in ids:
            final(url, i, "succeeded")
        name = dbname(db_url)
        [pool] = [p for p in bouncer.show("POOLS") if p["database"] == name]
        servers = sum(pool[k] for k in ("sv_active", "sv_idle", "sv_used", "sv_tested"))
        assert servers <= bouncer.pool_size
    finally:
        cluster.close()


def test_base_env_routes_through_the_suite_pooler_only_in_pgbouncer_mode(db_url: str) -> None:
    env = tierline_env(db_url)
    if os.environ.get("TIERLINE_TEST_PGBOUNCER", "") not in ("", "0"):
        assert env["TIERLINE_DATABASE_URL"] != db_url
        assert env["TIERLINE_DATABASE_DIRECT_URL"] == db_url
    else:
        assert env["TIERLINE_DATABASE_URL"] == db_url
        assert "TIERLINE_DATABASE_DIRECT_URL" not in env
