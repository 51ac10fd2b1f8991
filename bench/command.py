"""The command line every benchmark shares: its flags and its progress messages.

Each benchmark is one command (``bench/NAME``, a shell wrapper around ``bench/NAME.py``)
that creates a fresh ``tierline_bench_*`` database on ``TIERLINE_BENCH_DATABASE_URL``
(default: the machine's PostgreSQL), starts its own processes with
``TIERLINE_STARTUP_JITTER_S=0``, and writes ``bench/results/NAME.{json,md,png}``.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
DEFAULT_SERVER = "postgresql://postgres@127.0.0.1:5432/postgres"


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
