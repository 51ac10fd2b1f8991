"""Server-sent event streams end to end: real web and worker processes, a real PostgreSQL.

Every stream is checked for the property clients rely on: each event exactly once, in
order, through the final one, whatever happens to connections and replicas meanwhile.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import resource
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Generator
from typing import Any, cast

import httpx
import pytest

from tests.helpers import ROOT
from tests.jobs_app import TEST_APP
from tierline.client import AsyncClient, Client, ClientError, SSEParser, StreamEvent
from tierline.testing.databases import query
from tierline.testing.http import enqueue
from tierline.testing.ports import free_port
from tierline.testing.processes import Cluster, Proc, tierline_env
from tierline.testing.waiting import wait_for

pytestmark = pytest.mark.e2e

# Small heartbeats make every read loop below wake up often enough to honour its deadline.
FAST = {"TIERLINE_SSE_HEARTBEAT_S": "0.5"}


# -- helpers --------------------------------------------------------------------------------
def read_stream(
    url: str,
    path: str,
    *,
    last_event_id: str | None = None,
    limit: int | None = None,
    timeout: float = 60,
    headers: dict[str, str] | None = None,
) -> tuple[list[StreamEvent], bool]:
    """Read an SSE stream until ``limit`` events (then cut the connection client-side),
    the server ends it, or ``timeout``; returns (events, whether the server ended it)."""
    hdrs = dict(headers or {})
    if last_event_id is not None:
        hdrs["Last-Event-ID"] = last_event_id
    events: list[StreamEvent] = []
    parser = SSEParser()
    deadline = time.monotonic() + timeout
    with (
        httpx.Client(timeout=httpx.Timeout(10, read=timeout)) as client,
        client.stream("GET", url + path, headers=hdrs) as resp,
    ):
        assert resp.status_code == 200, resp.read().decode()
        assert resp.headers["content-type"].startswith("text/event-stream")
        for line in resp.iter_lines():
            ev = parser.feed(line)
            if ev is not None:
                events.append(ev)
                if limit is not None and len(events) >= limit:
                    return events, False
            if time.monotonic() > deadline:
                raise AssertionError(f"stream {path} still open after {timeout}s: {events[-3:]}")
    return events, True


def assert_exactly_once(events: list[StreamEvent], final: str = "succeeded") -> None:
    """A job's whole stream: seq 1..N, each once, in order, ids = seqs, ending ``final``."""
    seqs = [e.seq for e in events]
    assert seqs == list(range(1, len(seqs) + 1)), f"gap or duplicate: {seqs}"
    assert [e.id for e in events] == [str(s) for s in seqs]
    assert events[0].type == "enqueued"
    assert events[-1].type == final
    assert [e.type for e in events].count(final) == 1


def job_state(url: str, job_id: int) -> str:
    state: str = httpx.get(f"{url}/v1/jobs/{job_id}", timeout=10).json()["state"]
    return state


def metric(url: str, name: str) -> float:
    text = httpx.get(f"{url}/metrics", timeout=10).text
    m = re.search(rf"^{re.escape(name)}(?:{{[^}}]*}})? (\S+)$", text, re.MULTILINE)
    assert m, f"{name} not in /metrics"
    return float(m[1])


