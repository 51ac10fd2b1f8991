"""A read replica for the web tier's reads (``TIERLINE_DATABASE_READ_URL``), against a
primary and a streaming replica of the test's own (``pg_basebackup -R`` from the system's
PostgreSQL binaries, on free ports; the machine's shared server is never touched).

Reads are seen where they run (the replica's ``pg_stat_activity``), the replica is paused
(``pg_wal_replay_pause()``) and stopped under load, and a stream is resumed across both.
"""

from __future__ import annotations

import re
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.jobs_app import RUNS_TABLE, TEST_APP
from tierline.testing.databases import migrate
from tierline.testing.postgres import PostgresServer, system_bindir
from tierline.testing.processes import Cluster, tierline_env
from tierline.testing.waiting import wait_for

pytestmark = [pytest.mark.e2e]

MAX_LAG_S = 1.0


@pytest.fixture(scope="module")
def servers() -> Iterator[tuple[PostgresServer, PostgresServer]]:
    primary = PostgresServer(bindir=system_bindir()).start()
    replica: PostgresServer | None = None
    try:
        migrate(primary.url(), RUNS_TABLE)
        replica = PostgresServer.replica_of(primary)
        yield primary, replica
    finally:
        if replica is not None:
            replica.close()
        primary.close()


@pytest.fixture(scope="module")
def web(
    servers: tuple[PostgresServer, PostgresServer], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[str]:
    primary, replica = servers
    cluster = Cluster(
        primary.url(),
        tmp_path_factory.mktemp("read-replica"),
        TIERLINE_APP=TEST_APP,
        TIERLINE_DATABASE_READ_URL=replica.url(),
        TIERLINE_READ_MAX_LAG_S=MAX_LAG_S,
    )
    try:
        proc, url = cluster.web()
        worker, wurl = cluster.worker(TIERLINE_WORKER_CONCURRENCY=4)
        cluster.wait_ready(url, proc)
        cluster.wait_ready(wurl, worker)
        wait_for(lambda: read_target(url) == "replica", 30, "reads on the replica")
        yield url
    finally:
        cluster.close()


def metric(url: str, name: str, **labels: str) -> float:
    """One sample of the web replica's /metrics (0 when absent)."""
    text = httpx.get(f"{url}/metrics", timeout=10).text
    for line in text.splitlines():
        if not line.startswith(name + "{") and not line.startswith(name + " "):
            continue
        found = dict(re.findall(r'(\w+)="([^"]*)"', line.split("}")[0]))
        if all(found.get(k) == v for k, v in labels.items()):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def read_target(url: str) -> str:
    return "replica" if metric(url, "tierline_db_read_target", target="replica") == 1 else "primary"


def enqueue(url: str, kind: str = "noop", **args: Any) -> int:
    r = httpx.post(f"{url}/v1/jobs", json={"kind": kind, "args": args}, timeout=10)
    assert r.status_code == 202, r.text
    return int(r.json()["id"])


def queries_of(server: PostgresServer, app: str) -> list[str]:
    rows = server.execute(f"SELECT query FROM pg_stat_activity WHERE application_name = '{app}'")
    return [str(r[0]) for r in rows]


def test_reads_are_served_by_the_replica_and_enqueue_by_the_primary(
    servers: tuple[PostgresServer, PostgresServer], web: str
) -> None:
    primary, replica = servers
    job_id = enqueue(web)
    seen: set[str] = set()

    def served() -> bool:
        assert httpx.get(f"{web}/v1/jobs/{job_id}", timeout=10).status_code == 200
        if any("WHERE id = " in q for q in queries_of(replica, "tierline-web-read")):
            seen.add("get")
        assert httpx.get(f"{web}/v1/jobs?limit=5", timeout=10).status_code == 200
        if any("ORDER BY id DESC" in q for q in queries_of(replica, "tierline-web-read")):
            seen.add("list")
        return seen == {"get", "list"}

    wait_for(served, 20, "the replica's backends to run the job reads")
    # The primary's pool is not on the replica at all; the enqueue ran on the primary.
    assert queries_of(replica, "tierline-web") == []
    enqueue(web)
    assert any("INSERT INTO tierline.jobs" in q for q in queries_of(primary, "tierline-web"))
    assert metric(web, "tierline_db_pool_max_connections", tier="web", target="replica") > 0
    assert metric(web, "tierline_db_pool_max_connections", tier="web", target="primary") > 0
    cluster = httpx.get(f"{web}/v1/cluster", timeout=10).json()
    assert cluster["read_replica"]["routing"]["target"] == "replica"
    assert cluster["read_replica"]["budget"]["total"] > 0
    assert cluster["read_replica"]["budget"]["claimed"] >= 1


def test_paused_replay_moves_reads_to_the_primary_and_back(
    servers: tuple[PostgresServer, PostgresServer], web: str
) -> None:
    _, replica = servers
    replica.pause_replay()
    try:
        paused_at = time.monotonic()
        moved_after: float | None = None
        for _ in range(400):  # writes go on: the replica falls behind
            job_id = enqueue(web)
            r = httpx.get(f"{web}/v1/jobs/{job_id}", timeout=10)
            assert r.status_code == 200, r.text  # read right after its 202: always found
            if read_target(web) == "primary":
                moved_after = time.monotonic() - paused_at
                break
            time.sleep(0.02)
        assert moved_after is not None, "reads never left the paused replica"
        # Lag counts from the first write the replica missed; probes are 0.5 s apart.
        assert moved_after < MAX_LAG_S + 3.0
        assert metric(web, "tierline_db_replica_lag_seconds", target="replica") > MAX_LAG_S
        for _ in range(20):
            job_id = enqueue(web)
            assert httpx.get(f"{web}/v1/jobs/{job_id}", timeout=10).status_code == 200
    finally:
        replica.resume_replay()
    wait_for(lambda: read_target(web) == "replica", 15, "reads back on the replica")
    assert metric(web, "tierline_db_replica_lag_seconds", target="replica") <= MAX_LAG_S
    job_id = enqueue(web)
    assert httpx.get(f"{web}/v1/jobs/{job_id}", timeout=10).status_code == 200


class Load:
    """Threads that enqueue, read each job back and list, tallying every answer."""

    def __init__(self, url: str, threads: int = 3) -> None:
        self.url = url
        self.stop = threading.Event()
        self.statuses: list[tuple[float, int, str]] = []
        self.threads = [threading.Thread(target=self._loop, daemon=True) for _ in range(threads)]

    def __enter__(self) -> Load:
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *_: object) -> None:
        self.stop.set()
        for t in self.threads:
            t.join(timeout=30)

    def _loop(self) -> None:
        with httpx.Client(base_url=self.url, timeout=30) as client:
            while not self.stop.is_set():
                r = client.post("/v1/jobs", json={"kind": "noop", "args": {}})
                self.statuses.append((time.monotonic(), r.status_code, "enqueue"))
                if r.status_code == 202:
                    g = client.get(f"/v1/jobs/{r.json()['id']}")
                    self.statuses.append((time.monotonic(), g.status_code, "get"))
                lst = client.get("/v1/jobs", params={"limit": 20})
                self.statuses.append((time.monotonic(), lst.status_code, "list"))

    def since(self, t: float) -> Counter[int]:
        return Counter(code for at, code, _ in self.statuses if at >= t)


