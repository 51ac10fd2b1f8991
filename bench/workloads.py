"""The workloads ``bench/compare`` runs on every system, and the command line of a
system's runner (``bench/compare_tierline.py``, ``bench/compare_peers.py``).

A runner is started once per workload and run, in a fresh database the driver made;
it installs its system's schema, runs the workload, and prints one JSON object on
stdout. Only the standard library is imported here (the peers' runner uses it too).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

WORKLOADS = ("drain", "enqueue_single", "enqueue_batch", "io", "pickup")
IO_SLEEP_S = 0.05


def parser(description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("workload", choices=[*WORKLOADS, "worker"])
    p.add_argument("--url", required=True, help="The fresh database of this run.")
    p.add_argument("--admin-url", required=True, help="The server's admin database.")
    p.add_argument("--jobs", type=int, default=1000)
    p.add_argument("--batch", type=int, default=1000)
    p.add_argument("--procs", type=int, default=1, help="io: worker processes.")
    p.add_argument("--concurrency", type=int, default=16, help="io: jobs per process.")
    p.add_argument("--warmup", type=float, default=3.0, help="io: seconds not counted.")
    p.add_argument("--window", type=float, default=10.0, help="io: seconds counted.")
    p.add_argument("--rate", type=float, default=50.0, help="pickup: jobs per second.")
    p.add_argument("--timeout", type=float, default=300.0)
    p.add_argument("--logs", type=Path, required=True, help="Folder of worker logs.")
    p.add_argument("--mode", default="", help="worker: which workload it serves.")
    return p


def emit(result: dict[str, Any]) -> None:
    json.dump(result, sys.stdout)
    sys.stdout.write("\n")
    sys.stdout.flush()


def percentiles_ms(values: Sequence[float]) -> dict[str, float | None]:
    """p50 / p90 / p99 / max of seconds, in ms (nearest rank)."""
    if not values:
        return {"p50": None, "p90": None, "p99": None, "max": None}
    ordered = sorted(values)

    def rank(q: float) -> float:
        return round(ordered[min(len(ordered) - 1, math.ceil(q * len(ordered)) - 1)] * 1000, 3)

    return {"p50": rank(0.5), "p90": rank(0.9), "p99": rank(0.99), "max": rank(1.0)}


def wait_until(check: Callable[[], bool], timeout: float, what: str, every: float = 0.05) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(every)


class Workers:
    """Worker processes of a run, stopped (SIGTERM, then SIGKILL) at the end."""

    def __init__(self) -> None:
        self.procs: list[subprocess.Popen[bytes]] = []

    def start(self, argv: Sequence[str], env: dict[str, str], log: Path) -> None:
        out = log.open("ab")
        self.procs.append(
            subprocess.Popen(
                list(argv), env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
            )
        )
        out.close()

    def alive(self) -> bool:
        return all(p.poll() is None for p in self.procs)

    def __enter__(self) -> Workers:
        return self

    def __exit__(self, *_: object) -> None:
        for p in self.procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in self.procs:
            try:
                p.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait(timeout=10)


def io_backlog(procs: int, concurrency: int, warmup: float, window: float) -> int:
    """Enough 50 ms jobs that the backlog outlasts warm-up and window (with a margin)."""
    return int(procs * concurrency / IO_SLEEP_S * (warmup + window) * 1.3) + 100
