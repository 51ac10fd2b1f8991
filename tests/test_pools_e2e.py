"""Pools and the connection budget with real processes and a real PostgreSQL.

- a pool asked for 500 runs capped, with one WARNING and both values in /metrics;
- under a CPU quota (a real cgroup), the cap uses the quota's cores;
- 20 replicas started at once against a server with max_connections=40 never hold more
  than the budget; the ones that do not fit say why on /readyz and start when others stop;
- an exhausted pool answers 503 pool_exhausted, counts waits, and recovers; a job that
  cannot get a connection is retried;
- start-up jitter, backoff against an absent database, pools opening one connection at a
  time.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import psycopg
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import make_settings
from tests.helpers import ROOT
from tierline import backoff, database
from tierline.testing.databases import query
from tierline.testing.ports import free_port
from tierline.testing.postgres import PostgresServer
from tierline.testing.processes import Cluster, Proc, tierline_env
from tierline.testing.waiting import wait_for

pytestmark = pytest.mark.e2e

POOLS_APP = "tests.pools_app:app"


# -- helpers ----------------------------------------------------------------------------------
def events(proc: Proc) -> list[dict[str, Any]]:
    """The JSON log lines of a process (psycopg_pool's plain lines are skipped)."""
    out = []
    for line in proc.output().splitlines():
        with contextlib.suppress(ValueError):
            item = json.loads(line)
            if isinstance(item, dict) and "event" in item:
                out.append(item)
    return out


def scrape(url: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """``/metrics`` as {(sample name, sorted labels): value}."""
    text = httpx.get(f"{url}/metrics", timeout=10).text
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def sample(metrics: dict[Any, float], name: str, **labels: str) -> float:
    if name.startswith("tierline_db_pool_"):
        labels.setdefault("target", "primary")  # the tier's pool (not a read replica's)
    return metrics[(name, tuple(sorted(labels.items())))]


def readyz(url: str) -> tuple[int, dict[str, Any]] | None:
    try:
        r = httpx.get(f"{url}/readyz", timeout=5)
    except httpx.HTTPError:
        return None
    return r.status_code, r.json()


def my_replica(url: str, pid: int) -> dict[str, Any]:
    replicas = httpx.get(f"{url}/v1/cluster", timeout=10).json()["replicas"]
    [mine] = [r for r in replicas if r["pid"] == pid and r["status"] == "alive"]
    found: dict[str, Any] = mine
    return found


# -- 1. a misconfigured pool is capped, logged once, and visible ------------------------------
def test_web_pool_of_500_runs_capped_with_one_warning(cluster: Cluster) -> None:
    web, url = cluster.web(TIERLINE_WEB_DB_POOL_MAX=500, TIERLINE_STARTUP_JITTER_S=0.3)
    cluster.wait_ready(url, web)
    mine = my_replica(url, web.pid)
    applied = mine["stats"]["cores"] * 4  # TIERLINE_DB_POOL_CPU_FACTOR's default
    assert applied < 500

    caps = [e for e in events(web) if e["event"] == "pool size capped"]
    assert len(caps) == 1, caps
    [cap] = caps
    assert cap["level"] == "warning"
    assert (cap["variable"], cap["requested"], cap["applied"]) == (
        "TIERLINE_WEB_DB_POOL_MAX",
        500,
        applied,
    )
    assert "usable core" in cap["reason"] and "TIERLINE_DB_POOL_CPU_FACTOR 4" in cap["reason"]

    m = scrape(url)
    assert sample(m, "tierline_db_pool_requested_max_connections", tier="web") == 500
    assert sample(m, "tierline_db_pool_max_connections", tier="web") == applied
    assert (mine["pool_requested_max"], mine["pool_max"]) == (500, applied)
    assert mine["claimed_connections"] == applied + 1  # the pool and the LISTEN connection

    # Point 7: the start-up jitter is drawn in [0, TIERLINE_STARTUP_JITTER_S] and logged.
    [jitter] = [e for e in events(web) if e["event"] == "start-up jitter"]
    assert 0 <= jitter["wait_s"] <= 0.3
    assert web.stop() == 0


# -- 5. a real CPU quota -----------------------------------------------------------------------
@contextlib.contextmanager
def cpu_quota_cgroup(cpus: float) -> Iterator[tuple[Path, str]]:
    """A child cgroup with a CPU quota of ``cpus`` (v1 cpu controller, else v2 at the
    hierarchy's root), and the source name the budget reports for it; skip if we cannot."""
    own = ""
    with contextlib.suppress(OSError):
        for line in Path("/proc/self/cgroup").read_text().splitlines():
            _, controllers, path = line.split(":", 2)
            if "cpu" in controllers.split(","):
                own = path
    name = f"tierline-test-{uuid.uuid4().hex[:8]}"
    mounts = [Path("/sys/fs/cgroup/cpu,cpuacct"), Path("/sys/fs/cgroup/cpu")]
    base = next((m for m in mounts if (m / "cpu.cfs_quota_us").exists()), None)
    v2 = Path("/sys/fs/cgroup")
    folder: Path | None = None
    try:
        if base is not None and own:
            folder, source = base / own.lstrip("/") / name, "cgroup v1 cfs quota"
            folder.mkdir()
            (folder / "cpu.cfs_period_us").write_text("100000")
            (folder / "cpu.cfs_quota_us").write_text(str(int(cpus * 100000)))
        elif "cpu" in (v2 / "cgroup.controllers").read_text().split():
            # The root may hold processes and still delegate the cpu controller.
            folder, source = v2 / name, "cgroup v2 cpu.max"
            if "cpu" not in (v2 / "cgroup.subtree_control").read_text().split():
                (v2 / "cgroup.subtree_control").write_text("+cpu")
            folder.mkdir()
            (folder / "cpu.max").write_text(f"{int(cpus * 100000)} 100000")
        else:
            pytest.skip("no cgroup cpu controller here (the fixture-file tests cover both)")
    except OSError as exc:
        if folder is not None:
            with contextlib.suppress(OSError):
                folder.rmdir()
        pytest.skip(f"cannot create a cgroup with a CPU quota here: {exc}")
    assert folder is not None
    try:
        yield folder, source
    finally:
        for _ in range(100):  # the cgroup can go once its processes have exited
            try:
                folder.rmdir()
                break
            except OSError:
                time.sleep(0.1)


def test_cap_uses_the_cores_of_a_real_cpu_quota(cluster: Cluster, db_url: str) -> None:
    if (os.cpu_count() or 1) < 2:
        pytest.skip("a 0.5-CPU quota only shows on a machine with 2 or more cores")
    with cpu_quota_cgroup(0.5) as (cgroup, source):
        port = free_port()
        env = tierline_env(db_url, TIERLINE_WEB_PORT=port, TIERLINE_WEB_DB_POOL_MAX=500)
        # Join the cgroup before Python starts, so the process reads its quota from birth.
        join = ["sh", "-c", f'echo $$ > "{cgroup}/cgroup.procs" && exec "$@"', "sh"]
        web = Proc(["web"], env, cluster.tmp / "web-quota.log", prefix=join)
        cluster.procs.append(web)
        url = f"http://127.0.0.1:{port}"
        cluster.wait_ready(url, web)
        assert cgroup.name in Path(f"/proc/{web.pid}/cgroup").read_text()

        [cap] = [e for e in events(web) if e["event"] == "pool size capped"]
        assert cap["applied"] == 4
        assert cap["reason"] == f"1 usable core ({source}) x TIERLINE_DB_POOL_CPU_FACTOR 4"
        stats = my_replica(url, web.pid)["stats"]
        assert (stats["cores"], stats["cores_source"]) == (1, source)
        assert sample(scrape(url), "tierline_db_pool_max_connections", tier="web") == 4
        assert web.stop() == 0


# -- 2. twenty replicas at once against max_connections=40 ----------------------------------------
class Sampler(threading.Thread):
    """Counts connections every ~50 ms from a superuser connection reserved up front."""

    SQL = """
        SELECT count(*) AS total,
               count(*) FILTER (WHERE usename = 'app') AS app,
               count(*) FILTER (WHERE usename = 'app'
                                AND application_name NOT LIKE '%%-claim') AS held,
               (SELECT coalesce(sum(claimed), 0) FROM tierline.replicas
                 WHERE stopped_at IS NULL
                   AND heartbeat_at + make_interval(secs => lease_s) > now()) AS claimed
        FROM pg_stat_activity WHERE backend_type = 'client backend'
    """

    def __init__(self, url: str) -> None:
        super().__init__(daemon=True)
        self.conn = psycopg.connect(url, autocommit=True)
        self.samples: list[tuple[int, int, int, int]] = []
        self.stopping = threading.Event()
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            while not self.stopping.is_set():
                row = self.conn.execute(self.SQL).fetchone()
                assert row is not None
                self.samples.append((int(row[0]), int(row[1]), int(row[2]), int(row[3])))
                self.stopping.wait(0.05)
        except BaseException as exc:  # reported by the test
            self.error = exc

    def stop(self) -> None:
        self.stopping.set()
        self.join(timeout=10)
        self.conn.close()

    def peak(self, i: int) -> int:
        return max(s[i] for s in self.samples)


def run_cli(args: list[str], url: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "tierline", *args],
        env={**tierline_env(url), "TIERLINE_DATABASE_URL": url},
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )


@pytest.mark.slow
def test_twenty_replicas_at_once_never_exceed_the_budget(tmp_path: Path) -> None:
    with PostgresServer(max_connections=40, synchronous_commit="off") as server:
        # The application connects as an ordinary role: the 3 superuser-reserved slots
        # stay free for the sampler and for admins, as in production.
        server.execute("CREATE ROLE app LOGIN")
        server.execute("CREATE DATABASE tierline OWNER app")
        url = server.url("tierline", user="app")
        migrate = run_cli(["migrate"], url)
        assert migrate.returncode == 0, migrate.stderr
        sizes = {"TIERLINE_WEB_DB_POOL_MAX": "2", "TIERLINE_WORKER_DB_POOL_MAX": "2"}
        budget = 40 - 3 - 5  # max_connections - superuser_reserved - TIERLINE_DB_RESERVED

        # Point 4: the plan says up front that 8 + 12 replicas of 3 connections do not fit.
        plan = subprocess.run(
            [sys.executable, "-m", "tierline", "plan", "--web", "8", "--workers", "12"],
            env={**tierline_env(url), "TIERLINE_DATABASE_URL": url, **sizes},
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert plan.returncode == 1, plan.stdout + plan.stderr
        assert f"planned: 60 of {budget} -> DOES NOT FIT (short by 28)" in plan.stdout
        assert "worker tier: 12 x 3 = 36 connections" in plan.stdout

        sampler = Sampler(server.url("tierline"))
        sampler.start()
        cluster = Cluster(
            url,
            tmp_path,
            TIERLINE_APP=POOLS_APP,
            TIERLINE_STARTUP_JITTER_S="0.5",
            TIERLINE_REPLICA_LEASE_S="10",  # 20 processes starting on 2 cores are slow
            TIERLINE_WORKER_CONCURRENCY="2",
            **sizes,
        )
        try:
            procs = [cluster.web() for _ in range(8)] + [cluster.worker() for _ in range(12)]

            def settled() -> dict[str, tuple[int, dict[str, Any]]] | None:
                """Every replica answers /readyz: ready, or not ready for lack of budget."""
                states = {}
                for proc, purl in procs:
                    if proc.proc.poll() is not None:
                        raise AssertionError(f"a replica exited:\n{proc.output()[-3000:]}")
                    answer = readyz(purl)
                    if answer is None:
                        return None
                    status, body = answer
                    if status != 200 and not body.get("reason", "").startswith(
                        "connection budget exhausted"
                    ):
                        return None
                    states[purl] = answer
                return states

            states = wait_for(settled, 180, "every replica ready or waiting for budget", 0.5)
            ready = [p for p in procs if states[p[1]][0] == 200]
            waiting = [p for p in procs if states[p[1]][0] == 503]
            assert ready and waiting, states
            for _, purl in waiting:
                body = states[purl][1]
                assert body["status"] == "not ready"
                assert f"of {budget} free" in body["reason"], body
            claimed = query(
                server.url("tierline"),
                "SELECT sum(claimed)::int AS n, count(*) FILTER (WHERE ready)::int AS ready "
                "FROM tierline.replicas WHERE stopped_at IS NULL",
            )[0]
            assert claimed["n"] <= budget and claimed["ready"] == len(ready)

            # Stop the replicas that run: the waiting ones take their budget and start.
            for proc, _ in ready:
                assert proc.stop() == 0
            for proc, purl in waiting:
                cluster.wait_ready(purl, proc, timeout=90)
        finally:
            sampler.stop()
            outputs = {p.log_path.name: p.output() for p in cluster.procs}
            cluster.close()

        assert sampler.error is None, sampler.error
        assert len(sampler.samples) > 100
        # The server never refused the sampler and never passed its limit...
        assert sampler.peak(0) <= 40
        # ...the replicas' pools and LISTEN connections never passed the budget, nor
        # did the claims recorded in the registry.
        assert sampler.peak(2) <= budget, sampler.peak(2)
        assert sampler.peak(3) <= budget, sampler.peak(3)
        # Start-up connection refusals, if any, were retried: nothing crashed (every
        # replica above answered /readyz to the end) and each was logged as a retry.
        refused = sum(text.count("too many clients") for text in outputs.values())
        print(
            f"peak connections: server {sampler.peak(0)}, app {sampler.peak(1)}, "
            f"held {sampler.peak(2)}, claimed {sampler.peak(3)} of {budget}; "
            f"ready at first {len(ready)}, waiting {len(waiting)}; "
            f"'too many clients' seen {refused} times"
        )


def test_refused_connections_at_start_up_are_retried(tmp_path: Path) -> None:
    """A server with no slot left refuses the claim connection: the replicas report it
    on /readyz, retry with backoff, and start once slots free; nothing crashes."""
    with PostgresServer(max_connections=12, synchronous_commit="off") as server:
        server.execute("CREATE ROLE app LOGIN")
        server.execute("CREATE DATABASE tierline OWNER app")
        url = server.url("tierline", user="app")
        assert run_cli(["migrate"], url).returncode == 0
        # Fill every slot an ordinary role may use (12 - 3 superuser-reserved).
        squatters: list[psycopg.Connection[Any]] = []
        with contextlib.ExitStack() as stack:
            for _ in range(9):
                squatters.append(stack.enter_context(psycopg.connect(url)))
            with pytest.raises(
                psycopg.OperationalError, match="remaining connection slots are reserved"
            ):
                psycopg.connect(url)
            cluster = Cluster(
                url,
                tmp_path,
                TIERLINE_DB_MAX_CONNECTIONS=8,
                TIERLINE_WEB_DB_POOL_MAX=2,
                TIERLINE_WORKER_DB_POOL_MAX=2,
            )
            try:
                web, wurl = cluster.web()
                worker, kurl = cluster.worker()

                def refused(purl: str) -> bool:
                    answer = readyz(purl)
                    return (
                        answer is not None
                        and answer[0] == 503
                        and answer[1]["reason"].startswith("database full, retrying")
                    )

                wait_for(lambda: refused(wurl) and refused(kurl), 30, "'database full'")
                stack.close()  # the squatters leave
                cluster.wait_ready(wurl, web, timeout=60)
                cluster.wait_ready(kurl, worker, timeout=60)
                for proc in (web, worker):
                    full = [e for e in events(proc) if e["event"] == "replica not ready"]
                    assert "remaining connection slots are reserved" in full[0]["reason"]
                    assert proc.stop() == 0
            finally:
                cluster.close()


# -- 3. an exhausted pool: 503, counted waits, recovery -------------------------------------------
def test_exhausted_web_pool_answers_503_and_recovers(cluster: Cluster, db_url: str) -> None:
    web, url = cluster.web(
        TIERLINE_WEB_DB_POOL_MAX=1,
        TIERLINE_DB_POOL_TIMEOUT_S=0.5,
        TIERLINE_REPLICA_LEASE_S=10,
    )
    cluster.wait_ready(url, web)
    assert httpx.get(f"{url}/v1/jobs", timeout=10).status_code == 200
    before = scrape(url)

    # A slow database, honestly: the test locks the jobs table, so the request that has
    # the pool's only connection waits for the lock, and every other one for the pool.
    lock = psycopg.connect(db_url, autocommit=False)
    lock.execute("LOCK TABLE tierline.jobs IN ACCESS EXCLUSIVE MODE")

    def blocked() -> bool:
        waiting = query(
            db_url,
            "SELECT count(*) AS n FROM pg_stat_activity "
            "WHERE datname = current_database() AND wait_event_type = 'Lock'",
        )
        return bool(waiting[0]["n"] >= 1)

    async def load() -> tuple[list[httpx.Response], list[float]]:
        waiting_seen: list[float] = []
        async with httpx.AsyncClient(timeout=30) as client:

            async def one() -> httpx.Response:
                return await client.get(f"{url}/v1/jobs")

            first = asyncio.create_task(one())
            # Wait until it holds the pool's connection, blocked on the lock.
            await asyncio.to_thread(wait_for, blocked, 30, "a query waiting for the lock")
            answers = []
            for _ in range(4):  # waves of requests while the lock is held
                wave = [asyncio.create_task(one()) for _ in range(6)]
                await asyncio.sleep(0.2)
                m = await asyncio.to_thread(scrape, url)
                waiting_seen.append(sample(m, "tierline_db_pool_waiting_requests", tier="web"))
                health = await client.get(f"{url}/healthz")
                assert health.status_code == 200  # liveness does not need the database
                answers += await asyncio.gather(*wave)
            await asyncio.to_thread(lock.rollback)  # the database is fast again
            answers.append(await first)
        return answers, waiting_seen

    try:
        answers, waiting_seen = asyncio.run(load())
    finally:
        lock.close()

    *timed_out, first = answers
    assert first.status_code == 200
    assert timed_out
    for r in timed_out:
        assert r.status_code == 503, r.text
        assert r.json()["error"]["code"] == "pool_exhausted"
        assert r.json()["error"]["status"] == 503
        assert r.headers["retry-after"] == "1"
    assert max(waiting_seen) >= 1

    after = scrape(url)

    def delta(name: str) -> float:
        return sample(after, name, tier="web") - sample(before, name, tier="web")

    assert delta("tierline_db_pool_waits_total") >= len(timed_out)
    # Every timeout is one a client saw: scrapes skip their database reads while the pool
    # is saturated instead of queueing (and timing out) behind the requests.
    assert delta("tierline_db_pool_timeouts_total") == len(timed_out)
    assert sample(after, "tierline_db_pool_wait_seconds_total", tier="web") > 0
    # The process stayed healthy, ready, and serves again.
    assert httpx.get(f"{url}/healthz", timeout=5).status_code == 200
    assert readyz(url) == (200, {"status": "ready"})
    for _ in range(5):
        assert httpx.get(f"{url}/v1/jobs", timeout=10).status_code == 200
    assert web.proc.poll() is None
    assert web.stop() == 0


def test_job_that_gets_no_connection_is_retried(cluster: Cluster, db_url: str) -> None:
    env = {"TIERLINE_APP": POOLS_APP}
    web, url = cluster.web(**env)
    cluster.wait_ready(url, web)
    jobs = [
        {"kind": "hold", "args": {"seconds": 3}},
        {"kind": "hold", "args": {"seconds": 3}},
        {"kind": "needs_db", "args": {"token": "t"}},
    ]
    r = httpx.post(f"{url}/v1/jobs/batch", json={"jobs": jobs}, timeout=10)
    assert r.status_code == 202, r.text
    needy = r.json()["jobs"][2]["id"]
    # A pool of 2 for 3 slots: both holds take the connections; needs_db times out.
    worker, wurl = cluster.worker(
        **env,
        TIERLINE_WORKER_CONCURRENCY=3,
        TIERLINE_WORKER_DB_POOL_MAX=2,
        TIERLINE_DB_POOL_TIMEOUT_S=0.5,
        TIERLINE_REPLICA_LEASE_S=10,
    )

    def finished() -> dict[str, Any] | None:
        job = httpx.get(f"{url}/v1/jobs/{needy}", timeout=5).json()
        return job if job["state"] in ("succeeded", "failed") else None

    job = wait_for(finished, 60, "needs_db to finish")
    assert job["state"] == "succeeded" and job["attempt"] >= 2, job
    runs = query(db_url, "SELECT attempt FROM public.runs WHERE job_id = %s", (needy,))
    assert [r["attempt"] for r in runs] == [job["attempt"]]  # no attempt before got one
    retries = [e for e in events(worker) if e["event"] == "job will retry" and e["job_id"] == needy]
    assert retries and "couldn't get a connection" in retries[0]["error"]
    assert readyz(wurl) == (200, {"status": "ready"})
    assert worker.stop() == 0


# -- 7. start-up: backoff until the database comes, gradual pools --------------------------------
def test_replica_waits_with_backoff_until_the_database_comes(tmp_path: Path) -> None:
    server = PostgresServer(max_connections=20, synchronous_commit="off")
    url = server.url()
    cluster = Cluster(url, tmp_path)
    web, wurl = cluster.web()
    try:
        # Nothing listens yet: the replica reports why it is not ready and keeps trying.
        def unreachable() -> bool:
            answer = readyz(wurl)
            return (
                answer is not None
                and answer[0] == 503
                and "database unreachable" in (answer[1]["reason"])
            )

        wait_for(unreachable, 30, "/readyz to say the database is unreachable")
        server.start()
        migrate = run_cli(["migrate"], url)
        assert migrate.returncode == 0, migrate.stderr
        cluster.wait_ready(wurl, web, timeout=60)
        not_ready = [e for e in events(web) if e["event"] == "replica not ready"]
        assert not_ready and "database unreachable" in not_ready[0]["reason"]
        assert web.proc.poll() is None
    finally:
        cluster.close()
        server.close()


def test_backoff_delays_are_exponential_with_full_jitter() -> None:
    delays = backoff.backoff_delays(base=0.5, cap=10.0)
    for n in range(10):
        assert 0 <= next(delays) <= min(10.0, 0.5 * 2**n)
    capped = backoff.backoff_delays(base=1.0, cap=4.0)
    late = [next(capped) for _ in range(200)][3:]  # capped from the 3rd draw on
    assert max(late) <= 4.0 and min(late) < 1.0 and max(late) > 3.0  # spread over [0, cap]


async def test_pool_opens_its_minimum_one_connection_at_a_time(
    db_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """num_workers=1: a replica never opens connections in a burst."""
    in_flight = 0
    peak = 0
    opened = 0
    original = psycopg.AsyncConnection.connect.__func__  # type: ignore[attr-defined]

    async def counting(cls: Any, *args: Any, **kwargs: Any) -> Any:
        nonlocal in_flight, peak, opened
        in_flight += 1
        peak = max(peak, in_flight)
        try:
            await asyncio.sleep(0.02)  # make overlap likely if there were several openers
            return await original(cls, *args, **kwargs)
        finally:
            in_flight -= 1
            opened += 1

    monkeypatch.setattr(psycopg.AsyncConnection, "connect", classmethod(counting))
    pool = database.make_pool(make_settings(db_url), min_size=6, max_size=6, name="gradual")
    await pool.open(wait=True, timeout=30)
    try:
        assert opened == 6 and peak == 1
        assert pool.get_stats()["pool_size"] == 6
    finally:
        await pool.close()
