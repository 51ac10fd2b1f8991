"""Live scaling: ``tierline scale worker=4`` during ``tierline up`` adds worker processes
while the web process keeps its PID and answers every request; ``web=2`` then adds a web
replica on the shared port without failing a request; scaling the web tier in and out
repeatedly under load fails none either."""

from __future__ import annotations

import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import httpx
import pytest

from tierline.testing.databases import query
from tierline.testing.ports import free_port
from tierline.testing.processes import Proc, tierline_env
from tierline.testing.waiting import wait_for

pytestmark = [pytest.mark.e2e, pytest.mark.slow]


def children(pid: int) -> dict[int, str]:
    """Direct child processes of ``pid``: pid -> command line."""
    found = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            ppid = int(stat[stat.rindex(")") + 2 :].split()[1])
            if ppid == pid:
                found[int(entry.name)] = (
                    (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode().strip()
                )
        except (OSError, ValueError):
            continue  # exited meanwhile
    return found


def tier_pids(pid: int, tier: str) -> set[int]:
    return {p for p, cmd in children(pid).items() if f"-m tierline {tier}" in cmd}


class Poller(threading.Thread):
    """Calls the API back to back until stopped; counts answers and failures."""

    def __init__(self, base: str, *, keep_alive: bool = True) -> None:
        super().__init__(daemon=True)
        self.base = base
        self.keep_alive = keep_alive
        self.stop = threading.Event()
        self.ok = 0
        self.failures: list[str] = []

    def run(self) -> None:
        # Every other request on a new connection: with SO_REUSEPORT the kernel picks a
        # replica per connection, so new web replicas get some of them.
        with httpx.Client(base_url=self.base, timeout=5) as client:
            paths = ["/v1/jobs?limit=5", "/v1/queues", "/healthz", "/v1/cluster"]
            i = 0
            while not self.stop.is_set():
                path = paths[i % len(paths)]
                i += 1
                try:
                    if self.keep_alive and i % 2:
                        reply = client.get(path)
                    else:
                        reply = httpx.get(self.base + path, timeout=5)
                except httpx.HTTPError as exc:
                    self.failures.append(f"{path}: {exc!r}")
                    continue
                if reply.status_code == 200:
                    self.ok += 1
                else:
                    self.failures.append(f"{path}: {reply.status_code} {reply.text[:200]}")


def cluster(base: str) -> dict[str, Any]:
    reply = httpx.get(f"{base}/v1/cluster", timeout=5)
    reply.raise_for_status()
    result: dict[str, Any] = reply.json()
    return result


def alive(snapshot: dict[str, Any], tier: str) -> list[dict[str, Any]]:
    return [r for r in snapshot["replicas"] if r["tier"] == tier and r["alive"]]


def scale(env: dict[str, str], change: str) -> str:
    """`tierline scale CHANGE` against the running `tierline up`; its output."""
    done = subprocess.run(
        [sys.executable, "-m", "tierline", "scale", change],
        env=env,
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_scale_workers_while_up(db_url: str, tmp_path: Path) -> None:
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    env = tierline_env(
        db_url,
        TIERLINE_WEB_PORT=port,
        TIERLINE_DATA_DIR=tmp_path / "data",
        TIERLINE_WORKER_METRICS_PORT=0,
        TIERLINE_WORKER_CONCURRENCY=2,
        TIERLINE_WORKER_SHUTDOWN_GRACE_S=5,
    )
    up = Proc(["up", "--web", "1", "--workers", "1"], env, tmp_path / "up.log")
    poller = Poller(base)
    try:
        wait_for(
            lambda: (
                len(alive(cluster(base), "web")) == 1 and len(alive(cluster(base), "worker")) == 1
            ),
            60,
            "1 web and 1 worker replica alive",
            interval=0.2,
        )
        web_pid = alive(cluster(base), "web")[0]["pid"]
        assert tier_pids(up.pid, "web") == {web_pid}
        assert len(tier_pids(up.pid, "worker")) == 1

        # A backlog the single worker (2 slots) would need a minute for.
        jobs = [{"kind": "sleep", "args": {"seconds": 0.5}} for _ in range(240)]
        httpx.post(f"{base}/v1/jobs/batch", json={"jobs": jobs}, timeout=10).raise_for_status()

        poller.start()
        wait_for(lambda: poller.ok >= 5, 10, "the poller's first answers")
        assert "worker: 1 -> 4 replicas" in scale(env, "worker=4")

        wait_for(lambda: len(tier_pids(up.pid, "worker")) == 4, 30, "4 worker processes")
        wait_for(
            lambda: len(alive(cluster(base), "worker")) == 4,
            60,
            "4 alive worker replicas in /v1/cluster",
            interval=0.2,
        )
        # The new replicas take jobs from the backlog.
        wait_for(
            lambda: (
                query(
                    db_url,
                    "SELECT count(DISTINCT data->>'replica') AS n FROM tierline.job_events "
                    "WHERE type = 'started'",
                )[0]["n"]
                == 4
            ),
            60,
            "jobs started by all 4 worker replicas",
            interval=0.2,
        )
        snapshot = cluster(base)
        assert [r["pid"] for r in alive(snapshot, "web")] == [web_pid]
        assert tier_pids(up.pid, "web") == {web_pid}
        assert poller.failures == []

        # The web tier scales out too, without failing a request, the first replica kept.
        assert "web: 1 -> 2 replicas" in scale(env, "web=2")
        wait_for(
            lambda: len(alive(cluster(base), "web")) == 2,
            60,
            "2 alive web replicas in /v1/cluster",
            interval=0.2,
        )
        checked = poller.ok
        wait_for(lambda: poller.ok >= checked + 20, 30, "more answers after the web scale-up")
        poller.stop.set()
        poller.join(timeout=10)

        assert poller.failures == []
        web_pids = tier_pids(up.pid, "web")
        assert len(web_pids) == 2
        assert web_pid in web_pids
        # The registry is eventually consistent (a heartbeat every second, judged against
        # a 3 s lease): on a loaded machine one snapshot may catch a beat late.
        wait_for(
            lambda: {r["pid"] for r in alive(cluster(base), "web")} == web_pids,
            15,
            "both web processes alive in /v1/cluster",
            interval=0.2,
        )
        assert len(tier_pids(up.pid, "worker")) == 4
    finally:
        poller.stop.set()
        code = up.stop(timeout=60)
    assert code == 0, up.output()[-3000:]
    assert children(up.pid) == {}


def test_scaling_the_web_tier_in_strands_no_connection(db_url: str, tmp_path: Path) -> None:
    """The web replicas share the supervisor's listening socket: a replica that stops
    leaves the connections queued on it to the others (with a socket each, the kernel
    resets those). Clients here open a connection per request, as many do; a request on a
    kept-alive connection that the stopping replica closes is the client's to retry."""
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    env = tierline_env(db_url, TIERLINE_WEB_PORT=port, TIERLINE_DATA_DIR=tmp_path / "data")
    up = Proc(["up", "--web", "3", "--workers", "0"], env, tmp_path / "up.log")
    pollers = [Poller(base, keep_alive=False) for _ in range(8)]
    try:
        wait_for(lambda: len(alive(cluster(base), "web")) == 3, 60, "3 web replicas", interval=0.2)
        for poller in pollers:
            poller.start()
        for n in (1, 3, 1, 3):
            before = sum(p.ok for p in pollers)
            scale(env, f"web={n}")
            wait_for(lambda: len(tier_pids(up.pid, "web")) == n, 30, f"{n} web processes")  # noqa: B023
            wait_for(
                lambda: sum(p.ok for p in pollers) >= before + 200,  # noqa: B023
                30,
                "answers after the change",
            )
        for poller in pollers:
            poller.stop.set()
        for poller in pollers:
            poller.join(timeout=10)
        assert [f for p in pollers for f in p.failures] == []
        assert sum(p.ok for p in pollers) > 800
    finally:
        for poller in pollers:
            poller.stop.set()
        code = up.stop(timeout=60)
    assert code == 0, up.output()[-3000:]
