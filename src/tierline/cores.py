"""Usable CPU cores: CPU affinity and the cgroup CPU quota (v1 or v2), not the host's count.

Pool sizes are capped by cores (``budget.cpu_capped_pool``): a pod limited to half a CPU
on a 64-core node must size its pool for one core, not 64.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Cores:
    """CPU cores this process may use, and what limited them."""

    usable: int
    host: int
    source: str  # "host", "affinity", "cgroup v2 cpu.max", "cgroup v1 cfs quota"
    quota: float | None = None


def usable_cores(
    cgroup_root: str | os.PathLike[str] = "/sys/fs/cgroup",
    proc_self_cgroup: str | os.PathLike[str] = "/proc/self/cgroup",
    affinity: int | None = None,
    host: int | None = None,
) -> Cores:
    """Cores usable by this process: CPU affinity and the cgroup CPU quota (v1 or v2).

    A pod limited to 500m gets 1, not the node's 64: the quota is rounded up, never down
    to zero. The arguments exist for tests (fixture files instead of ``/sys`` and
    ``/proc``); ``host`` defaults to ``os.cpu_count()``.
    """
    host = host or os.cpu_count() or 1
    if affinity is None:
        try:
            affinity = len(os.sched_getaffinity(0))
        except (AttributeError, OSError):
            affinity = host
    usable, source = affinity, ("affinity" if affinity < host else "host")
    quota = _cgroup_quota(Path(cgroup_root), Path(proc_self_cgroup))
    if quota is not None:
        cpus, kind = quota
        limited = max(1, math.ceil(cpus - 1e-9))
        if limited < usable:
            usable, source = limited, kind
        return Cores(usable=usable, host=host, source=source, quota=cpus)
    return Cores(usable=usable, host=host, source=source)


def _cgroup_paths(proc_self_cgroup: Path) -> dict[str, str]:
    """Map controller ('' for v2) to this process's cgroup path."""
    paths: dict[str, str] = {}
    try:
        text = proc_self_cgroup.read_text()
    except OSError:
        return paths
    for line in text.splitlines():
        parts = line.split(":", 2)
        if len(parts) == 3:
            for controller in parts[1].split(",") if parts[1] else [""]:
                paths[controller] = parts[2]
    return paths


def _candidates(base: Path, rel: str) -> list[Path]:
    """The process's own cgroup folder and its ancestors, deepest first (then the root)."""
    rel_path = Path(rel.lstrip("/")) if rel else Path()
    found = []
    while True:
        found.append(base / rel_path)
        if rel_path == Path() or str(rel_path) == ".":
            break
        rel_path = rel_path.parent
    return found


def _cgroup_quota(root: Path, proc_self_cgroup: Path) -> tuple[float, str] | None:
    """The tightest CPU quota along this process's cgroup path, in CPUs."""
    paths = _cgroup_paths(proc_self_cgroup)
    best: float | None = None
    kind = ""
    # cgroup v2: cpu.max holds "QUOTA PERIOD" or "max PERIOD".
    for folder in _candidates(root, paths.get("", "")):
        try:
            quota_s, period_s = (folder / "cpu.max").read_text().split()[:2]
        except (OSError, ValueError):
            continue
        if quota_s != "max" and float(period_s) > 0:
            cpus = float(quota_s) / float(period_s)
            if best is None or cpus < best:
                best, kind = cpus, "cgroup v2 cpu.max"
    # cgroup v1: cpu.cfs_quota_us (-1: none) and cpu.cfs_period_us.
    for mount in ("cpu,cpuacct", "cpu", "cpuacct,cpu"):
        base = root / mount
        if not base.is_dir():
            continue
        for folder in _candidates(base, paths.get("cpu", "")):
            try:
                quota = int((folder / "cpu.cfs_quota_us").read_text())
                period = int((folder / "cpu.cfs_period_us").read_text())
            except (OSError, ValueError):
                continue
            if quota > 0 and period > 0:
                cpus = quota / period
                if best is None or cpus < best:
                    best, kind = cpus, "cgroup v1 cfs quota"
        break
    return (best, kind) if best is not None else None
