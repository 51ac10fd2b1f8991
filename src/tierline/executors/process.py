"""The process executor: plain-function handlers in a small pool of child processes.

Each child is a fresh interpreter (``python -m tierline.executors.child``, what
multiprocessing calls *spawn*: nothing of the worker's event loop, pool or threads is
inherited) that imports the application once and then runs one job at a time, for many
jobs. Why not ``multiprocessing``: its ``Process`` objects reap every child from
whichever thread starts the next one (``active_children`` in ``start``), so a kill, a
replacement and a death can race over one exit status, and waiting for an exit without
blocking the loop takes a thread per child; an asyncio subprocess gives an async pipe,
an async wait that reaps, and a kill, with no shared state. ``ProcessPoolExecutor``
cannot kill one child and replace it.

Guarantees: a job past its timeout, or cancelled past its grace, has its child killed
(``SIGKILL`` to the child's process group, so processes the handler started go too) and
the caller learns of it only once the child has exited and been reaped; the worker
records the attempt after that, so its retry can never overlap it. A child that dies
mid-job fails only that attempt. Children are replaced after
``TIERLINE_WORKER_MAX_JOBS_PER_CHILD`` jobs or above
``TIERLINE_WORKER_MAX_CHILD_MEMORY_MB``, between jobs, never during one.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from typing import Any

from tierline import metrics
from tierline.backoff import backoff_delays
from tierline.context import JobContext
from tierline.executors import wire
from tierline.executors.children import (
    Child,
    ChildDied,
    ChildFailed,
    RemoteError,
    outcome_value,
    start_child,
)
from tierline.logs import get_logger
from tierline.memory import resident_bytes

log = get_logger(__name__)

STOP_TIMEOUT_S = 5.0  # a retiring child that does not exit by then is killed
__all__ = ["ChildDied", "ChildFailed", "ProcessPool", "RemoteError"]


class ProcessPool:
    """``size`` children, kept full; ``run`` takes an idle one (or waits for one)."""

    def __init__(
        self,
        app_spec: str,
        size: int,
        *,
        max_jobs: int | None = None,
        max_rss_bytes: int | None = None,
    ) -> None:
        self.app_spec = app_spec
        self.size = size
        self.max_jobs = max_jobs
        self.max_rss_bytes = max_rss_bytes
        self.children: set[Child] = set()
        self.idle: deque[Child] = deque()
        self.waiters: deque[asyncio.Future[Child]] = deque()
        self.spawning = 0
        self.started = False
        self.closing = False
        self._tasks: set[asyncio.Task[Any]] = set()

    # -- the pool's size ----------------------------------------------------------------------
    async def start(self) -> None:
        """Start every child and wait until they are ready; ``ChildFailed`` if the first
        ones cannot start (the application cannot be imported in a child)."""
        self.started = True
        first = await asyncio.gather(
            *(start_child(self.app_spec) for _ in range(self.size)), return_exceptions=True
        )
        for result in first:
            if isinstance(result, BaseException):
                for child in [r for r in first if isinstance(r, Child)]:
                    child.kill()
                raise result
            self._adopt(result)
        log.info("child processes ready", children=self.size, pids=sorted(self.pids()))

    def pids(self) -> list[int]:
        return [c.pid for c in self.children]

    def _fill(self) -> None:
        """Start children until ``size`` are alive or starting."""
        self.started = True
        while not self.closing and len(self.children) + self.spawning < self.size:
            self.spawning += 1
            self._background(self._spawn(), "spawn a child")

    async def _spawn(self) -> None:
        delays = backoff_delays(base=0.5, cap=30.0)
        try:
            while not self.closing:
                try:
                    child = await start_child(self.app_spec)
                except (ChildFailed, OSError) as exc:
                    delay = next(delays)
                    log.error("could not start a child process", error=str(exc), retry_in_s=delay)
                    await asyncio.sleep(delay)
                    continue
                if self.closing:
                    child.send({"op": "stop"})
                    return
                self._adopt(child)
                return
        finally:
            self.spawning -= 1

    def _adopt(self, child: Child) -> None:
        self.children.add(child)
        self._background(self._read(child), f"child {child.pid}")
        self._make_idle(child)

    def _background(self, coro: Any, name: str) -> asyncio.Task[Any]:
        task = asyncio.get_running_loop().create_task(coro, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._ended)
        return task

    def _ended(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("process pool task failed", task=task.get_name(), error=task.exception())

    # -- one child's messages -------------------------------------------------------------------
    async def _read(self, child: Child) -> None:
        """Every message of ``child`` until its stdout ends; then its exit (reaped)."""
        try:
            while (message := await wire.read(child.stdout)) is not None:
                self._on_message(child, message)
        except (wire.WireError, ValueError) as exc:
            log.error("corrupt stream from a child process; killing it", pid=child.pid, error=exc)
            child.kill()
        finally:
            code = await child.proc.wait()  # reaps it: the pid is gone after this
            child.exited.set_result(code)
            self._gone(child, code)

    def _on_message(self, child: Child, message: dict[str, Any]) -> None:
        op = message.get("op")
        ctx = child.ctx
        if op == "progress" and ctx is not None:
            ctx.progress(message.get("fraction"), message.get("message", ""))
        elif op == "log" and ctx is not None:
            ctx.log(message.get("message", ""))
        elif child.outcome is not None and not child.outcome.done():
            child.rss = message.get("rss")
            child.outcome.set_result(message)

    def _gone(self, child: Child, code: int) -> None:
        self.children.discard(child)
        if child in self.idle:
            self.idle.remove(child)
        if not child.expected and not self.closing:
            metrics.CHILDREN_DIED.inc()
            log.warning(
                "a child process died",
                pid=child.pid,
                exit=child.describe_exit(code),
                job_id=child.ctx.job_id if child.ctx else None,
            )
        if child.outcome is not None and not child.outcome.done():
            child.outcome.set_exception(
                ChildDied(
                    f"the child process running the job (pid {child.pid}) "
                    f"{child.describe_exit(code)}"
                )
            )
        self._fill()

    # -- running jobs -----------------------------------------------------------------------
    async def run(self, ctx: JobContext, args: dict[str, Any], timeout: float | None) -> Any:
        """Run ``ctx``'s job in a child; its result, or its exception. On a timeout or
        a cancellation the child is killed, and this returns (raises) only once it has
        exited."""
        if not self.started:
            self._fill()
        child = await self._acquire()
        child.ctx = ctx
        outcome = child.outcome = asyncio.get_running_loop().create_future()
        child.jobs += 1
        child.send(
            {
                "op": "run",
                "job_id": ctx.job_id,
                "kind": ctx.kind,
                "queue": ctx.queue,
                "attempt": ctx.attempt,
                "max_attempts": ctx.max_attempts,
                "args": args,
            }
        )
        forward = asyncio.get_running_loop().create_task(self._forward_cancel(child, ctx))
        try:
            async with asyncio.timeout(timeout):
                message = await asyncio.shield(outcome)
        except TimeoutError:
            await self._kill(child, "timeout")
            raise TimeoutError(
                f"job timed out after {timeout:g} s; its child process (pid {child.pid}) was killed"
            ) from None
        except asyncio.CancelledError:
            await self._kill(child, "cancelled" if ctx.cancel_requested else "shutdown")
            raise
        finally:
            forward.cancel()
            child.ctx = None
            child.outcome = None
            self._release(child)
        return outcome_value(message)

    async def _forward_cancel(self, child: Child, ctx: JobContext) -> None:
        await ctx.wait_cancel_requested()
        child.send({"op": "cancel", "job_id": ctx.job_id})

    async def _acquire(self) -> Child:
        while self.idle:
            child = self.idle.popleft()
            if child.alive:
                return child
        waiter: asyncio.Future[Child] = asyncio.get_running_loop().create_future()
        self.waiters.append(waiter)
        try:
            return await waiter
        except asyncio.CancelledError:
            if waiter.done() and not waiter.cancelled():
                self._make_idle(waiter.result())  # handed over as we were cancelled
            raise

    def _make_idle(self, child: Child) -> None:
        if not child.alive:
            return
        while self.waiters:
            waiter = self.waiters.popleft()
            if not waiter.done():
                waiter.set_result(child)
                return
        self.idle.append(child)

    def _release(self, child: Child) -> None:
        """After a job: back to idle, or retired when it has done enough or grown."""
        if not child.alive:
            return
        reason = self._retire_reason(child)
        if reason is None:
            self._make_idle(child)
            return
        metrics.CHILDREN_RECYCLED.labels(reason).inc()
        log.info("recycling a child process", pid=child.pid, reason=reason, jobs=child.jobs)
        self.children.discard(child)
        self._background(self._retire(child), f"retire child {child.pid}")
        self._fill()

    def _retire_reason(self, child: Child) -> str | None:
        if self.closing:
            return None
        if self.max_jobs is not None and child.jobs >= self.max_jobs:
            return "max_jobs"
        if self.max_rss_bytes is not None and (child.rss or 0) > self.max_rss_bytes:
            return "memory"
        return None

    async def _retire(self, child: Child) -> None:
        child.expected = True
        child.send({"op": "stop"})
        try:
            await asyncio.wait_for(asyncio.shield(child.exited), STOP_TIMEOUT_S)
        except TimeoutError:
            child.kill()
            await asyncio.shield(child.exited)

    async def _kill(self, child: Child, reason: str) -> None:
        """Kill ``child`` and wait until it has exited and been reaped, even if the
        caller is cancelled meanwhile (then re-raise): a retry must not overlap it."""
        if child.outcome is not None:
            child.outcome.cancel()  # no outcome will come; its exit is no death
        child.kill()
        metrics.CHILDREN_KILLED.labels(reason).inc()
        started = time.monotonic()
        interrupted = await _wait_uninterrupted(child.exited)
        log.warning(
            "killed a child process",
            pid=child.pid,
            reason=reason,
            job_id=child.ctx.job_id if child.ctx else None,
            exit_wait_s=round(time.monotonic() - started, 3),
        )
        if interrupted:
            raise asyncio.CancelledError

    # -- shutdown and metrics -----------------------------------------------------------------
    async def close(self) -> None:
        """Stop every child: idle ones exit, busy ones (none after a drain) are killed."""
        self.closing = True
        for waiter in self.waiters:
            waiter.cancel()
        for child in list(self.children):
            child.expected = True
            if child.outcome is None:
                child.send({"op": "stop"})
            else:
                child.kill()
        exits = [c.exited for c in self.children]
        if exits:
            _done, pending = await asyncio.wait(exits, timeout=STOP_TIMEOUT_S)
            for child in [c for c in self.children if c.exited in pending]:
                child.kill()
            await asyncio.wait(exits, timeout=STOP_TIMEOUT_S)
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.wait(list(self._tasks), timeout=STOP_TIMEOUT_S)

    def stats(self) -> dict[str, Any]:
        busy = sum(1 for c in self.children if c.outcome is not None)
        rss = [r for c in self.children if (r := resident_bytes(c.pid) or c.rss) is not None]
        metrics.CHILDREN.labels("busy").set(busy)
        metrics.CHILDREN.labels("idle").set(len(self.children) - busy)
        metrics.CHILDREN_RSS.set(sum(rss))
        metrics.CHILD_MAX_RSS.set(max(rss, default=0))
        return {"busy": busy, "idle": len(self.children) - busy, "size": self.size}


async def _wait_uninterrupted(future: asyncio.Future[Any]) -> bool:
    """Wait for ``future`` through cancellations; True if one was swallowed."""
    interrupted = False
    while not future.done():
        try:
            await asyncio.shield(future)
        except asyncio.CancelledError:
            interrupted = True
    return interrupted
