"""CPU seconds of processes (from ``/proc``) and of the PostgreSQL backends serving one
database, the time they waited for a core (run-queue delay), the host's busy and stolen
share of its cores, and the database's connection count, sampled during a run."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from tierline.testing.databases import query

CLK_TCK = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    """utime + stime of a process (and its reaped children not counted), in seconds."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return 0.0
    fields = stat[stat.rindex(")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def runq_wait_s(pid: int) -> float:
    """Seconds the process's threads were runnable but waited for a core (the second
    field of ``/proc/PID/task/TID/schedstat``): the direct measure of CPU contention."""
    total = 0
    try:
        tasks = list(Path(f"/proc/{pid}/task").iterdir())
    except OSError:
        return 0.0
    for task in tasks:
        try:
            total += int((task / "schedstat").read_text().split()[1])
        except (OSError, IndexError, ValueError):
            continue
    return total / 1e9


@dataclass
class HostCpu:
    """The host's CPU over an interval, from ``/proc/stat``: the busy share of all its
    cores and the share stolen by the hypervisor (a VM's neighbours)."""

    start: list[int] = field(default_factory=list)

    @staticmethod
    def _read() -> list[int]:
        first = Path("/proc/stat").read_text().splitlines()[0].split()
        return [int(x) for x in first[1:9]]  # user nice system idle iowait irq softirq steal

    def begin(self) -> None:
        self.start = self._read()

    def shares(self) -> tuple[float, float]:
        """(busy, steal) as fractions of the interval's CPU time."""
        now = self._read()
        delta = [b - a for a, b in zip(self.start, now, strict=True)]
        total = sum(delta) or 1
        idle = delta[3] + delta[4]
        return (total - idle) / total, delta[7] / total


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
    waited: dict[int, float] = field(default_factory=dict)
    waited_base: dict[int, float] = field(default_factory=dict)
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
        self.base = {pid: cpu_seconds(pid) for pid in pids}
        self.cpu = dict(self.base)
        self.waited_base = {pid: runq_wait_s(pid) for pid in pids}
        self.waited = dict(self.waited_base)
        self.connections = [len(pids)]

    def sample(self) -> None:
        pids = self._pids()
        self.connections.append(len(pids))
        for pid in pids:
            value = cpu_seconds(pid)
            if value:
                self.cpu[pid] = value
            waited = runq_wait_s(pid)
            if waited:
                self.waited[pid] = waited

    def cpu_seconds(self) -> float | None:
        if not self.local:
            return None
        return sum(v - self.base.get(pid, 0.0) for pid, v in self.cpu.items())

    def runq_wait_s(self) -> float | None:
        """Seconds the backends waited for a core, summed."""
        if not self.local:
            return None
        return sum(v - self.waited_base.get(pid, 0.0) for pid, v in self.waited.items())

    def max_connections(self) -> int:
        return max(self.connections, default=0)
