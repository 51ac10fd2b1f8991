"""CPU quotas like a pod's CPU limit: child cgroups (v1 or v2) with a CFS quota that
started processes join, and the time they spent throttled."""

from __future__ import annotations

import contextlib
import os
import time
from pathlib import Path

CGROUP_CPU = Path("/sys/fs/cgroup/cpu")  # cgroup v1 (this machine); v2 is handled too
CGROUP_V2 = Path("/sys/fs/cgroup")


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
