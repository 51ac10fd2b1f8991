"""CPU seconds of processes (from ``/proc``) and of the PostgreSQL backends serving one
database, and that database's connection count, sampled during a run."""

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
        self.base = {pid: cpu_seconds(pid) for pid in pids}
        self.cpu = dict(self.base)
        self.connections = [len(pids)]

    def sample(self) -> None:
        pids = self._pids()
        self.connections.append(len(pids))
        for pid in pids:
            value = cpu_seconds(pid)
            if value:
                self.cpu[pid] = value

    def cpu_seconds(self) -> float | None:
        if not self.local:
            return None
        return sum(v - self.base.get(pid, 0.0) for pid, v in self.cpu.items())

    def max_connections(self) -> int:
        return max(self.connections, default=0)
