"""A worker's executors: which one runs each handler, under its timeout, and their life.

A handler runs on the event loop when it is ``async def``; a plain function in the
executor it was registered with (``@app.job(executor=...)``), else in
``TIERLINE_WORKER_EXECUTOR``'s, except that one using the worker's pool (``uses_db``)
stays in a thread: a pool connection cannot cross into a child process.

Timeouts: on the loop and in threads the timeout counts from the start of the call;
in the process executor from the moment a child takes the job, so a job that waits
for a free child is not charged for the wait.
"""

from __future__ import annotations

import asyncio
import functools
import importlib
from typing import Any, Literal

from tierline import metrics
from tierline.app import App
from tierline.context import JobContext
from tierline.cores import usable_cores
from tierline.errors import TierlineError
from tierline.executors.process import ProcessPool
from tierline.executors.thread import ThreadExecutor
from tierline.handlers import Handler
from tierline.logs import get_logger
from tierline.memory import resident_bytes
from tierline.settings import Settings, env_name

log = get_logger(__name__)

Where = Literal["loop", "thread", "process"]


def children_for(settings: Settings) -> int:
    """How many child processes: ``TIERLINE_WORKER_CHILDREN``, else the usable cores
    (cgroup-aware); never more than the worker's concurrency."""
    wanted = settings.worker_children or usable_cores().usable
    return max(1, min(wanted, settings.worker_concurrency))


class Executors:
    """The thread executor and the process pool of one worker."""

    def __init__(self, app: App, settings: Settings) -> None:
        self.app = app
        self.settings = settings
        self.threads = ThreadExecutor(min(settings.worker_concurrency, 64))
        max_mb = settings.worker_max_child_memory_mb
        self.processes = ProcessPool(
            settings.app,
            children_for(settings),
            max_jobs=settings.worker_max_jobs_per_child,
            max_rss_bytes=int(max_mb * 1024 * 1024) if max_mb else None,
        )

    def where(self, handler: Handler) -> Where:
        if handler.is_async:
            return "loop"
        if handler.executor is not None:
            return handler.executor
        if handler.uses_db:
            return "thread"
        return self.settings.worker_executor

    def process_kinds(self) -> list[str]:
        return sorted(k for k, h in self.app.handlers.items() if self.where(h) == "process")

    async def start(self, queues: list[str]) -> bool:
        """Start the children now when a handler of a worked queue needs them (else the
        first such job starts them). False (logged) when they cannot start."""
        kinds = self.process_kinds()
        if not kinds:
            return True
        eager = [k for k in kinds if self.app.handlers[k].queue in queues]
        pool = self.processes
        try:
            self._check_app()
            if eager:
                await pool.start()
        except TierlineError as exc:
            log.error("the process executor cannot start", error=str(exc))
            await self.close()
            return False
        if pool.size < self.settings.worker_concurrency and eager:
            log.info(
                "process-executor jobs beyond the children wait in this replica for one; "
                f"set {env_name('worker_concurrency')} to {pool.size} to leave them to "
                "other replicas",
                children=pool.size,
                concurrency=self.settings.worker_concurrency,
                kinds=kinds,
            )
        return True

    def _check_app(self) -> None:
        """Children import ``TIERLINE_APP``; it must be the application run here."""
        module, _, attr = self.settings.app.partition(":")
        try:
            loaded = getattr(importlib.import_module(module), attr)
        except (ImportError, AttributeError) as exc:
            loaded = exc
        if loaded is not self.app:
            raise TierlineError(
                f"the process executor's children import {env_name('app')}="
                f"{self.settings.app!r}, which is not the application this worker runs"
            )

    async def call(
        self, handler: Handler, ctx: JobContext, args: dict[str, Any], timeout: float | None
    ) -> Any:
        """Run the handler where it belongs; ``TimeoutError`` (saying what was done
        about the work) after ``timeout`` seconds."""
        where = self.where(handler)
        if where == "process":
            return await self.processes.run(ctx, args, timeout)
        if where == "thread":
            call = (
                functools.partial(handler.func, ctx, **args)
                if handler.wants_context
                else functools.partial(handler.func, **args)
            )
            return await self.threads.run(ctx.job_id, ctx.kind, call, timeout)
        try:
            async with asyncio.timeout(timeout):
                if handler.wants_context:
                    return await handler.func(ctx, **args)
                return await handler.func(**args)
        except TimeoutError:
            raise TimeoutError(f"job timed out after {timeout:g} s") from None

    def overrun(self, job_id: int) -> asyncio.Future[None] | None:
        """While the thread of a finished attempt of ``job_id`` runs: resolves when it
        returns (the job's slot stays taken until then)."""
        return self.threads.overrun(job_id)

    def stats(self) -> dict[str, Any]:
        metrics.WORKER_RSS.set(resident_bytes() or 0)
        metrics.OVERRUNNING_THREADS.set(len(self.threads.overruns))
        out: dict[str, Any] = {"overrunning_threads": len(self.threads.overruns)}
        if self.processes.started:
            out["children"] = self.processes.stats()
        return out

    async def close(self) -> None:
        await self.processes.close()
        self.threads.close()
