"""The worker tier's run loop: claim jobs into free slots, run them, acknowledge in batches.

One claimer fetches as many due jobs as there are free slots (``FOR UPDATE SKIP LOCKED``,
so replicas never block each other) whenever a NOTIFY, a freed slot or the poll interval
says there may be work. Each job is an asyncio task; its handler runs where
``executors`` says (the loop, a thread, or a child process) under its timeout. Outcomes
go to the ``Flusher``; leases are renewed by the heartbeat. A job's slot is free when its
work has really stopped: a thread that outlives its finished attempt keeps it.
"""

from __future__ import annotations

import asyncio
import random
import time
from dataclasses import dataclass, field
from typing import Any

from psycopg_pool import AsyncConnectionPool

from tierline import attempts, metrics, tracing
from tierline.app import App
from tierline.claims import Claims
from tierline.context import JobContext
from tierline.database import Conn, borrow, describe_error
from tierline.executors.dispatch import Executors
from tierline.flusher import Finish, Flusher
from tierline.lifecycle import SideTasks
from tierline.logs import get_logger
from tierline.maintenance import Maintenance
from tierline.notifications import CANCEL_CHANNEL, JOBS_CHANNEL
from tierline.queries import QUERIES
from tierline.settings import Settings

log = get_logger(__name__)

CLAIM_COALESCE_S = 0.005  # busy workers wait this long to claim several slots at once


@dataclass
class Running:
    job_id: int
    attempt: int
    queue: str
    kind: str
    ctx: JobContext
    cancel: asyncio.Event  # what the handler's ``ctx.cancel_requested`` reads
    task: asyncio.Task[None] | None = None
    cancel_deadline: float | None = None
    done: bool = False
    started: float = field(default_factory=time.monotonic)


