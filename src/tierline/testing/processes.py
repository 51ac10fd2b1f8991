"""Real ``tierline`` subprocesses: their environment, one ``Proc`` per process (log file,
signals, exit code) and a test's ``Cluster`` of web and worker processes.

Started processes import ``TIERLINE_APP`` through this process's ``PYTHONPATH``.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from tierline.testing.http import wait_ready
from tierline.testing.ports import free_port
from tierline.testing.routing import database_env, tier_url

# Short heartbeats, leases and polls: a test sees a replica come and go within seconds.
QUICK = {
    "TIERLINE_HEARTBEAT_S": "1",
    "TIERLINE_REPLICA_LEASE_S": "3",
    "TIERLINE_WORKER_POLL_INTERVAL_S": "0.2",
}


def plain_env(db_url: str, **settings: Any) -> dict[str, str]:
    """The environment of a started process with the product's own timings: this one's
    without any ``TIERLINE_*`` variable, then the database URL (as the session's route
    reaches it), no start-up jitter, JSON logs, and ``settings``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("TIERLINE_")}
    env.update(database_env(db_url))
    env.update({"TIERLINE_STARTUP_JITTER_S": "0", "TIERLINE_LOG_FORMAT": "json"})
    env.update({k: str(v) for k, v in settings.items()})
    return env


def tierline_env(db_url: str, **settings: Any) -> dict[str, str]:
    """``plain_env`` with the ``QUICK`` timings (``settings`` override them)."""
    return plain_env(db_url, **{**QUICK, **settings})


class Proc:
    """A real ``tierline`` process (``python -m tierline ARGS``) with its own environment
    and log file, in a session of its own (a Ctrl+C of the test run does not reach it).

    ``prefix`` runs before Python (e.g. a shell that joins a cgroup, then execs);
    ``cgroup``: a cgroup folder the process joins before it execs (every thread is in).
    """

    def __init__(
        self,
        args: Sequence[str],
        env: dict[str, str],
        log: Path,
        *,
        prefix: Sequence[str] = (),
        cwd: Path | None = None,
        cgroup: Path | None = None,
    ) -> None:
        self.args = list(args)
        self.env = env
        self.name = log.stem
        self.log_path = log
        self.log_file = open(log, "wb")  # noqa: SIM115 - closed once it has exited
        preexec: Callable[[], None] | None = None
        if cgroup is not None:
            procs = cgroup / "cgroup.procs"

            def preexec() -> None:
                procs.write_text(str(os.getpid()))

        self.proc = subprocess.Popen(
            [*prefix, sys.executable, "-m", "tierline", *self.args],
            cwd=cwd,
            env=env,
            stdout=self.log_file,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            preexec_fn=preexec,
        )

    @property
    def pid(self) -> int:
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc.poll() is None

    def output(self) -> str:
        """Everything it logged so far."""
        if not self.log_file.closed:
            self.log_file.flush()
        return self.log_path.read_text(errors="replace")

    def tail(self, n: int = 3000) -> str:
        """The last ``n`` characters it logged."""
        return self.output()[-n:]

    def signal(self, sig: int) -> None:
        if self.proc.poll() is None:
            os.kill(self.proc.pid, sig)

    def kill(self) -> None:
        self.signal(signal.SIGKILL)
        self.proc.wait(timeout=10)

    def stop(self, timeout: float = 30) -> int:
        """SIGTERM, as an orchestrator stops it; its exit code. Fails (after SIGKILL)
        when it has not exited within ``timeout`` seconds."""
        self.signal(signal.SIGTERM)
        return self._wait(timeout)

    def interrupt(self, timeout: float = 60) -> int:
        """Ctrl+C in a terminal: SIGINT to the whole process group; its exit code."""
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGINT)
        return self._wait(timeout)

    def close(self, timeout: float = 30) -> None:
        """Make sure it is gone, never failing: SIGTERM, SIGKILL after ``timeout``."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
        self.log_file.close()

    def _wait(self, timeout: float) -> int:
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=10)
            raise AssertionError(
                f"{self.args[0]} did not stop within {timeout}s:\n" + self.tail()
            ) from None
        finally:
            self.log_file.close()


class Cluster:
    """Web and worker processes for one test (``QUICK`` timings, each tier as its role in
    roles mode); ``close()`` kills whatever still runs."""

    def __init__(self, db_url: str, tmp: Path, **env: Any) -> None:
        self.db_url = db_url
        self.tmp = tmp
        self.env = env
        self.procs: list[Proc] = []

    def web(self, **env: Any) -> tuple[Proc, str]:
        """A ``tierline web`` on a free port; the process and its base URL."""
        port = free_port()
        e = tierline_env(
            tier_url(self.db_url, "web"), TIERLINE_WEB_PORT=port, **{**self.env, **env}
        )
        proc = Proc(["web"], e, self.tmp / f"web-{port}.log")
        self.procs.append(proc)
        return proc, f"http://127.0.0.1:{port}"

    def worker(self, **env: Any) -> tuple[Proc, str]:
        """A ``tierline worker``; the process and the base URL of its metrics server."""
        port = free_port()
        e = tierline_env(
            tier_url(self.db_url, "worker"),
            TIERLINE_WORKER_METRICS_PORT=port,
            **{**self.env, **env},
        )
        proc = Proc(["worker"], e, self.tmp / f"worker-{port}-{len(self.procs)}.log")
        self.procs.append(proc)
        return proc, f"http://127.0.0.1:{port}"

    def wait_ready(self, url: str, proc: Proc, timeout: float = 30) -> None:
        """Wait until ``url``/readyz answers 200 (``http.wait_ready``)."""
        wait_ready(url, proc, timeout)

    def close(self) -> None:
        for p in self.procs:
            if p.alive():
                p.signal(signal.SIGKILL)
                with contextlib.suppress(Exception):
                    p.proc.wait(timeout=10)
            with contextlib.suppress(Exception):
                p.log_file.close()