def test_replica_stopped_under_load(
    servers: tuple[PostgresServer, PostgresServer], web: str
) -> None:
    _, replica = servers
    before = metric(web, "tierline_db_query_duration_seconds_count", target="replica")
    with Load(web) as load:
        wait_for(lambda: len(load.statuses) > 60, 30, "some load")
        stopped = time.monotonic()
        replica.stop("immediate")
        try:
            wait_for(lambda: read_target(web) == "primary", 10, "reads on the primary")
            mark = len(load.statuses)
            wait_for(lambda: len(load.statuses) > mark + 60, 30, "load on the primary")
        finally:
            replica.start()
        wait_for(lambda: read_target(web) == "replica", 60, "reads back on the replica")
        back = time.monotonic()
        wait_for(lambda: len(load.statuses) > mark + 200, 60, "load on the replica again")
    during = load.since(stopped)
    errors = sum(n for code, n in during.items() if code >= 500)
    assert errors <= len(load.threads), during  # at most the requests in flight then
    assert all(code < 500 for code, n in load.since(back).items()), load.since(back)
    assert metric(web, "tierline_db_read_fallbacks_total", reason="unreachable") >= 1
    assert metric(web, "tierline_db_query_duration_seconds_count", target="replica") > before


def _events(url: str, job_id: int, after: int, count: int | None) -> list[int]:
    """Seqs of a job's stream after ``after`` (``count`` of them, or to the end)."""
    seqs: list[int] = []
    headers = {"Last-Event-ID": str(after)} if after else {}
    with httpx.stream("GET", f"{url}/v1/jobs/{job_id}/events", headers=headers, timeout=30) as r:
        assert r.status_code == 200, r.read()
        for line in r.iter_lines():
            if line.startswith("id:"):
                seqs.append(int(line[3:].strip()))
                if count is not None and len(seqs) >= count:
                    break
            elif line.startswith("event:") and line[6:].strip() == "succeeded":
                break
    return seqs