def rss_bytes(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise AssertionError(f"no VmRSS for {pid}")


def web_backends(db_url: str) -> list[dict[str, Any]]:
    return query(
        db_url,
        "SELECT pid, application_name FROM pg_stat_activity "
        "WHERE datname = current_database() AND application_name LIKE 'tierline-web%'",
    )


def start_web(cluster: Cluster, n: int = 1, **env: Any) -> list[tuple[Proc, str]]:
    webs = [cluster.web(**{**FAST, **env}) for _ in range(n)]
    for proc, url in webs:
        cluster.wait_ready(url, proc)
    return webs


def start_worker(cluster: Cluster, **env: Any) -> tuple[Proc, str]:
    proc, url = cluster.worker(**env)
    cluster.wait_ready(url, proc)
    return proc, url


def json_error(resp: httpx.Response, status: int) -> dict[str, Any]:
    assert resp.status_code == status, (resp.status_code, resp.text)
    assert resp.headers["content-type"].startswith("application/json")
    err: dict[str, Any] = resp.json()["error"]
    assert err["status"] == status and err["code"] and err["message"]
    return err


# -- resuming ---------------------------------------------------------------------------------
def test_cut_twice_and_resumed_on_other_replicas_sees_every_event_once(
    cluster: Cluster,
) -> None:
    webs = start_web(cluster, 3)
    start_worker(cluster)
    urls = [u for _, u in webs]
    job = enqueue(urls[0], "progress", {"steps": 100, "delay": 0.08})

    first, ended = read_stream(urls[0], f"/v1/jobs/{job}/events", limit=30)
    assert not ended
    assert job_state(urls[0], job) == "running", "the cut should happen mid-job"
    second, ended = read_stream(
        urls[1], f"/v1/jobs/{job}/events", last_event_id=first[-1].id, limit=30
    )
    assert not ended
    assert job_state(urls[1], job) == "running", "the cut should happen mid-job"
    rest, ended = read_stream(urls[2], f"/v1/jobs/{job}/events", last_event_id=second[-1].id)
    assert ended

    events = first + second + rest
    assert_exactly_once(events)
    assert len(events) == 103  # enqueued, started, 100 x progress, succeeded
    assert [e.data["data"]["message"] for e in events if e.type == "progress"] == [
        f"step {i} of 100" for i in range(1, 101)
    ]
    # Resuming after the final event: nothing more to send, and the client is told so.
    r = httpx.get(
        f"{urls[1]}/v1/jobs/{job}/events", headers={"Last-Event-ID": events[-1].id}, timeout=10
    )
    assert r.status_code == 204 and r.content == b""


def test_client_follow_fails_over_between_replicas(cluster: Cluster) -> None:
    (a, url_a), (b, url_b), (_, url_c) = start_web(cluster, 3)
    start_worker(cluster)
    job = enqueue(url_a, "progress", {"steps": 80, "delay": 0.05})
    events: list[StreamEvent] = []
    with Client([url_a, url_b, url_c], retries=5) as client:
        for ev in client.follow(job):
            events.append(ev)
            if len(events) == 20:
                a.kill()  # abrupt: the connection breaks
            elif len(events) == 50:
                b.signal(signal.SIGTERM)  # graceful: the replica ends the stream cleanly
        assert client.reconnects >= 2
        assert client.url == url_c
    assert_exactly_once(events)
    assert len(events) == 83
    assert b.proc.wait(timeout=20) == 0


async def test_async_client_skips_a_dead_replica_and_stops_on_204(cluster: Cluster) -> None:
    [(_, url)] = await asyncio.to_thread(start_web, cluster)
    await asyncio.to_thread(start_worker, cluster)
    dead = f"http://127.0.0.1:{free_port()}"
    job = enqueue(url, "progress", {"steps": 5, "delay": 0.02})
    async with AsyncClient([dead, url], retries=3) as client:
        events = [ev async for ev in client.follow(job)]
        assert client.reconnects == 1 and client.url == url
        assert_exactly_once(events)
        # Following again from the final event ends at once (204), without retries.
        again = [ev async for ev in client.follow(job, after=events[-1].seq)]
        assert again == [] and client.reconnects == 1
        with pytest.raises(ClientError) as exc:
            [ev async for ev in client.follow(10**9)]
        assert exc.value.status == 404


def test_tierline_watch_follows_through_a_replica_failure(cluster: Cluster, db_url: str) -> None:
    (a, url_a), (_, url_b) = start_web(cluster, 2)
    start_worker(cluster)
    job = enqueue(url_a, "progress", {"steps": 40, "delay": 0.05})
    env = tierline_env(db_url)
    with subprocess.Popen(
        [
            sys.executable,
            "-m",
            "tierline",
            "watch",
            str(job),
            "--json",
            "--url",
            f"{url_a},{url_b}",
        ],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    ) as watch:
        assert watch.stdout is not None and watch.stderr is not None
        lines: list[str] = []
        try:
            for line in watch.stdout:
                lines.append(line)
                if len(lines) == 10:
                    a.kill()
            rc = watch.wait(timeout=30)
        finally:
            if watch.poll() is None:
                watch.kill()
        errors = watch.stderr.read()
    assert rc == 0, errors
    events = [json.loads(line) for line in lines]
    seqs = [e["data"]["seq"] for e in events]
    assert seqs == list(range(1, 44))
    assert [e["id"] for e in events] == [str(s) for s in seqs]
    assert events[-1]["event"] == "succeeded"

    # The readable form, on a finished job: every event, exit status 0.
    out = subprocess.run(
        [sys.executable, "-m", "tierline", "watch", str(job), "--url", url_b],
        env=env,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert out.returncode == 0, out.stderr
    rows = out.stdout.splitlines()
    assert len(rows) == 43 and "succeeded" in rows[-1] and "100.0%" in rows[-2]
    missing = subprocess.run(
        [sys.executable, "-m", "tierline", "watch", "999999", "--url", url_b],
        env=env,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert missing.returncode == 1 and "404" in missing.stderr


# -- scale: 1,000 streams on one replica -------------------------------------------------------
async def _follow_job(client: httpx.AsyncClient, url: str, job: int) -> list[StreamEvent]:
    events: list[StreamEvent] = []
    parser = SSEParser()
    async with client.stream("GET", f"{url}/v1/jobs/{job}/events") as resp:
        assert resp.status_code == 200
        async for line in resp.aiter_lines():
            ev = parser.feed(line)
            if ev is not None:
                events.append(ev)
                if ev.type == "succeeded":
                    break
    return events


async def _firehose(
    client: httpx.AsyncClient, url: str, expected: int, opened: asyncio.Event
) -> list[StreamEvent]:
    events: list[StreamEvent] = []
    parser = SSEParser()
    async with client.stream("GET", f"{url}/v1/events") as resp:
        assert resp.status_code == 200
        opened.set()
        async for line in resp.aiter_lines():
            ev = parser.feed(line)
            if ev is not None and ev.type != "enqueued":
                events.append(ev)
                if len(events) >= expected:
                    break
    return events


@pytest.mark.slow
async def test_thousand_streams_on_one_replica(cluster: Cluster, db_url: str) -> None:
    n_jobs, n_fire = 1000, 4
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < 4096:  # each stream is a socket here and one in the replica (inherits this)
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, 8192), hard))
    [(web, url)] = await asyncio.to_thread(
        start_web, cluster, TIERLINE_SSE_MAX_STREAMS=n_jobs + 100, TIERLINE_SSE_HEARTBEAT_S=5
    )
    rss_before = rss_bytes(web.pid)
    async with httpx.AsyncClient(timeout=30) as api:
        r = await api.post(
            f"{url}/v1/jobs/batch",
            json={
                "jobs": [
                    {"kind": "progress", "args": {"steps": 2, "delay": 0.01}} for _ in range(n_jobs)
                ]
            },
        )
        assert r.status_code == 202, r.text
        jobs = [j["id"] for j in r.json()["jobs"]]

    limits = httpx.Limits(max_connections=n_jobs + n_fire + 10, max_keepalive_connections=0)
    async with httpx.AsyncClient(timeout=httpx.Timeout(30, read=60), limits=limits) as client:
        opened = [asyncio.Event() for _ in range(n_fire)]
        fire = [
            asyncio.create_task(_firehose(client, url, 4 * n_jobs, o)) for o in opened
        ]  # started, 2 x progress, succeeded per job
        await asyncio.wait_for(asyncio.gather(*(o.wait() for o in opened)), 30)
        streams = [asyncio.create_task(_follow_job(client, url, j)) for j in jobs]

        def all_open() -> bool:
            return metric(url, "tierline_sse_streams_active") == n_jobs + n_fire

        await asyncio.to_thread(wait_for, all_open, 60, "1,004 open streams")
        rss_open = rss_bytes(web.pid)
        listen = [b for b in web_backends(db_url) if b["application_name"] == "tierline-web-listen"]
        assert len(listen) == 1
        pool_max = query(db_url, "SELECT pool_max FROM tierline.replicas WHERE tier = 'web'")[0][
            "pool_max"
        ]

        # Events flow to every stream while connections are sampled.
        await asyncio.to_thread(
            start_worker,
            cluster,
            TIERLINE_WORKER_CONCURRENCY=100,
            TIERLINE_WORKER_DB_POOL_MAX=10,
        )
        most = 0
        done = asyncio.gather(*streams, *fire)
        while not done.done():
            most = max(most, len(await asyncio.to_thread(web_backends, db_url)))
            await asyncio.wait({done}, timeout=0.2)
        results = await asyncio.wait_for(done, 90)

    # pool + LISTEN, plus the transient connection a replica opens to renew its claim
    assert most <= pool_max + 2, f"{most} web connections for a pool of {pool_max}"
    for job, events in zip(jobs, results[:n_jobs], strict=True):
        assert [e.seq for e in events] == [1, 2, 3, 4, 5], job
        assert events[-1].type == "succeeded"
    expected = {(j, s) for j in jobs for s in (2, 3, 4, 5)}
    for events in results[n_jobs:]:
        got = [(e.data["job_id"], e.data["seq"]) for e in events]
        assert len(got) == len(set(got)) and set(got) == expected
    # Memory: a stream costs some kilobytes, and the replica does not grow while events flow.
    grown = rss_open - rss_before
    assert grown < 300 * 2**20, f"RSS grew {grown >> 20} MiB for 1,004 streams"
    assert rss_bytes(web.pid) < rss_open + 100 * 2**20
    wait_for(lambda: metric(url, "tierline_sse_streams_active") == 0, 30, "streams to close")
    assert metric(url, "tierline_sse_events_sent_total") >= 5 * n_jobs + 4 * n_jobs * n_fire


