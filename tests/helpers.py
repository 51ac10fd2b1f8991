"""Test helpers: database URLs, waiting with timeouts, real ``tierline`` processes."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import httpx
import psycopg
from bench.common import free_port  # one port picker for the tests and the benchmarks
from psycopg.rows import dict_row

ROOT = Path(__file__).resolve().parent.parent
ARTIFACTS = ROOT / "test-artifacts"
# Debian's Chromium, headless and offline (no background calls out of this machine).
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]


def with_dbname(url: str, name: str) -> str:
    parts = urlsplit(url)
    return urlunsplit(parts._replace(path=f"/{name}"))


@contextlib.contextmanager
def admin_connect(url: str) -> Iterator[psycopg.Connection[Any]]:
    with psycopg.connect(url, autocommit=True, row_factory=dict_row) as conn:
        yield conn


def query(url: str, sql: str, params: Any = None) -> list[dict[str, Any]]:
    with admin_connect(url) as conn:
        cur = conn.execute(sql, params)  # type: ignore[arg-type]
        return cur.fetchall() if cur.description else []


def wait_for(
    predicate: Callable[[], Any], timeout: float, what: str, interval: float = 0.05
) -> Any:
    """Poll ``predicate`` until truthy; fail with ``what`` after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    last_exc: BaseException | None = None
    while time.monotonic() < deadline:
        try:
            value = predicate()
            if value:
                return value
        except Exception as exc:  # keep polling; report the last one on timeout
            last_exc = exc
        time.sleep(interval)
    raise AssertionError(
        f"timed out after {timeout}s waiting for {what}"
        + (f" (last error: {last_exc!r})" if last_exc else "")
    )


class Proc:
    """A real ``tierline`` process with its own environment and log file."""

    def __init__(
        self,
        args: list[str],
        env: dict[str, str],
        log: Path,
        *,
        prefix: Sequence[str] = (),
        cwd: Path | None = None,
    ) -> None:
        """``prefix`` runs before Python (e.g. a shell that joins a cgroup, then execs)."""
        self.args = args
        self.log_path = log
        self.log_file = open(log, "wb")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            [*prefix, sys.executable, "-m", "tierline", *args],
            cwd=cwd,
            env=env,
            stdout=self.log_file,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        self.env = env

    @property
    def pid(self) -> int:
        return self.proc.pid

    def output(self) -> str:
        if not self.log_file.closed:
            self.log_file.flush()
        return self.log_path.read_text(errors="replace")

    def signal(self, sig: int) -> None:
        if self.proc.poll() is None:
            os.kill(self.proc.pid, sig)

    def kill(self) -> None:
        self.signal(signal.SIGKILL)
        self.proc.wait(timeout=10)

    def stop(self, timeout: float = 30) -> int:
        """SIGTERM, as an orchestrator stops it; its exit code."""
        self.signal(signal.SIGTERM)
        return self._wait(timeout)

    def interrupt(self, timeout: float = 60) -> int:
        """Ctrl+C in a terminal: SIGINT to the whole process group; its exit code."""
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGINT)
        return self._wait(timeout)

    def _wait(self, timeout: float) -> int:
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=10)
            raise AssertionError(
                f"{self.args[0]} did not stop within {timeout}s:\n" + self.output()[-3000:]
            ) from None
        finally:
            self.log_file.close()


# Set by conftest when TIERLINE_TEST_PGBOUNCER=1: a PgBouncer (transaction mode) in front
# of the test server. Pools then connect through it; LISTEN and migrations go direct.
POOLER: Any = None


def pooled(db_url: str) -> str:
    """``db_url`` as the pools should reach it: through PgBouncer in PgBouncer mode."""
    return str(POOLER.url(db_url)) if POOLER is not None else db_url


def database_env(db_url: str) -> dict[str, str]:
    """TIERLINE_DATABASE_URL (and the direct URL when a pooler sits in between)."""
    env = {"TIERLINE_DATABASE_URL": pooled(db_url)}
    if env["TIERLINE_DATABASE_URL"] != db_url:
        env["TIERLINE_DATABASE_DIRECT_URL"] = db_url
    return env


# Set by conftest when TIERLINE_TEST_ROLES=1: tier -> least-privilege role (created by
# `tierline.roles` in the template database). ``Cluster`` then starts each tier's
# processes as its role, proving the suite runs without superuser rights.
ROLES: dict[str, str] = {}
ROLE_SERVER = ""  # host:port of the server that has them (tests also start private ones)
ROLE_PASSWORD = "tierline-test-role"


