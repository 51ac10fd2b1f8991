"""Starting the benchmarked ``tierline`` processes: in a CPU quota when asked, with logs
kept when a run fails, and all stopped at the end."""

from __future__ import annotations

import contextlib
import signal
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from bench.command import say
from tierline.testing.http import wait_ready as _wait_ready
from tierline.testing.processes import Proc, plain_env


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
    """Start ``tierline web`` or ``tierline worker`` with the given settings (and the
    product's own timings, not the tests' quick ones); its log is ``log_dir/NAME.log``."""
    return Proc(
        [tier, *extra_args],
        plain_env(db_url, TIERLINE_LOG_LEVEL=log_level, **env),
        log_dir / f"{name}.log",
        cgroup=cgroup,
    )


def wait_ready(url: str, proc: Proc, timeout: float = 60) -> None:
    """Wait until ``url``/readyz answers 200; fail with the process's log otherwise."""
    _wait_ready(url, proc, timeout)


@contextlib.contextmanager
def processes() -> Iterator[list[Proc]]:
    """A list of started processes, all stopped at the end (even on errors)."""
    procs: list[Proc] = []
    try:
        yield procs
    finally:
        for p in procs:
            if p.alive():
                p.signal(signal.SIGTERM)  # to all first: they drain side by side
        for p in procs:
            p.close(timeout=30)


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