# -- losing the LISTEN connection ---------------------------------------------------------------
def test_listen_connection_killed_mid_stream_loses_nothing(cluster: Cluster, db_url: str) -> None:
    [(_, url)] = start_web(cluster)
    start_worker(cluster)
    fire: list[StreamEvent] = []

    def firehose() -> None:
        parser = SSEParser()
        with httpx.stream("GET", f"{url}/v1/events", timeout=60) as resp:
            for line in resp.iter_lines():
                ev = parser.feed(line)
                if ev is not None:
                    fire.append(ev)
                    if ev.type == "succeeded":
                        return

    fire_thread = threading.Thread(target=firehose, daemon=True)
    fire_thread.start()
    wait_for(lambda: metric(url, "tierline_sse_streams_active") == 1, 10, "the firehose")
    job = enqueue(url, "progress", {"steps": 60, "delay": 0.08})
    killed: list[int] = []

    def kill_listen() -> None:
        rows = query(
            db_url,
            "SELECT pid, pg_terminate_backend(pid) AS ok FROM pg_stat_activity "
            "WHERE datname = current_database() AND application_name = 'tierline-web-listen'",
        )
        assert len(rows) == 1 and rows[0]["ok"]
        killed.append(rows[0]["pid"])

    events: list[StreamEvent] = []
    parser = SSEParser()
    with httpx.stream("GET", f"{url}/v1/jobs/{job}/events", timeout=60) as resp:
        for line in resp.iter_lines():
            ev = parser.feed(line)
            if ev is None:
                continue
            events.append(ev)
            if len(events) in (10, 35):
                kill_listen()
                if len(events) == 35:
                    assert job_state(url, job) == "running"
            if ev.type == "succeeded":
                break
    assert_exactly_once(events)
    assert len(events) == 63 and len(killed) == 2
    fire_thread.join(30)
    assert [e.seq for e in fire] == list(range(1, 64))
    # The replica listens again, on a new backend.
    wait_for(
        lambda: [
            b
            for b in web_backends(db_url)
            if b["application_name"] == "tierline-web-listen" and b["pid"] not in killed
        ],
        15,
        "a new LISTEN connection",
    )


