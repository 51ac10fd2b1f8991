"""Batched writes of a worker: job events (progress, logs) and finished attempts.

Handlers never wait for the database: their outcomes and events go into buffers that one
task writes in a single transaction per round (events first, so a job's progress is
stored before its final state). While a round is in flight, new items accumulate, so
batches grow with load and latency stays low when idle.
"""

from __future__ import annotations

import asyncio
import functools
from dataclasses import dataclass
from typing import Any

from psycopg.types.json import Jsonb
from psycopg_pool import AsyncConnectionPool

from tierline import logs, metrics, tracing
from tierline.backoff import backoff_delays
from tierline.database import Conn, borrow, describe_error, one_round_trip
from tierline.logs import get_logger
from tierline.queries import QUERIES

log = get_logger(__name__)

COALESCE_S = 0.002
COALESCE_BELOW = 200

OUTCOME = {
    "succeeded": "succeeded",
    "failed": "failed",
    "cancelled": "cancelled",
    "retrying": "retried",
}


@dataclass(slots=True)
class Finish:
    job_id: int
    attempt: int
    queue: str
    kind: str
    state: str  # succeeded | failed | cancelled | retrying
    result: Any = None
    error: Any = None
    delay_s: float = 0.0
    duration_s: float = 0.0


class Flusher:
    def __init__(
        self, pool: AsyncConnectionPool[Conn], owner: str, *, max_events: int, on_acked: Any = None
    ) -> None:
        self.pool = pool
        self.owner = owner
        self.max_events = max_events
        self.events: list[tuple[int, str, dict[str, Any]]] = []
        self.finishes: list[Finish] = []
        self.on_acked = on_acked  # callback(list[Finish]) for the rows really written
        self._wake = asyncio.Event()
        self._idle = asyncio.Event()
        self._idle.set()

    @staticmethod
    @functools.cache
    def _finished(queue: str, outcome: str) -> Any:
        return metrics.JOBS_FINISHED.labels(queue, outcome)  # labels() is slow per job

    @staticmethod
    @functools.cache
    def _duration(queue: str) -> Any:
        return metrics.JOB_DURATION.labels(queue)

    def event(self, job_id: int, type_: str, data: dict[str, Any]) -> None:
        self.events.append((job_id, type_, data))
        self._idle.clear()
        self._wake.set()

    def finish(self, item: Finish) -> None:
        self.finishes.append(item)
        self._idle.clear()
        self._wake.set()

    def pending(self) -> int:
        return len(self.events) + len(self.finishes)

    async def drained(self, timeout: float) -> bool:
        """Wait until everything buffered is written (or ``timeout``)."""
        try:
            await asyncio.wait_for(self._idle.wait(), timeout)
            return True
        except TimeoutError:
            return False

    async def run(self) -> None:
        delays = backoff_delays(base=0.05, cap=5.0)
        while True:
            await self._wake.wait()
            self._wake.clear()
            if not self.pending():
                self._idle.set()
                continue
            if self.pending() < COALESCE_BELOW:
                # A moment for the neighbours of this outcome: one commit for many jobs.
                await asyncio.sleep(COALESCE_S)
            events, self.events = self.events, []
            finishes, self.finishes = self.finishes, []
            try:
                await self._write(events, finishes)
                delays = backoff_delays(base=0.05, cap=5.0)
            except asyncio.CancelledError:
                self.events[:0], self.finishes[:0] = events, finishes
                raise
            except Exception as exc:
                # Put them back in front; they are retried after a pause. Leases keep the
                # jobs ours meanwhile; if they lapse the jobs run again elsewhere.
                self.events[:0], self.finishes[:0] = events, finishes
                delay = next(delays)
                log.warning(
                    "writing job results failed; retrying",
                    error=describe_error(exc),
                    pending=self.pending(),
                    retry_in_s=round(delay, 2),
                )
                await asyncio.sleep(delay)
                self._wake.set()
                continue
            if not self.pending():
                self._idle.set()
            else:
                self._wake.set()

    async def _write(
        self, events: list[tuple[int, str, dict[str, Any]]], finishes: list[Finish]
    ) -> None:
        attributes = {"tierline.ack.events": len(events), "tierline.ack.finished": len(finishes)}
        with tracing.span("tierline.ack", attributes):
            await self._write_batch(events, finishes)

    async def _write_batch(
        self, events: list[tuple[int, str, dict[str, Any]]], finishes: list[Finish]
    ) -> None:
        rows: list[dict[str, Any]] = []
        async with borrow(self.pool) as conn:
            async with one_round_trip(conn):
                if events:
                    await conn.execute(
                        QUERIES["record_events"],
                        {
                            "job_ids": [e[0] for e in events],
                            "types": [e[1] for e in events],
                            "datas": [Jsonb(e[2]) for e in events],
                            "owner": self.owner,
                            "max_events": self.max_events,
                        },
                    )
                if finishes:
                    cur = await conn.execute(
                        QUERIES["finish_batch"],
                        {
                            "ids": [f.job_id for f in finishes],
                            "attempts": [f.attempt for f in finishes],
                            "states": [f.state for f in finishes],
                            "results": [
                                None if f.result is None else Jsonb(f.result) for f in finishes
                            ],
                            "errors": [
                                None if f.error is None else Jsonb(f.error) for f in finishes
                            ],
                            "delays": [f.delay_s for f in finishes],
                            "owner": self.owner,
                        },
                    )
            if finishes:
                rows = await cur.fetchall()
        if finishes:
            written = {r["id"] for r in rows}
            acked = [f for f in finishes if f.job_id in written]
            for f in acked:
                self._finished(f.queue, OUTCOME[f.state]).inc()
                self._duration(f.queue).observe(f.duration_s)
            logs.emit_batch(__name__, [outcome_record(f) for f in acked])
            lost = len(finishes) - len(acked)
            if lost:
                log.warning(
                    "results of jobs no longer held were dropped (their lease ran "
                    "out; they run again elsewhere)",
                    jobs=lost,
                )
            if self.on_acked is not None:
                self.on_acked(finishes)


def outcome_record(f: Finish) -> tuple[str, str, dict[str, Any]]:
    """One log line per acknowledged outcome: INFO, or WARNING when the job failed."""
    fields: dict[str, Any] = {
        "job_id": f.job_id,
        "kind": f.kind,
        "queue": f.queue,
        "attempt": f.attempt,
        "outcome": f.state,
        "duration_s": round(f.duration_s, 4),
    }
    if f.state == "failed":
        return "warning", "job failed", {**fields, "error": (f.error or {}).get("message")}
    if f.state == "retrying":
        fields.update(error=(f.error or {}).get("message"), retry_in_s=round(f.delay_s, 2))
        return "info", "job will retry", fields
    return "info", "job finished", fields
