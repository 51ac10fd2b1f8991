"""Resident memory of a process (RSS), for the worker's metrics and child recycling.

Linux reads ``/proc/PID/statm`` (the current resident size). Elsewhere only a process's
own peak is known (``getrusage``), which is what a child reports about itself.
"""

from __future__ import annotations

import os
import resource
import sys

_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def resident_bytes(pid: int | None = None) -> int | None:
    """The resident size of ``pid`` (default: this process) in bytes; None when unknown
    (the process is gone, or the platform cannot tell for another process)."""
    target = "self" if pid is None else str(pid)
    try:
        with open(f"/proc/{target}/statm", "rb") as f:
            return int(f.read().split()[1]) * _PAGE
    except (OSError, IndexError, ValueError):
        pass
    if pid is not None and pid != os.getpid():
        return None
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024  # macOS: bytes; else KiB