# -- bad requests ------------------------------------------------------------------------------
def test_bad_ids_and_last_event_ids_get_clear_json_errors(cluster: Cluster) -> None:
    [(_, url)] = start_web(cluster)
    job = enqueue(url, "progress", {"steps": 2})  # no worker: stays available, seq 1
    done = enqueue(url, "progress", {"steps": 2})
    assert httpx.post(f"{url}/v1/jobs/{done}/cancel", timeout=10).status_code == 200
    with httpx.Client(base_url=url, timeout=10) as c:
        for path in ("abc", "0", "-1", "1.5", str(2**63), "99999999999999999999999"):
            json_error(c.get(f"/v1/jobs/{path}/events"), 422)
        err = json_error(c.get("/v1/jobs/424242/events"), 404)
        assert "424242" in err["message"]
        for bad in ("abc", "-1", "1.0", "0x1", "1 2", str(2**31), "9" * 30, "\u0661"):
            hdr: dict[str, Any] = {"Last-Event-ID": bad.encode()}  # bytes: non-ASCII as UTF-8
            err = json_error(c.get(f"/v1/jobs/{job}/events", headers=hdr), 400)
            assert "Last-Event-ID" in err["message"]
        err = json_error(c.get(f"/v1/jobs/{job}/events", headers={"Last-Event-ID": "5"}), 400)
        assert "beyond" in err["message"]
        for bad_after in ("-1", "x", str(2**31)):
            json_error(c.get(f"/v1/jobs/{job}/events", params={"after": bad_after}), 422)
        # A finished job: resuming from its final event is 204 (EventSource stops there).
        assert c.get(f"/v1/jobs/{done}/events", headers={"Last-Event-ID": "2"}).status_code == 204
        ev, ended = read_stream(url, f"/v1/jobs/{done}/events", last_event_id="1")
        assert ended and [(e.seq, e.type) for e in ev] == [(2, "cancelled")]
        ev, ended = read_stream(url, f"/v1/jobs/{done}/events", headers={"Last-Event-ID": ""})
        assert ended and [e.type for e in ev] == ["enqueued", "cancelled"]
        for bad in (
            *("abc", "1", "1-", "-1", "1-2-3-4", "1--2", "a-1", "1-2-", f"{2**64}-1"),
            *(f"1-{2**63}", f"1-2-{2**31}"),
        ):
            err = json_error(c.get("/v1/events", headers={"Last-Event-ID": bad}), 400)
            assert "XID-ID" in err["message"]
        json_error(c.get("/v1/events", params={"queue": "bad queue!"}), 422)
        json_error(c.get("/v1/events", params={"kind": "x" * 500}), 422)


