"""Executors: where a job's handler runs.

- ``async def`` handlers run on the worker's event loop.
- Plain functions run in the **thread** executor (``thread.py``, the default): cheap,
  shares the worker's memory and pool, but one GIL for all of them, and Python cannot
  stop a thread, so a timed-out thread keeps its slot until it returns.
- or in the **process** executor (``process.py``, children in ``child.py``, the
  messages in ``wire.py``): a few reused child processes, one job each at a time; CPU
  uses every core, and a timeout or a hard cancel kills the child.

``dispatch.Executors`` picks one per handler (``@app.job(executor=...)``, else
``TIERLINE_WORKER_EXECUTOR``) and owns both for a worker. This package's ``__init__``
stays light: a child process imports it before anything else.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any, Literal

ExecutorName = Literal["thread", "process"]
EXECUTOR_NAMES: tuple[ExecutorName, ...] = ("thread", "process")


def check_executor(
    kind: str, func: Callable[..., Any], executor: ExecutorName | None, uses_db: bool
) -> None:
    """Refuse, at registration (``@app.job``), what the process executor cannot do."""
    if executor is None:
        return
    if executor not in EXECUTOR_NAMES:
        raise ValueError(f"job {kind!r}: executor must be 'thread' or 'process'")
    if executor != "process":
        return
    if inspect.iscoroutinefunction(func):
        raise ValueError(
            f"job {kind!r}: executor='process' runs plain functions; an async def handler "
            "runs on the worker's event loop"
        )
    if uses_db:
        raise ValueError(
            f"job {kind!r}: uses_db=True cannot go with executor='process': the worker's "
            "pool (ctx.connection()) cannot cross into a child process; use "
            "executor='thread', or connect from the handler itself"
        )