def as_role(db_url: str, role: str, password: str = ROLE_PASSWORD) -> str:
    """``db_url`` with another user and password."""
    parts = urlsplit(db_url)
    host = parts.hostname or "127.0.0.1"
    netloc = f"{role}:{password}@{host}" + (f":{parts.port}" if parts.port else "")
    return urlunsplit(parts._replace(netloc=netloc))


def server_of(url: str) -> str:
    parts = urlsplit(url)
    return f"{parts.hostname}:{parts.port or 5432}"


def tier_url(db_url: str, tier: str) -> str:
    """The URL a tier's processes use: its role's in roles mode, else ``db_url``."""
    if tier in ROLES and server_of(db_url) == ROLE_SERVER:
        return as_role(db_url, ROLES[tier])
    return db_url


def base_env(db_url: str, **extra: Any) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("TIERLINE_")}
    env.update(database_env(db_url))
    env.update(
        {
            "TIERLINE_STARTUP_JITTER_S": "0",
            "TIERLINE_LOG_FORMAT": "json",
            "TIERLINE_HEARTBEAT_S": "1",
            "TIERLINE_REPLICA_LEASE_S": "3",
            "TIERLINE_WORKER_POLL_INTERVAL_S": "0.2",
            "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
        }
    )
    env.update({k: str(v) for k, v in extra.items()})
    return env


class Cluster:
    """Start web and worker processes for one test; everything stops at the end."""

    def __init__(self, db_url: str, tmp: Path, **env: Any) -> None:
        self.db_url = db_url
        self.tmp = tmp
        self.env = env
        self.procs: list[Proc] = []

    def web(self, **env: Any) -> tuple[Proc, str]:
        port = free_port()
        e = base_env(tier_url(self.db_url, "web"), TIERLINE_WEB_PORT=port, **{**self.env, **env})
        proc = Proc(["web"], e, self.tmp / f"web-{port}.log")
        self.procs.append(proc)
        return proc, f"http://127.0.0.1:{port}"

    def worker(self, **env: Any) -> tuple[Proc, str]:
        port = free_port()
        e = base_env(
            tier_url(self.db_url, "worker"),
            TIERLINE_WORKER_METRICS_PORT=port,
            **{**self.env, **env},
        )
        proc = Proc(["worker"], e, self.tmp / f"worker-{port}-{len(self.procs)}.log")
        self.procs.append(proc)
        return proc, f"http://127.0.0.1:{port}"

    def wait_ready(self, url: str, proc: Proc, timeout: float = 30) -> None:
        def ready() -> bool:
            if proc.proc.poll() is not None:
                raise AssertionError(f"process exited early:\n{proc.output()[-3000:]}")
            try:
                return httpx.get(f"{url}/readyz", timeout=2).status_code == 200
            except httpx.HTTPError:
                return False

        try:
            wait_for(ready, timeout, f"{url}/readyz")
        except AssertionError:
            raise AssertionError(f"{url} not ready:\n{proc.output()[-3000:]}") from None

    def close(self) -> None:
        for p in self.procs:
            if p.proc.poll() is None:
                p.signal(signal.SIGKILL)
                with contextlib.suppress(Exception):
                    p.proc.wait(timeout=10)
            with contextlib.suppress(Exception):
                p.log_file.close()


async def plan_with_stale_statistics(
    pool: Any, query: str, params: Any = None, *, before: str | None = None
) -> list[dict[str, Any]]:
    """The ``EXPLAIN ANALYZE`` plan (JSON) of ``query`` on a backlog whose statistics
    promise almost no due job: 5,000 jobs enqueued for later, analysed, then all made due.
    ``before`` runs first in the same (rolled back) transaction."""
    from tests.jobs_app import app
    from tierline.jobs import JobRequest
    from tierline.queue import Queue

    await Queue(app, pool).enqueue_batch(
        [JobRequest(kind="noop", delay_s=3600) for _ in range(5000)]
    )
    async with pool.connection() as conn:
        await conn.execute("ANALYZE tierline.jobs")  # every job in the future
        await conn.execute("UPDATE tierline.jobs SET run_at = now(), state = 'available'")
        async with conn.transaction(force_rollback=True):
            if before:
                await conn.execute(before)
            cur = await conn.execute("EXPLAIN (ANALYZE, FORMAT JSON) " + query, params)
            (row,) = await cur.fetchall()
    plan: list[dict[str, Any]] = row["QUERY PLAN"]
    return plan
