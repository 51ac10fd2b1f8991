"""The thread executor: plain-function handlers in a pool of threads of the worker.

Python cannot stop a thread. When a job running here times out or is cancelled hard,
the worker records the attempt as finished, but its thread runs on until the function
returns by itself. This executor says so instead of pretending: the thread is an
*overrun*, counted in ``tierline_worker_overrunning_threads`` and logged, and the job's
slot stays taken until the thread really returns, so a replica never runs more than
its concurrency and never starts the job's retry beside it. Jobs that must be stopped
belong in the process executor, whose children can be killed.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from tierline import metrics
from tierline.logs import get_logger

log = get_logger(__name__)


@dataclass
class Overrun:
    """A thread still running a job that has already been finished."""

    job_id: int
    kind: str
    since: float
    returned: asyncio.Future[None]


class ThreadExecutor:
    """A thread pool whose abandoned calls are tracked until they return."""

    def __init__(self, threads: int) -> None:
        self.pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="tierline-job")
        self.overruns: dict[int, Overrun] = {}

    async def run(
        self, job_id: int, kind: str, call: Callable[[], Any], timeout: float | None
    ) -> Any:
        """``call()`` in a thread, within ``timeout`` seconds. If the caller gives up
        (the timeout, a hard cancel, shutdown) while the thread runs, the thread
        becomes an overrun."""
        running = self.pool.submit(call)
        try:
            async with asyncio.timeout(timeout):
                return await asyncio.wrap_future(running)
        except TimeoutError:
            if running.done():  # it had not started: the wait for a thread timed out
                raise TimeoutError(f"job timed out after {timeout:g} s") from None
            self._overrun(job_id, kind, running, "timeout")
            raise TimeoutError(
                f"job timed out after {timeout:g} s; its thread could not be stopped "
                "(Python cannot stop a thread) and keeps its slot until it returns"
            ) from None
        except asyncio.CancelledError:
            if not running.done():  # started, so it could not be cancelled
                self._overrun(job_id, kind, running, "cancelled")
            raise

    def _overrun(self, job_id: int, kind: str, running: Future[Any], why: str) -> None:
        loop = asyncio.get_running_loop()
        overrun = Overrun(job_id, kind, time.monotonic(), loop.create_future())
        self.overruns[job_id] = overrun
        metrics.OVERRUNNING_THREADS.set(len(self.overruns))
        log.warning(
            "job finished but its thread is still running: Python cannot stop a thread; "
            "the job keeps its slot until the thread returns (executor='process' jobs are "
            "killed instead)",
            job_id=job_id,
            kind=kind,
            reason=why,
            overrunning_threads=len(self.overruns),
        )

        def returned(_: Future[Any]) -> None:
            loop.call_soon_threadsafe(self._returned, overrun)

        running.add_done_callback(returned)

    def _returned(self, overrun: Overrun) -> None:
        self.overruns.pop(overrun.job_id, None)
        metrics.OVERRUNNING_THREADS.set(len(self.overruns))
        log.info(
            "an overrunning thread returned; its slot is free",
            job_id=overrun.job_id,
            kind=overrun.kind,
            overran_s=round(time.monotonic() - overrun.since, 3),
        )
        if not overrun.returned.done():
            overrun.returned.set_result(None)

    def overrun(self, job_id: int) -> asyncio.Future[None] | None:
        """Resolves when the thread of ``job_id``'s finished attempt returns; None when
        no thread of it runs."""
        found = self.overruns.get(job_id)
        return None if found is None else found.returned

    def close(self) -> None:
        if self.overruns:
            log.warning(
                "threads of finished jobs are still running; Python cannot stop them",
                jobs=sorted(self.overruns),
            )
        self.pool.shutdown(wait=False, cancel_futures=True)
