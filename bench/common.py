"""What every benchmark shares: a fresh database, real ``tierline`` processes, CPU quotas,
percentiles, database CPU and connection sampling, and the result files.

Each benchmark is one command (``bench/NAME``, a shell wrapper around ``bench/NAME.py``)
that creates a fresh ``tierline_bench_*`` database on ``TIERLINE_BENCH_DATABASE_URL``
(default: the machine's PostgreSQL), starts its own processes with
``TIERLINE_STARTUP_JITTER_S=0``, and writes ``bench/results/NAME.{json,md,png}``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import os
import platform
import random
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import httpx
import psycopg
from psycopg.rows import dict_row

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
DEFAULT_SERVER = "postgresql://postgres@127.0.0.1:5432/postgres"
CGROUP_CPU = Path("/sys/fs/cgroup/cpu")  # cgroup v1 (this machine); v2 is handled too
CGROUP_V2 = Path("/sys/fs/cgroup")
CLK_TCK = os.sysconf("SC_CLK_TCK")


# -- command line ---------------------------------------------------------------------------
def parser(description: str) -> argparse.ArgumentParser:
    """The flags every benchmark has."""
    p = argparse.ArgumentParser(description=description)
    p.add_argument(
        "--smoke", action="store_true", help="Tiny sizes: checks that it works, not speed."
    )
    p.add_argument(
        "--server-url",
        default=os.environ.get("TIERLINE_BENCH_DATABASE_URL", DEFAULT_SERVER),
        help="PostgreSQL server where a fresh database is created and dropped "
        "(env TIERLINE_BENCH_DATABASE_URL).",
    )
    p.add_argument("--out", type=Path, default=RESULTS, help="Folder of the result files.")
    p.add_argument("--no-chart", action="store_true", help="Skip the PNG chart.")
    p.add_argument(
        "--log-level",
        default="info",
        choices=["debug", "info", "warning", "error"],
        help="TIERLINE_LOG_LEVEL of the started processes (default: the product default).",
    )
    return p


def say(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


# -- the database ---------------------------------------------------------------------------
def with_dbname(url: str, name: str) -> str:
    return urlunsplit(urlsplit(url)._replace(path=f"/{name}"))


def query(url: str, sql: str, params: Any = None) -> list[dict[str, Any]]:
    with psycopg.connect(url, autocommit=True, row_factory=dict_row) as conn:
        cur = conn.execute(sql, params)
        return cur.fetchall() if cur.description else []


@contextlib.contextmanager
def fresh_database(server_url: str) -> Iterator[str]:
    """A new, migrated ``tierline_bench_*`` database, dropped afterwards."""
    from tierline import migrations

    name = f"tierline_bench_{uuid.uuid4().hex[:10]}"
    query(server_url, f'CREATE DATABASE "{name}"')
    url = with_dbname(server_url, name)
    try:

        async def migrate() -> None:
            conn = await psycopg.AsyncConnection.connect(url, autocommit=True)
            try:
                await migrations.migrate(conn)  # type: ignore[arg-type]
            finally:
                await conn.close()

        asyncio.run(migrate())
        yield url
    finally:
        query(server_url, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def dbname(url: str) -> str:
    return urlsplit(url).path.lstrip("/")


def server_info(url: str) -> dict[str, Any]:
    row = query(
        url,
        "SELECT current_setting('server_version') AS version, "
        "current_setting('max_connections')::int AS max_connections, "
        "current_setting('shared_buffers') AS shared_buffers, "
        "current_setting('synchronous_commit') AS synchronous_commit",
    )[0]
    return dict(row)


# -- processes ------------------------------------------------------------------------------
def _ports() -> Iterator[int]:
    """Ports below the kernel's ephemeral range, from a per-process random start: no
    outgoing connection (and the suite opens many) can take one between the check here
    and the server's own bind, and two test processes rarely walk the same ports."""
    try:
        low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        low = 32768
    first, last = 10_000, max(low, 12_000)
    port = random.Random(os.getpid() ^ time.time_ns()).randrange(first, last)
    while True:
        yield port
        port = first if port + 1 >= last else port + 1


_PORT_SEQUENCE = _ports()


def free_port() -> int:
    """A port nothing listens on, never handed out before by this process."""
    for port in _PORT_SEQUENCE:
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise AssertionError("unreachable: the port sequence is endless")