# -- the firehose --------------------------------------------------------------------------------
def test_firehose_filters_and_resumes_across_replicas_without_gap_or_duplicate(
    cluster: Cluster, db_url: str
) -> None:
    webs = start_web(cluster, 3)
    urls = [u for _, u in webs]
    start_worker(cluster, TIERLINE_WORKER_QUEUES="a,b", TIERLINE_WORKER_CONCURRENCY=8)
    filtered: dict[str, list[StreamEvent]] = {}

    def follow_filtered(name: str, url: str, params: str, final_count: int) -> None:
        got: list[StreamEvent] = []
        filtered[name] = got
        parser = SSEParser()
        with httpx.stream("GET", f"{url}/v1/events?{params}", timeout=60) as resp:
            for line in resp.iter_lines():
                ev = parser.feed(line)
                if ev is not None:
                    got.append(ev)
                    if sum(e.type == "succeeded" for e in got) == final_count:
                        return

    # Every stream opens before the first job exists, so each must see every event.
    threads = [
        threading.Thread(
            target=follow_filtered, args=("a-progress", urls[1], "queue=a&kind=progress", 20)
        ),
        threading.Thread(target=follow_filtered, args=("echo", urls[2], "kind=echo", 20)),
        threading.Thread(target=follow_filtered, args=("b-or-a", urls[0], "queue=b&queue=a", 60)),
    ]
    for t in threads:
        t.daemon = True
        t.start()
    for url in urls:
        wait_for(lambda: metric(url, "tierline_sse_streams_active") == 1, 10, "streams")  # noqa: B023

    def producer() -> None:
        with httpx.Client(base_url=urls[0], timeout=10) as c:
            for i in range(20):
                for body in (
                    {"kind": "progress", "queue": "a", "args": {"steps": 3, "delay": 0.01}},
                    {"kind": "echo", "queue": "b", "args": {"i": i}},
                    {"kind": "progress", "queue": "b", "args": {"steps": 2, "delay": 0.01}},
                ):
                    assert c.post("/v1/jobs", json=body).status_code == 202
                time.sleep(0.05)

    prod = threading.Thread(target=producer, daemon=True)
    # Resumed three times on three replicas while jobs are enqueued and run concurrently.
    events: list[StreamEvent] = []
    last: str | None = None
    prod_started = False
    for url, limit in ((urls[0], 40), (urls[1], 60), (urls[2], 50), (urls[0], None)):
        with httpx.Client(timeout=httpx.Timeout(10, read=60)) as client:
            headers = {"Last-Event-ID": last} if last else {}
            with client.stream("GET", url + "/v1/events", headers=headers) as resp:
                assert resp.status_code == 200
                if not prod_started:
                    prod.start()
                    prod_started = True
                parser = SSEParser()
                got = 0
                for line in resp.iter_lines():
                    ev = parser.feed(line)
                    if ev is None:
                        continue
                    events.append(ev)
                    last, got = ev.id, got + 1
                    if limit is not None and got >= limit:
                        break
                    if limit is None and sum(e.type == "succeeded" for e in events) == 60:
                        break
    prod.join(30)
    for t in threads:
        t.join(60)
        assert not t.is_alive()

    # Exactly the stored events, in the firehose's (xid, id, sub) order: event rows, and
    # each enqueue record's jobs (their `enqueued` events) in the record's order.
    xid, eid, sub = (int(x) for x in (events[-1].id + "-0").split("-")[:3])
    stored = query(
        db_url,
        "SELECT fid, job_id, seq FROM ("
        " SELECT xid, id, 0 AS sub, xid::text || '-' || id AS fid, job_id, seq"
        " FROM tierline.job_events WHERE seq > 0"
        " UNION ALL"
        " SELECT e.xid, e.id, r.n, e.xid::text || '-' || e.id || '-' || r.n, r.job::bigint, 1"
        " FROM tierline.job_events e,"
        " jsonb_array_elements_text(e.data -> 'jobs') WITH ORDINALITY AS r(job, n)"
        " WHERE e.seq = 0) s "
        "WHERE (xid, id, sub) <= (%s::text::xid8, %s, %s) ORDER BY xid, id, sub",
        (str(xid), eid, sub),
    )
    assert [e.id for e in events] == [r["fid"] for r in stored]
    assert len(stored) == 20 * 6 + 20 * 3 + 20 * 5  # every job's whole life
    assert [(e.data["job_id"], e.data["seq"]) for e in events] == [
        (r["job_id"], r["seq"]) for r in stored
    ]
    # Filters: only matching events, all of them from when the stream opened, in order.
    a_progress = filtered["a-progress"]
    assert {(e.data["queue"], e.data["kind"]) for e in a_progress} == {("a", "progress")}
    assert sum(e.type == "progress" for e in a_progress) == 60
    echo = filtered["echo"]
    assert {e.data["kind"] for e in echo} == {"echo"} and len(echo) == 20 * 3
    both = filtered["b-or-a"]
    assert len(both) == len({e.id for e in both}) == len(stored)
    order = {r["fid"]: i for i, r in enumerate(stored)}
    for kept in filtered.values():
        positions = [order[e.id] for e in kept]
        assert positions == sorted(positions)


