"""Executors end to end: real ``tierline worker`` processes running plain functions in
child processes (killed on timeout, replaced when they die or have done enough) and in
threads (which Python cannot stop: they keep their slot until they return).

Times come from the database (``job_events.at``, and ``public.runs.at`` written by the
handlers); the only bounds asserted are the acceptance's own, with room for a shared
machine.
"""

from __future__ import annotations

import os
import time
from datetime import datetime
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.process_app import PROCESS_APP
from tierline import App
from tierline.testing.databases import query
from tierline.testing.http import enqueue, enqueue_batch, job
from tierline.testing.processes import Cluster
from tierline.testing.waiting import wait_for

pytestmark = pytest.mark.e2e

ENV = {"TIERLINE_APP": PROCESS_APP}


def start(cluster: Cluster, **worker_env: Any) -> tuple[str, str, int]:
    """A web and a worker replica of the test app: the API URL, the worker's metrics URL
    and the worker's pid."""
    web, url = cluster.web(**ENV)
    worker, wurl = cluster.worker(**ENV, **worker_env)
    cluster.wait_ready(url, web)
    cluster.wait_ready(wurl, worker)
    return url, wurl, worker.pid


def finished(url: str, job_id: int, timeout: float = 60) -> dict[str, Any]:
    found: dict[str, Any] = wait_for(
        lambda: (j := job(url, job_id))["state"] in ("succeeded", "failed", "cancelled") and j,
        timeout,
        f"job {job_id} to finish",
    )
    return found


def events(db_url: str, job_id: int) -> list[dict[str, Any]]:
    return query(
        db_url,
        "SELECT type, data, at FROM tierline.job_stream WHERE job_id = %s ORDER BY seq",
        (job_id,),
    )


def event(evs: list[dict[str, Any]], type_: str, attempt: int) -> dict[str, Any]:
    [found] = [e for e in evs if e["type"] == type_ and e["data"].get("attempt") == attempt]
    return found


def runs(db_url: str, job_id: int) -> list[dict[str, Any]]:
    return query(
        db_url,
        "SELECT token, attempt, pid, at FROM public.runs WHERE job_id = %s ORDER BY at",
        (job_id,),
    )


def run(rows: list[dict[str, Any]], token: str, attempt: int) -> dict[str, Any]:
    [found] = [r for r in rows if r["token"] == token and r["attempt"] == attempt]
    return found


def seconds(later: datetime, earlier: datetime) -> float:
    return (later - earlier).total_seconds()