def test_stream_resumed_across_replica_and_primary_is_exact(
    servers: tuple[PostgresServer, PostgresServer], web: str
) -> None:
    primary, replica = servers
    job_id = enqueue(web, "chatty", events=200, size=20, pause=0.25)
    first = _events(web, job_id, 0, 30)

    def replayed() -> int:
        rows = replica.execute(
            f"SELECT coalesce(max(seq), 0) FROM tierline.job_events WHERE job_id = {job_id}"
        )
        return int(rows[0][0])

    wait_for(lambda: replayed() >= 80, 30, "the replica to hold 80 events")
    replica.pause_replay()
    try:
        # The resume's catch-up: the replica's prefix, then the primary's last page, then
        # live events from the primary; replay resumes while the stream runs.
        resumer: list[int] = []
        thread = threading.Thread(
            target=lambda: resumer.extend(_events(web, job_id, first[-1], None)), daemon=True
        )
        thread.start()
        time.sleep(1.0)
        replica.resume_replay()
        thread.join(timeout=60)
    finally:
        replica.resume_replay()
    seqs = first + resumer
    total = int(primary.execute(
        f"SELECT event_seq FROM tierline.jobs WHERE id = {job_id}"
    )[0][0])  # fmt: skip
    assert seqs == list(range(1, total + 1))  # every event once, in order
    assert total >= 201  # enqueued, started, 200 progress events, succeeded


def test_plan_shows_both_budgets_and_fails_when_either_does_not_fit(
    servers: tuple[PostgresServer, PostgresServer], tmp_path: Path
) -> None:
    primary, replica = servers
    env = tierline_env(primary.url(), TIERLINE_DATABASE_READ_URL=replica.url())

    def plan(**extra: Any) -> subprocess.CompletedProcess[str]:
        args = [sys.executable, "-m", "tierline", "plan", "--web", "4", "--workers", "2"]
        return subprocess.run(
            [*args, "--cores", "4"],
            env={**env, **{k: str(v) for k, v in extra.items()}},
            capture_output=True,
            text=True,
            timeout=60,
        )

    ok = plan()
    assert ok.returncode == 0, ok.stdout + ok.stderr
    assert "budget: 92 connections (server max_connections 100" in ok.stdout
    assert "read budget: 92 connections (server max_connections 100" in ok.stdout
    assert "planned on the read replica: 16 of 92 -> fits" in ok.stdout
    read_short = plan(TIERLINE_WEB_DB_READ_POOL_MAX=16, TIERLINE_DB_READ_MAX_CONNECTIONS=40)
    assert read_short.returncode == 1
    assert "planned: 30 of 92 -> fits" in read_short.stdout  # the primary's side holds
    assert "planned on the read replica: 64 of 40 -> DOES NOT FIT" in read_short.stdout
    assert "TIERLINE_WEB_DB_READ_POOL_MAX=10" in read_short.stdout
    primary_short = plan(TIERLINE_DB_MAX_CONNECTIONS=10)
    assert primary_short.returncode == 1
    assert "-> DOES NOT FIT" in primary_short.stdout
    assert "planned on the read replica: 16 of 92 -> fits" in primary_short.stdout