# -- edges ------------------------------------------------------------------------------------
def test_heartbeats_headers_and_metrics(cluster: Cluster) -> None:
    [(_, url)] = start_web(cluster, TIERLINE_SSE_HEARTBEAT_S="0.2")
    job = enqueue(url, "progress", {"steps": 2})  # no worker: the stream idles
    comments: list[str] = []
    with httpx.stream("GET", f"{url}/v1/jobs/{job}/events", timeout=10) as resp:
        assert resp.status_code == 200
        assert resp.headers["x-accel-buffering"] == "no"
        assert resp.headers["cache-control"] == "no-store"
        assert resp.headers["content-type"].startswith("text/event-stream")
        deadline = time.monotonic() + 10
        for line in resp.iter_lines():
            if line.startswith(":"):
                comments.append(line)
                if len(comments) == 1:  # (leaving this loop closes the stream)
                    assert metric(url, "tierline_sse_streams_active") == 1
            if sum("ping" in c for c in comments) >= 3 or time.monotonic() > deadline:
                break
    assert sum("ping" in c for c in comments) >= 3
    wait_for(lambda: metric(url, "tierline_sse_streams_active") == 0, 10, "the stream to close")
    assert metric(url, "tierline_sse_events_sent_total") >= 1
    assert metric(url, "tierline_sse_slow_clients_disconnected_total") == 0