class Worker:
    """Runs the jobs of ``queues`` with ``concurrency`` slots over ``pool``."""

    def __init__(
        self, app: App, settings: Settings, pool: AsyncConnectionPool[Conn], owner: str
    ) -> None:
        self.app = app
        self.settings = settings
        self.pool = pool
        self.owner = owner
        self.queues = settings.queues()
        self.concurrency = settings.worker_concurrency
        self.running: dict[int, Running] = {}  # handler still running
        self.held: dict[int, int] = {}  # claimed, not yet acknowledged: id -> attempt
        self.flusher = Flusher(
            pool, owner, max_events=settings.max_events_per_job, on_acked=self._acked
        )
        self.maintenance = Maintenance(settings, pool, app=app)
        self.claims = Claims(pool, owner, self.queues, settings.job_lease_s)
        self.executors = Executors(app, settings)
        self._wake = asyncio.Event()
        self._slot_freed = asyncio.Event()
        self._more = True  # the last claim filled every free slot: more may be waiting
        self.claiming = True
        self.completed = 0
        self._loop = asyncio.get_event_loop()
        for kind in (k for k, h in app.handlers.items() if h.queue not in self.queues):
            log.debug("handler's default queue is not worked here", kind=kind)
        for queue in self.queues:
            kinds = sum(1 for h in app.handlers.values() if h.queue == queue)
            metrics.WORKER_QUEUE_HANDLERS.labels(queue).set(kinds)
            if not kinds:
                log.warning(
                    "no job kind of the application has this queue as its default: the "
                    "worker gets only jobs enqueued to it by name",
                    queue=queue,
                    variable="TIERLINE_WORKER_QUEUES",
                    app=app.name,
                )

    # -- the run loop ---------------------------------------------------------------------------
    async def run(self, stop: asyncio.Event) -> bool:
        """Claim and run jobs until ``stop`` is set, then drain: running jobs get the
        shutdown grace period, the rest are handed back. A loop that ends on its own
        (a crash, logged) sets ``stop`` too; then the answer is False. So do children
        of the process executor that cannot start."""
        if not await self.executors.start(self.queues):
            return False
        loops = SideTasks(stop)
        loops.start(self.flusher.run(), "flusher")
        loops.start(self.renew_forever(), "lease-renewal")
        loops.start(self.maintenance.run(), "maintenance")
        claimer = loops.start(self.claim_forever(), "claimer")
        await stop.wait()
        crashed = bool(loops.crashed)
        await self.drain(self.settings.worker_shutdown_grace_s, claimer)
        await loops.cancel()
        return not crashed

    # -- wake-ups -----------------------------------------------------------------------------
    def wake(self) -> None:
        """There may be due jobs: claim without waiting for the poll interval."""
        self._more = True
        self._wake.set()

    async def listen_connected(self) -> None:
        """The LISTEN connection is (back) up: a notification may have been missed while
        it was down, so look for work now."""
        self.wake()

    def notify(self, channel: str, payload: str) -> None:
        """Called by the replica's LISTEN connection."""
        if channel == JOBS_CHANNEL:
            if payload in self.queues:
                self.wake()
        elif channel == CANCEL_CHANNEL:
            try:
                self.request_cancel(int(payload))
            except ValueError:
                pass

    def request_cancel(self, job_id: int) -> None:
        run = self.running.get(job_id)
        if run is not None and run.cancel_deadline is None:
            log.info("cancel requested", job_id=job_id)
            run.cancel.set()
            run.cancel_deadline = time.monotonic() + self.settings.worker_cancel_grace_s
            self._loop.call_later(self.settings.worker_cancel_grace_s, self._hard_cancel, job_id)

    def _hard_cancel(self, job_id: int) -> None:
        run = self.running.get(job_id)
        if run is not None and run.task is not None and not run.task.done():
            log.warning("job ignored its cancel request; cancelling it", job_id=job_id)
            run.task.cancel("cancel requested")

    # -- claiming -----------------------------------------------------------------------------
    def free_slots(self) -> int:
        return self.concurrency - len(self.running)

    async def claim_forever(self) -> None:
        poll = self.settings.worker_poll_interval_s
        min_batch = max(1, self.concurrency // 4)
        while self.claiming:
            free = self.free_slots()
            if free <= 0:
                self._slot_freed.clear()
                await self._slot_freed.wait()
                continue
            if not self._more:
                try:
                    await asyncio.wait_for(self._wake.wait(), timeout=self.claims.wait_s(poll))
                except TimeoutError:
                    pass
                if not self.claiming:
                    break
            elif free < min_batch and self.running:
                # Busy: let a few more slots free up so that one claim fills several:
                # fewer, larger transactions under load, and no delay when idle.
                await asyncio.sleep(CLAIM_COALESCE_S)
            limit = self.free_slots()
            # This claim answers every wake-up so far. One that comes while it runs (a job
            # committed after the claim's snapshot) stays set and asks for the next claim
            # at once: cleared after the claim, it waited for the poll interval.
            self._wake.clear()
            try:
                got = await self.claim(limit)
            except Exception as exc:
                log.warning("claim failed; retrying", error=describe_error(exc))
                self._more = False
                await asyncio.sleep(min(poll, 1.0) * random.uniform(0.5, 1.5))
                continue
            # A full batch means the queue may hold more; so does a wake-up meanwhile.
            self._more = got >= limit > 0 or self._wake.is_set()

    async def claim(self, limit: int) -> int:
        if limit <= 0:
            return 0
        with tracing.span("tierline.claim", {"tierline.claim.limit": limit}) as span:
            rows = await self._claim_rows(limit)
            tracing.set_attributes(span, **{"tierline.claim.claimed": len(rows)})
        for row in rows:
            self._start(row)
        return len(rows)

    async def _claim_rows(self, limit: int) -> list[dict[str, Any]]:
        # An overrunning thread's job: its retry must not run beside it.
        skip = [r.job_id for r in self.running.values() if r.done]
        return await self.claims.take(limit, skip)  # claims.py: open and limited queues

    def _start(self, row: dict[str, Any]) -> None:
        job_id, attempt, queue = row["id"], row["attempt"], row["queue"]
        metrics.JOB_PICKUP.labels(queue).observe(max(0.0, float(row["pickup_s"] or 0.0)))
        cancel = asyncio.Event()
        ctx = JobContext(
            job_id=job_id,
            kind=row["kind"],
            queue=queue,
            attempt=attempt,
            max_attempts=row["max_attempts"],
            app=self.app,
            emit=self.flusher.event,
            loop=self._loop,
            pool=self.pool,
            cancel=cancel,
        )
        run = Running(job_id, attempt, queue, row["kind"], ctx, cancel)
        self.running[job_id] = run
        self.held[job_id] = attempt
        run.task = self._loop.create_task(self._execute(run, row))

    # -- running ------------------------------------------------------------------------------
    async def _execute(self, run: Running, row: dict[str, Any]) -> None:
        started = time.perf_counter()
        if tracing.active():
            finish = await self._traced_attempt(run, row)
        else:  # the hot path pays one check
            finish = await self._attempt(run, row)
        # (A job that succeeded before it reacted to a cancel request keeps its result:
        # the work is done.)
        finish.duration_s = time.perf_counter() - started
        run.done = True
        self.flusher.finish(finish)
        thread = self.executors.overrun(run.job_id)
        if thread is None:
            self._free(run)
        else:  # Python cannot stop it: the slot is free when it returns
            thread.add_done_callback(lambda _: self._free(run))

    async def _traced_attempt(self, run: Running, row: dict[str, Any]) -> Finish:
        """``_attempt`` in a span, the child of the enqueuer's (``tracing.py``)."""
        attributes = {"tierline.job.id": run.job_id, "tierline.queue": run.queue}
        attributes |= {"tierline.kind": run.kind, "tierline.attempt": run.attempt}
        with tracing.span("tierline.job", attributes, parent=row.get("trace_context")) as span:
            finish = await self._attempt(run, row)
            tracing.set_attributes(span, **{"tierline.outcome": finish.state})
        return finish

    async def _attempt(self, run: Running, row: dict[str, Any]) -> Finish:
        """Run the handler once; what became of the attempt (``attempts.py``)."""
        finish = Finish(run.job_id, run.attempt, run.queue, run.kind, "succeeded")
        try:
            handler = self.app.handler(run.kind)
            timeout = row["timeout_s"] or None
            result = await self.executors.call(handler, run.ctx, row["args"], timeout)
            return attempts.succeeded(finish, result)
        except asyncio.CancelledError as exc:
            if run.cancel_deadline is None:
                raise  # the worker is shutting down: the job is handed back, not finished
            return attempts.raised(finish, exc, row["max_attempts"])
        except Exception as exc:  # a TimeoutError too: the executor's says what was done
            return attempts.raised(finish, exc, row["max_attempts"])

    def _free(self, run: Running) -> None:
        if self.running.get(run.job_id) is run:
            del self.running[run.job_id]
        self._slot_freed.set()

    def _acked(self, finishes: list[Finish]) -> None:
        for f in finishes:
            if self.held.get(f.job_id) == f.attempt:
                del self.held[f.job_id]
        self.completed += len(finishes)
        if any(self.claims.limits(f.queue) for f in finishes):
            self.wake()  # room under a queue's max_running: claim it now

    # -- heartbeat ----------------------------------------------------------------------------
    async def renew_forever(self) -> None:
        while True:
            await asyncio.sleep(min(self.settings.heartbeat_s, self.settings.job_lease_s / 3))
            try:
                await self.renew()
            except Exception as exc:
                log.warning("lease renewal failed", error=describe_error(exc))

    async def renew(self) -> None:
        ids = list(self.held)
        if not ids:
            return
        async with borrow(self.pool) as conn:
            cur = await conn.execute(
                QUERIES["renew_leases"],
                {"ids": ids, "owner": self.owner, "lease_s": self.settings.job_lease_s},
            )
            rows = await cur.fetchall()
        kept = {r["id"] for r in rows}
        for r in rows:
            if r["cancel_requested"]:
                self.request_cancel(r["id"])
        for job_id in ids:
            if job_id not in kept and job_id in self.held and job_id in self.running:
                log.warning(
                    "lost the lease of a running job; it may run again elsewhere", job_id=job_id
                )

    # -- shutdown -----------------------------------------------------------------------------
    async def drain(self, grace_s: float, claimer: asyncio.Task[None] | None = None) -> None:
        """Stop claiming, let running jobs finish within ``grace_s``, hand back the rest."""
        self.claiming = False
        self._wake.set()
        self._slot_freed.set()
        if claimer is not None and not claimer.done():
            # A claim in flight still starts its jobs; wait for it so none is missed below.
            await asyncio.wait([claimer], timeout=max(1.0, self.settings.db_pool_timeout_s))
        tasks = [r.task for r in self.running.values() if r.task is not None]
        if tasks:
            log.info("waiting for running jobs", jobs=len(tasks), grace_s=grace_s)
            _done, pending = await asyncio.wait(tasks, timeout=grace_s)
        else:
            pending = set()
        unfinished = [r for r in self.running.values() if not r.done]
        for task in pending:
            task.cancel()
        if pending:
            await asyncio.wait(pending, timeout=2)
        await self.flusher.drained(timeout=5)
        if unfinished:
            await self.release([r.job_id for r in unfinished])
        await self.executors.close()

    async def release(self, ids: list[int]) -> None:
        try:
            async with self.pool.connection(timeout=5) as conn:
                cur = await conn.execute(QUERIES["release"], {"ids": ids, "owner": self.owner})
                rows = await cur.fetchall()
            log.info("handed running jobs back", jobs=len(rows))
            # A job whose cancel request arrived unseen is finished here, as cancelled:
            # count it like the flusher counts every other final state.
            queues = {r.job_id: r.queue for r in self.running.values()}
            for row in rows:
                if row["state"] == "cancelled" and row["id"] in queues:
                    metrics.JOBS_FINISHED.labels(queues[row["id"]], "cancelled").inc()
        except Exception as exc:
            log.warning(
                "could not hand jobs back; they return when their lease expires",
                error=describe_error(exc),
                jobs=len(ids),
            )

    def stats(self) -> dict[str, Any]:
        busy = len(self.running)
        metrics.WORKER_SLOTS.labels("busy").set(busy)
        metrics.WORKER_SLOTS.labels("free").set(self.concurrency - busy)
        return {
            "slots": {"busy": busy, "free": self.concurrency - busy},
            "queues": self.queues,
            "completed": self.completed,
            "pending_acks": self.flusher.pending(),
            **self.executors.stats(),
        }
