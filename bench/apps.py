"""The benchmark application: the demo app's job kinds plus ``stamp``, ``burn`` and
``noop_sync`` and
``tally``.

Workers of ``bench/pickup`` run it (``TIERLINE_APP=bench.apps:app``); producers use it to
validate what they enqueue.
"""

from __future__ import annotations

import time

from bench.tally import mark
from tierline.app import App
from tierline.demo import app as demo

app = App("bench")
app.handlers.update(demo.handlers)


@app.job()
async def stamp() -> dict[str, float]:
    """Returns the wall-clock time at which the handler started."""
    return {"t": time.time()}


@app.job()
def burn(iterations: int = 1_000_000) -> int:
    """CPU-bound pure Python (holds the GIL throughout): ``bench/cpu``'s job. Runs in
    the executor ``TIERLINE_WORKER_EXECUTOR`` names."""
    total = 0
    for i in range(iterations):
        total += i * i % 7
    return total


@app.job()
def noop_sync() -> None:
    """A plain function that does nothing: the per-job overhead of an executor."""
    return None


@app.job()
async def tally(i: int = -1) -> None:
    """Records its start in the worker (``bench/tally.py``): the handler clock of
    ``bench/compare``."""
    mark(i)