def tierline_env(db_url: str, log_level: str = "info", **extra: Any) -> dict[str, str]:
    """The environment of a started process: only benchmark-chosen ``TIERLINE_*`` values."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("TIERLINE_")}
    env.update(
        {
            "TIERLINE_DATABASE_URL": db_url,
            "TIERLINE_STARTUP_JITTER_S": "0",
            "TIERLINE_LOG_FORMAT": "json",
            "TIERLINE_LOG_LEVEL": log_level,
            "PYTHONPATH": os.pathsep.join(
                p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p
            ),
        }
    )
    env.update({k: str(v) for k, v in extra.items()})
    return env


class Proc:
    """A started process whose output goes to a log file; optionally inside a cgroup."""

    def __init__(
        self,
        args: Sequence[str],
        env: dict[str, str],
        log_dir: Path,
        name: str,
        cgroup: Path | None = None,
    ) -> None:
        self.name = name
        self.log_path = log_dir / f"{name}.log"
        self._log = open(self.log_path, "wb")  # noqa: SIM115 - closed in stop()
        preexec = None
        if cgroup is not None:
            procs = cgroup / "cgroup.procs"

            def preexec() -> None:  # join the cgroup before exec: every thread inherits it
                procs.write_text(str(os.getpid()))

        self.proc = subprocess.Popen(
            list(args),
            env=env,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            preexec_fn=preexec,
        )

    @property
    def pid(self) -> int:
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc.poll() is None

    def tail(self, n: int = 3000) -> str:
        self._log.flush()
        return self.log_path.read_text(errors="replace")[-n:]

    def stop(self, timeout: float = 30) -> None:
        """SIGTERM, then SIGKILL after ``timeout``."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
        self._log.close()

    def cpu_seconds(self) -> float:
        return proc_cpu_seconds(self.pid)


def tierline(
    tier: str,
    db_url: str,
    log_dir: Path,
    name: str,
    *,
    log_level: str = "info",
    cgroup: Path | None = None,
    extra_args: Sequence[str] = (),
    **env: Any,
) -> Proc:
    """Start ``tierline web`` or ``tierline worker`` with the given settings."""
    return Proc(
        [sys.executable, "-m", "tierline", tier, *extra_args],
        tierline_env(db_url, log_level, **env),
        log_dir,
        name,
        cgroup,
    )