def scrape(wurl: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    text = httpx.get(f"{wurl}/metrics", timeout=10).text
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def sample(metrics: dict[Any, float], name: str, **labels: str) -> float:
    return metrics.get((name, tuple(sorted(labels.items()))), 0.0)


def pid_exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


# -- the process executor ---------------------------------------------------------------------
def test_timeout_kills_the_child_before_the_retry_starts(cluster: Cluster, db_url: str) -> None:
    url, wurl, _ = start(cluster, TIERLINE_WORKER_CHILDREN=1, TIERLINE_WORKER_CONCURRENCY=2)
    job_id = enqueue(url, "sleepy", {"seconds": 10})
    done = finished(url, job_id)
    assert done["state"] == "succeeded" and done["attempt"] == 2, done

    rows, evs = runs(db_url, job_id), events(db_url, job_id)
    first, retry = run(rows, "start", 1), run(rows, "start", 2)
    timed_out = event(evs, "retrying", 1)
    error = timed_out["data"]["error"]
    assert error["type"] == "TimeoutError"
    assert "timed out after 1 s" in error["message"] and "was killed" in error["message"]
    assert f"pid {first['pid']}" in error["message"]
    # Killed within about a second of its 1 s timeout; recorded only after that.
    assert 0.5 < seconds(timed_out["at"], first["at"]) < 1.0 + 1.5, (first, timed_out)
    # The retry started after the attempt was recorded, in another child.
    assert event(evs, "started", 2)["at"] > timed_out["at"]
    assert retry["at"] > timed_out["at"] and retry["pid"] != first["pid"]
    assert not [r for r in rows if r["token"] == "end"], "the killed attempt ran on"
    assert not pid_exists(first["pid"]), f"child {first['pid']} still exists"
    metrics = scrape(wurl)
    assert sample(metrics, "tierline_worker_children_killed_total", reason="timeout") == 1


def test_a_child_that_exits_fails_only_its_attempt(cluster: Cluster, db_url: str) -> None:
    url, wurl, _ = start(cluster, TIERLINE_WORKER_CHILDREN=1)
    job_id = enqueue(url, "die", {"code": 1})
    done = finished(url, job_id)
    assert done["state"] == "succeeded" and done["attempt"] == 2, done

    rows = runs(db_url, job_id)
    first, retry = run(rows, "start", 1), run(rows, "start", 2)
    error = event(events(db_url, job_id), "retrying", 1)["data"]["error"]
    assert error["type"] == "ChildDied"
    assert f"(pid {first['pid']}) exited with code 1" in error["message"], error
    assert retry["pid"] != first["pid"] and done["result"] == retry["pid"]
    # The next job runs in a fresh child too, and the replica stayed ready throughout.
    after = finished(url, enqueue(url, "whoami"))
    assert after["state"] == "succeeded" and after["result"] not in (first["pid"], None)
    assert httpx.get(f"{wurl}/readyz", timeout=5).status_code == 200
    metrics = scrape(wurl)
    assert sample(metrics, "tierline_worker_children_died_total") == 1
    assert sample(metrics, "tierline_worker_children", state="idle") == 1


def test_max_jobs_per_child_replaces_children_between_jobs(cluster: Cluster) -> None:
    url, wurl, worker_pid = start(
        cluster,
        TIERLINE_WORKER_CHILDREN=1,
        TIERLINE_WORKER_CONCURRENCY=2,
        TIERLINE_WORKER_MAX_JOBS_PER_CHILD=5,
    )
    ids = enqueue_batch(url, [{"kind": "whoami"} for _ in range(20)])
    done = [finished(url, i) for i in ids]
    assert all(j["state"] == "succeeded" for j in done)
    pids = [j["result"] for j in done]
    assert len(set(pids)) == 4, pids
    assert sorted(pids.count(p) for p in set(pids)) == [5, 5, 5, 5]
    assert worker_pid not in pids
    # The fourth child retired after its fifth job too; its replacement waits, idle.
    metrics = wait_for(
        lambda: (m := scrape(wurl)) and sample(m, "tierline_worker_children", state="idle") and m,
        30,
        "the replacement child",
    )
    assert sample(metrics, "tierline_worker_children_recycled_total", reason="max_jobs") == 4
    assert sample(metrics, "tierline_worker_resident_memory_bytes") > 10_000_000
    assert sample(metrics, "tierline_worker_child_max_resident_memory_bytes") > 1_000_000


def test_max_child_memory_replaces_a_grown_child(cluster: Cluster) -> None:
    url, wurl, _ = start(cluster, TIERLINE_WORKER_CHILDREN=1, TIERLINE_WORKER_MAX_CHILD_MEMORY_MB=1)
    pids = [finished(url, enqueue(url, "whoami"))["result"] for _ in range(3)]
    assert len(set(pids)) == 3, pids  # every child is above 1 MiB after its job
    recycled = sample(scrape(wurl), "tierline_worker_children_recycled_total", reason="memory")
    assert recycled >= 3


def test_progress_errors_outcomes_and_cancels_cross_from_a_child(
    cluster: Cluster, db_url: str
) -> None:
    url, wurl, _ = start(cluster, TIERLINE_WORKER_CHILDREN=2, TIERLINE_WORKER_CANCEL_GRACE_S=1)
    progressed = enqueue(url, "progress_child", {"steps": 3})
    failing = enqueue(url, "fail_child")
    retried = enqueue(url, "retry_child")
    assert finished(url, progressed)["result"]["steps"] == 3
    evs = events(db_url, progressed)
    assert [e["data"]["fraction"] for e in evs if e["type"] == "progress"] == [1 / 3, 2 / 3, 1.0]
    assert any(e["data"].get("message") == "logged from a child" for e in evs)
    failed = finished(url, failing)
    assert failed["state"] == "failed" and failed["error"]["type"] == "ValueError"
    assert "fail_child" in failed["error"]["traceback"]
    assert finished(url, retried)["result"] == 2

    with httpx.Client(timeout=10) as http:
        polite = enqueue(url, "cancel_child")
        stubborn = enqueue(url, "stubborn_child")
        for job_id in (polite, stubborn):
            wait_for(lambda: job(url, job_id)["state"] == "running", 30, f"{job_id} running")  # noqa: B023
            assert http.post(f"{url}/v1/jobs/{job_id}/cancel").status_code == 200
    assert finished(url, polite)["error"]["message"] == "asked to stop, in a child"
    assert finished(url, stubborn)["state"] == "cancelled"
    metrics = scrape(wurl)
    assert sample(metrics, "tierline_worker_children_killed_total", reason="cancelled") == 1
    assert sample(metrics, "tierline_worker_children_died_total") == 0


# -- the thread executor ----------------------------------------------------------------------
def test_a_timed_out_thread_keeps_its_slot_and_its_retry_waits(
    cluster: Cluster, db_url: str
) -> None:
    concurrency = 2
    url, wurl, worker_pid = start(cluster, TIERLINE_WORKER_CONCURRENCY=concurrency)
    job_id = enqueue(url, "sleepy_thread", {"seconds": 10})
    enqueue_batch(url, [{"kind": "nap", "args": {"seconds": 0.5}} for _ in range(12)])
    busiest, overruns = 0.0, 0.0
    deadline = time.monotonic() + 60
    while job(url, job_id)["state"] != "succeeded":
        assert time.monotonic() < deadline, "the thread job did not succeed within 60 s"
        metrics = scrape(wurl)
        busiest = max(busiest, sample(metrics, "tierline_worker_slots", state="busy"))
        overruns = max(overruns, sample(metrics, "tierline_worker_overrunning_threads"))
        assert busiest <= concurrency, f"{busiest} busy slots with concurrency {concurrency}"
        time.sleep(0.1)
    assert overruns == 1

    rows, evs = runs(db_url, job_id), events(db_url, job_id)
    first, first_end, retry = run(rows, "start", 1), run(rows, "end", 1), run(rows, "start", 2)
    timed_out = event(evs, "retrying", 1)
    assert "Python cannot stop a thread" in timed_out["data"]["error"]["message"]
    assert seconds(timed_out["at"], first["at"]) < 1.0 + 1.5  # recorded on time...
    assert seconds(first_end["at"], first["at"]) > 9  # ...while the thread ran on
    assert first["pid"] == retry["pid"] == worker_pid
    assert retry["at"] > first_end["at"], "the retry ran beside the first thread"


# -- registration ---------------------------------------------------------------------------
def test_registration_refuses_what_a_child_cannot_do() -> None:
    app = App("refusals")

    async def coroutine() -> None: ...

    def plain() -> None: ...

    with pytest.raises(ValueError, match="async def handler runs on the worker's event loop"):
        app.job(executor="process")(coroutine)
    with pytest.raises(ValueError, match="uses_db=True cannot go with executor='process'"):
        app.job(executor="process", uses_db=True)(plain)
    with pytest.raises(ValueError, match="executor must be 'thread' or 'process'"):
        app.job(executor="fork")(plain)  # type: ignore[arg-type]
    app.job(executor="thread", uses_db=True)(plain)
    assert app.handlers["plain"].executor == "thread"


def test_a_worker_stops_without_waiting_for_an_overrunning_thread(
    cluster: Cluster, db_url: str
) -> None:
    web, url = cluster.web(**ENV)
    worker, wurl = cluster.worker(**ENV, TIERLINE_WORKER_SHUTDOWN_GRACE_S=1)
    cluster.wait_ready(url, web)
    cluster.wait_ready(wurl, worker)
    job_id = enqueue(url, "sleepy_thread", {"seconds": 120})
    wait_for(lambda: job(url, job_id)["state"] == "retrying", 30, "the attempt to time out")
    assert worker.stop(timeout=20) == 0  # not after the thread's 120 s
    assert "exiting without waiting for threads that cannot be stopped" in worker.output()


def test_children_follow_usable_cores_within_the_concurrency() -> None:
    from tierline.cores import usable_cores
    from tierline.executors.dispatch import children_for
    from tierline.settings import Settings

    cores = usable_cores().usable
    assert children_for(Settings.from_env({})) == min(cores, 10)
    assert children_for(Settings.from_env({}, worker_concurrency=1)) == 1
    assert children_for(Settings.from_env({}, worker_children=3, worker_concurrency=10)) == 3
    assert children_for(Settings.from_env({}, worker_children=8, worker_concurrency=2)) == 2


def test_where_each_handler_runs() -> None:
    from tierline.executors.dispatch import Executors
    from tierline.settings import Settings

    app = App("where")

    @app.job()
    async def on_loop() -> None: ...

    @app.job()
    def plain() -> None: ...

    @app.job(uses_db=True)
    def with_pool() -> None: ...

    @app.job(executor="thread")
    def pinned() -> None: ...

    by_default = Executors(app, Settings.from_env({}))
    processes = Executors(app, Settings.from_env({}, worker_executor="process"))
    try:
        where = {k: (by_default.where(h), processes.where(h)) for k, h in app.handlers.items()}
    finally:
        by_default.threads.close()
        processes.threads.close()
    assert where == {
        "on_loop": ("loop", "loop"),
        "plain": ("thread", "process"),
        "with_pool": ("thread", "thread"),  # a pool connection cannot cross into a child
        "pinned": ("thread", "thread"),
    }
    assert processes.process_kinds() == ["plain"]