def test_stream_cap_answers_503_json(cluster: Cluster) -> None:
    [(_, url)] = start_web(cluster, TIERLINE_SSE_MAX_STREAMS=2)
    job = enqueue(url, "progress", {"steps": 2})
    with contextlib.ExitStack() as stack:
        client = stack.enter_context(httpx.Client(timeout=10))
        for path in (f"/v1/jobs/{job}/events", "/v1/events"):
            resp = stack.enter_context(client.stream("GET", url + path))
            assert resp.status_code == 200
        wait_for(lambda: metric(url, "tierline_sse_streams_active") == 2, 10, "two streams")
        for path in (f"/v1/jobs/{job}/events", "/v1/events"):
            r = httpx.get(url + path, timeout=10)
            err = json_error(r, 503)
            assert err["code"] == "too_many_streams" and r.headers["retry-after"]
    # Slots free up when clients leave.
    wait_for(lambda: metric(url, "tierline_sse_streams_active") == 0, 10, "streams to close")
    ev, _ = read_stream(url, f"/v1/jobs/{job}/events", limit=1)
    assert [e.type for e in ev] == ["enqueued"]


def _raw_get(url: str, path: str, rcvbuf: int, headers: str = "") -> socket.socket:
    host, port = url.removeprefix("http://").split(":")
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)  # before connect: small window
    sock.connect((host, int(port)))
    sock.sendall(f"GET {path} HTTP/1.1\r\nHost: {host}\r\n{headers}\r\n".encode())
    return sock


def _dechunk(raw: bytes) -> bytes:
    """The body of a chunked HTTP response, possibly cut off mid-chunk."""
    _, _, rest = raw.partition(b"\r\n\r\n")
    body = b""
    while rest:
        size_line, sep, rest = rest.partition(b"\r\n")
        if not sep or not size_line:
            break
        size = int(size_line, 16)
        if size == 0:
            break
        body += rest[:size]
        rest = rest[size + 2 :]
    return body


def test_slow_client_is_cut_off_and_resumes(cluster: Cluster) -> None:
    [(web, url)] = start_web(cluster, TIERLINE_APP=TEST_APP, TIERLINE_SSE_BUFFER_EVENTS=10)
    rss_before = rss_bytes(web.pid)
    # Enough to fill the kernel's socket buffers on loopback (up to 4 MiB) and more.
    job = enqueue(url, "chatty", {"events": 3000, "size": 1900, "pause": 0.005})
    sock = _raw_get(url, f"/v1/jobs/{job}/events", rcvbuf=4096)
    try:
        # Streaming live (not replaying) when the events come.
        wait_for(lambda: metric(url, "tierline_sse_streams_active") == 1, 10, "the stream")
        start_worker(cluster, TIERLINE_APP=TEST_APP)
        # The client reads nothing; the replica must neither wait forever nor buffer all.
        wait_for(
            lambda: metric(url, "tierline_sse_slow_clients_disconnected_total") == 1,
            30,
            "the slow client to be cut off",
        )
        wait_for(lambda: metric(url, "tierline_sse_streams_active") == 0, 10, "unsubscribe")
        assert rss_bytes(web.pid) < rss_before + 50 * 2**20
        wait_for(lambda: job_state(url, job) == "succeeded", 30, "the job to finish")
        # The client now reads what reached it before the cut, then the connection's end.
        sock.settimeout(10)
        raw = b""
        while chunk := sock.recv(65536):
            raw += chunk
    finally:
        sock.close()
    parser = SSEParser()
    first = [e for e in map(parser.feed, _dechunk(raw).decode().split("\r\n")) if e is not None]
    assert first and first[-1].type != "succeeded"
    rest, ended = read_stream(url, f"/v1/jobs/{job}/events", last_event_id=first[-1].id)
    assert ended
    assert_exactly_once(first + rest)
    assert len(first + rest) == 3003


