"""The handler clock of ``bench/compare``: every measured job's handler calls ``mark(i)``
at its start, in the worker process; once the expected count is reached the marks are
written to a JSON file that the runner reads.

``BENCH_TALLY_FILE`` names the file and ``BENCH_TALLY_N`` the count (both set by the
runner in the worker's environment); without them ``mark`` does nothing. Only the
standard library is imported: Tierline's workers and the peers' use the same code.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

_marks: list[tuple[int, float]] = []
_path = os.environ.get("BENCH_TALLY_FILE")
_expected = int(os.environ.get("BENCH_TALLY_N", "0") or 0)


def mark(i: int = -1) -> None:
    """Record that job ``i`` (its sequence number in the run, -1: none) started now."""
    if _path is None:
        return
    _marks.append((i, time.time()))
    if len(_marks) == _expected:
        tmp = Path(_path + ".tmp")
        tmp.write_text(json.dumps(_marks))
        tmp.replace(_path)  # whole or absent: the runner polls for it


def read(path: Path) -> list[tuple[int, float]] | None:
    """The marks written to ``path``, or None while not all jobs have run."""
    if not path.exists():
        return None
    data: list[Any] = json.loads(path.read_text())
    return [(int(i), float(t)) for i, t in data]


def span_rate(marks: list[tuple[int, float]]) -> float | None:
    """Jobs per second between the first and the last handler start."""
    if len(marks) < 2:
        return None
    times = [t for _, t in marks]
    span = max(times) - min(times)
    return (len(marks) - 1) / span if span > 0 else None