def wait_ready(url: str, proc: Proc, timeout: float = 60) -> None:
    """Wait until ``url``/readyz answers 200; fail with the process's log otherwise."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not proc.alive():
            raise RuntimeError(f"{proc.name} exited early:\n{proc.tail()}")
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(f"{url}/readyz", timeout=2).status_code == 200:
                return
        time.sleep(0.1)
    raise RuntimeError(f"{proc.name} not ready after {timeout}s:\n{proc.tail()}")


def wait_until(
    predicate: Callable[[], Any], timeout: float, what: str, interval: float = 0.05
) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise RuntimeError(f"timed out after {timeout}s waiting for {what}")


@contextlib.contextmanager
def processes() -> Iterator[list[Proc]]:
    """A list of started processes, all stopped at the end (even on errors)."""
    procs: list[Proc] = []
    try:
        yield procs
    finally:
        for p in procs:
            if p.alive():
                p.proc.send_signal(signal.SIGTERM)
        for p in procs:
            p.stop(timeout=30)


@contextlib.contextmanager
def log_folder(name: str) -> Iterator[Path]:
    """A temporary folder for process logs; kept (and printed) when the run fails."""
    folder = Path(tempfile.mkdtemp(prefix=f"tierline-bench-{name}-"))
    try:
        yield folder
    except BaseException:
        say(f"logs kept in {folder}")
        raise
    else:
        for f in folder.iterdir():
            f.unlink()
        folder.rmdir()


# -- CPU quotas (like a pod's CPU limit) ----------------------------------------------------
class CpuQuota:
    """Child cgroups with a CFS quota; ``available`` is False when they cannot be made."""

    def __init__(self, name: str) -> None:
        self.name = f"tierline-bench-{name}-{os.getpid()}"
        self.made: list[Path] = []
        self.version, self.base = self._detect()
        self.reason = "" if self.base else self._why_not()

    @staticmethod
    def _detect() -> tuple[str, Path | None]:
        if (CGROUP_CPU / "cpu.cfs_quota_us").exists() and os.access(CGROUP_CPU, os.W_OK):
            return "v1", CGROUP_CPU
        if (CGROUP_V2 / "cgroup.controllers").exists() and os.access(CGROUP_V2, os.W_OK):
            controllers = (CGROUP_V2 / "cgroup.subtree_control").read_text()
            if "cpu" in controllers.split():
                return "v2", CGROUP_V2
        return "", None

    @staticmethod
    def _why_not() -> str:
        if os.geteuid() != 0:
            return "not root: cannot create cgroups"
        return "no writable cgroup cpu controller found"

    @property
    def available(self) -> bool:
        return self.base is not None

    def group(self, label: str, cores: float) -> Path | None:
        """A cgroup limited to ``cores`` CPUs (None when quotas are unavailable)."""
        if self.base is None:
            return None
        path = self.base / f"{self.name}-{label}"
        try:
            path.mkdir(exist_ok=True)
            period = 100_000
            quota = max(1000, int(cores * period))
            if self.version == "v1":
                (path / "cpu.cfs_period_us").write_text(str(period))
                (path / "cpu.cfs_quota_us").write_text(str(quota))
            else:
                (path / "cpu.max").write_text(f"{quota} {period}")
        except OSError as exc:
            self.reason = f"cannot configure {path}: {exc}"
            self.base = None
            with contextlib.suppress(OSError):
                path.rmdir()
            return None
        self.made.append(path)
        return path

    @staticmethod
    def throttled_s(path: Path | None) -> float:
        """Seconds the group spent throttled so far."""
        if path is None:
            return 0.0
        with contextlib.suppress(OSError):
            for line in (path / "cpu.stat").read_text().splitlines():
                key, _, value = line.partition(" ")
                if key == "throttled_time":  # v1: nanoseconds
                    return int(value) / 1e9
                if key == "throttled_usec":  # v2
                    return int(value) / 1e6
        return 0.0

    def cleanup(self) -> None:
        for path in reversed(self.made):
            for _ in range(50):  # a group can be removed once its processes have exited
                try:
                    path.rmdir()
                    break
                except OSError:
                    time.sleep(0.1)
        self.made.clear()


# -- CPU and connections of the database ----------------------------------------------------
def proc_cpu_seconds(pid: int) -> float:
    """utime + stime of a process (and its reaped children not counted), in seconds."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return 0.0
    fields = stat[stat.rindex(")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def process_tree_cpu_seconds(pid: int) -> float:
    """CPU of a process and all its threads (threads are included in /proc/PID/stat)."""
    return proc_cpu_seconds(pid)


@dataclass
class DbSampler:
    """CPU seconds of the PostgreSQL backends serving one database, and its connections.

    A backend's CPU is read from ``/proc/PID/stat`` (the server runs on this machine).
    Backends that exit between two samples lose their last interval, and shared server
    processes (WAL writer, checkpointer) are not counted: an approximation from below.
    """

    admin_url: str
    datname: str
    cpu: dict[int, float] = field(default_factory=dict)
    base: dict[int, float] = field(default_factory=dict)
    connections: list[int] = field(default_factory=list)
    local: bool = True

    def _pids(self) -> list[int]:
        rows = query(
            self.admin_url,
            "SELECT pid FROM pg_stat_activity WHERE datname = %s AND pid <> pg_backend_pid()",
            (self.datname,),
        )
        return [int(r["pid"]) for r in rows]

    def start(self) -> None:
        pids = self._pids()
        self.local = bool(pids) and Path(f"/proc/{pids[0]}").exists()
        self.base = {pid: proc_cpu_seconds(pid) for pid in pids}
        self.cpu = dict(self.base)
        self.connections = [len(pids)]

    def sample(self) -> None:
        pids = self._pids()
        self.connections.append(len(pids))
        for pid in pids:
            value = proc_cpu_seconds(pid)
            if value:
                self.cpu[pid] = value

    def cpu_seconds(self) -> float | None:
        if not self.local:
            return None
        return sum(v - self.base.get(pid, 0.0) for pid, v in self.cpu.items())

    def max_connections(self) -> int:
        return max(self.connections, default=0)


# -- statistics -----------------------------------------------------------------------------
def percentile(sorted_values: Sequence[float], p: float) -> float:
    """The ``p``-th percentile (0..100) by nearest rank; NaN when empty."""
    if not sorted_values:
        return math.nan
    k = max(0, min(len(sorted_values) - 1, math.ceil(p / 100 * len(sorted_values)) - 1))
    return float(sorted_values[k])


def summary_ms(values_s: Sequence[float]) -> dict[str, float]:
    s = sorted(values_s)
    out = {f"p{str(p).replace('.', '_')}": percentile(s, p) * 1000 for p in (50, 90, 99, 99.9)}
    out["max"] = (s[-1] * 1000) if s else math.nan
    out["mean"] = (sum(s) / len(s) * 1000) if s else math.nan
    return {k: round(v, 3) for k, v in out.items()}


def median(values: Sequence[float]) -> float:
    s = sorted(values)
    if not s:
        return math.nan
    mid = len(s) // 2
    return s[mid] if len(s) % 2 else (s[mid - 1] + s[mid]) / 2


# -- the machine and the results ------------------------------------------------------------
def load_average() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def machine() -> dict[str, Any]:
    model = ""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    mem = ""
    with contextlib.suppress(OSError):
        mem = Path("/proc/meminfo").read_text().splitlines()[0].split(":", 1)[1].strip()
    return {
        "cpus": os.cpu_count(),
        "cpu_model": model,
        "memory": mem,
        "kernel": platform.release(),
        "python": platform.python_version(),
        "load_average_at_start": load_average(),
    }


def git_commit() -> str:
    try:
        return subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            cwd=ROOT,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return ""


def command_line(name: str) -> str:
    return " ".join([f"bench/{name}", *sys.argv[1:]])


def write_results(
    name: str,
    args: argparse.Namespace,
    data: dict[str, Any],
    markdown: str,
    chart: Callable[[Path], None] | None = None,
) -> None:
    """``NAME.json``, ``NAME.md`` (and ``NAME.png``) under ``--out``."""
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    meta = {
        "benchmark": name,
        "command": command_line(name),
        "smoke": bool(args.smoke),
        "finished_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "commit": git_commit(),
        "load_average_at_end": load_average(),
    }
    doc = {**meta, **data}
    (out / f"{name}.json").write_text(json.dumps(doc, indent=2, default=str) + "\n")
    header = (
        f"<!-- generated by `{meta['command']}` at {meta['finished_at']} "
        f"(commit {meta['commit']}) -->\n\n"
    )
    (out / f"{name}.md").write_text(header + markdown.rstrip() + "\n")
    if chart is not None and not args.no_chart:
        try:
            chart(out / f"{name}.png")
        except ImportError:
            say("matplotlib is not installed (dev extra): no chart")
    say(f"results in {out / name}.json and .md")


def table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A Markdown table; numbers formatted compactly."""

    def fmt(v: Any) -> str:
        if isinstance(v, float):
            if math.isnan(v):
                return "n/a"
            if abs(v) >= 100:
                return f"{v:,.0f}"
            if abs(v) >= 10:
                return f"{v:.1f}"
            return f"{v:.2f}"
        if isinstance(v, int) and not isinstance(v, bool):
            return f"{v:,}"
        return str(v)

    lines = [
        "| " + " | ".join(headers) + " |",
        "|" + "|".join("---" for _ in headers) + "|",
    ]
    lines += ["| " + " | ".join(fmt(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def pyplot() -> Any:
    """matplotlib's pyplot with a file-only backend."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


# -- jobs -----------------------------------------------------------------------------------
HELD_DELAY_S = 30 * 86400.0  # "pre-enqueued": due far in the future until released


@contextlib.asynccontextmanager
async def producer(url: str) -> AsyncIterator[Any]:
    """An ``App`` that knows the benchmark's job kinds and enqueues into ``url``, as a
    separate producer process would; its private pool is closed at the end."""
    from bench.apps import app as bench_app
    from tierline.app import App

    app = App("bench-producer", database_url=url)
    app.handlers.update(bench_app.handlers)
    try:
        yield app
    finally:
        queue = getattr(app, "_queue", None)  # App has no public close (yet)
        if queue is not None:
            await queue.pool.close()


async def seed(
    url: str,
    kind: str,
    args: dict[str, Any],
    n: int,
    *,
    held: bool = False,
    batch: int = 1000,
    queue: str | None = None,
) -> None:
    """Enqueue ``n`` demo jobs with ``App.enqueue_many``; ``held`` ones wait until
    ``release`` makes them due, so workers can be started and ready first."""
    from tierline.jobs import JobRequest

    options: dict[str, Any] = {"delay_s": HELD_DELAY_S} if held else {}
    if queue:
        options["queue"] = queue
    async with producer(url) as app:
        for start in range(0, n, batch):
            count = min(batch, n - start)
            await app.enqueue_many([JobRequest(kind=kind, args=args, **options)] * count)


def release(url: str, queue: str = "default") -> datetime:
    """Make every held job due now and wake the workers; returns the commit's time."""
    rows = query(
        url,
        "WITH u AS (UPDATE tierline.jobs SET run_at = now(), state = 'available' "
        "WHERE state = 'scheduled' AND queue = %(q)s RETURNING 1) "
        "SELECT count(*) AS n, pg_notify('tierline_jobs', %(q)s) IS NULL AS x, "
        "clock_timestamp() AS at FROM u",
        {"q": queue},
    )
    at: datetime = rows[0]["at"]
    return at


def unfinished(url: str, queue: str = "default") -> int:
    """Jobs of ``queue`` not yet finished (cheap: both partial indexes)."""
    rows = query(
        url,
        "SELECT (SELECT count(*) FROM tierline.jobs WHERE queue = %(q)s AND state IN "
        "('scheduled', 'available', 'retrying', 'running')) AS n",
        {"q": queue},
    )
    return int(rows[0]["n"])