def test_bursts_beyond_the_buffer_reach_a_fast_client_without_a_cut(cluster: Cluster) -> None:
    # A buffer of 10 events, and a job whose events reach the database in batches of
    # dozens: a client that keeps reading gets them all (from the database when a burst
    # overflows its buffer) and is never taken for a slow one.
    [(_, url)] = start_web(cluster, TIERLINE_APP=TEST_APP, TIERLINE_SSE_BUFFER_EVENTS=10)
    job = enqueue(url, "chatty", {"events": 600, "size": 50, "pause": 0.02})
    with httpx.Client(timeout=httpx.Timeout(10, read=60)) as client:
        parser = SSEParser()
        events: list[StreamEvent] = []
        with client.stream("GET", f"{url}/v1/jobs/{job}/events") as resp:
            for line in resp.iter_lines():
                ev = parser.feed(line)
                if ev is None:
                    continue
                events.append(ev)
                if len(events) == 1:  # live before the job runs
                    start_worker(cluster, TIERLINE_APP=TEST_APP)
                if ev.type == "succeeded":
                    break
    assert_exactly_once(events)
    assert len(events) == 603
    assert metric(url, "tierline_sse_slow_clients_disconnected_total") == 0


def test_sigterm_ends_streams_cleanly_and_exits_zero(cluster: Cluster) -> None:
    [(web, url)] = start_web(cluster)
    job = enqueue(url, "progress", {"steps": 2})  # stays available: the stream would idle
    results: dict[str, Any] = {}

    def read(name: str, path: str) -> None:
        try:
            results[name] = read_stream(url, path, timeout=30)
        except Exception as exc:  # reported below
            results[name] = exc

    threads = [
        threading.Thread(target=read, args=("job", f"/v1/jobs/{job}/events"), daemon=True),
        threading.Thread(target=read, args=("fire", "/v1/events"), daemon=True),
    ]
    for t in threads:
        t.start()
    wait_for(lambda: metric(url, "tierline_sse_streams_active") == 2, 10, "two streams")
    web.signal(signal.SIGTERM)
    assert web.proc.wait(timeout=10) == 0
    for t in threads:
        t.join(10)
    events, ended = results["job"]  # a clean end of the body, not a broken connection
    assert ended and [e.type for e in events] == ["enqueued"]
    assert results["fire"] == ([], True)


def test_api_keys_guard_streams(cluster: Cluster) -> None:
    keys = "reader-key-1:read,enqueue-key-1:enqueue"
    [(_, url)] = start_web(cluster, TIERLINE_API_KEYS=keys)
    r = httpx.post(
        f"{url}/v1/jobs",
        json={"kind": "progress", "args": {}},
        headers={"Authorization": "Bearer enqueue-key-1"},
        timeout=10,
    )
    job = r.json()["id"]
    for path in (f"/v1/jobs/{job}/events", "/v1/events"):
        json_error(httpx.get(url + path, timeout=10), 401)
        bad = {"Authorization": "Bearer not-a-key-at-all"}
        json_error(httpx.get(url + path, headers=bad, timeout=10), 401)
        enq = {"Authorization": "Bearer enqueue-key-1"}
        assert json_error(httpx.get(url + path, headers=enq, timeout=10), 403)["code"] == (
            "forbidden"
        )
    ev, _ = read_stream(
        url,
        f"/v1/jobs/{job}/events",
        limit=1,
        headers={"Authorization": "Bearer reader-key-1"},
    )
    assert [e.type for e in ev] == ["enqueued"]
    with Client(url, api_key="reader-key-1") as client:
        follow = cast("Generator[StreamEvent, None, None]", client.follow(job))
        assert next(follow).seq == 1
        follow.close()


# -- the benchmark -------------------------------------------------------------------------------
@pytest.mark.slow
def test_stream_latency_bench_runs(server_url: str, tmp_path: Any) -> None:
    """``bench/stream-latency --smoke``: every event measured, nothing asserted on speed."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("TIERLINE_")}
    env.update(TIERLINE_BENCH_PYTHON=sys.executable, TIERLINE_BENCH_DATABASE_URL=server_url)
    out = tmp_path / "results"
    done = subprocess.run(
        [str(ROOT / "bench" / "stream-latency"), "--smoke", "--no-chart", "--out", str(out)],
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-4000:]
    result = json.loads((out / "stream-latency.json").read_text())
    assert result["benchmark"] == "stream-latency" and result["smoke"] is True
    for step in result["steps"]:
        assert step["streams_failed"] == 0
        assert step["events_received"] == step["events_expected"] > 0
    assert (out / "stream-latency.md").read_text().startswith("<!-- generated by `bench/")
