"""Job event streams, fanned out in-process from one LISTEN connection per web replica.

A subscriber registers with the ``EventHub`` first, then replays what the database holds
after its position, then follows live events, dropping any it has already seen. The hub
reads new events once per notification for all subscribers together, so an idle stream
holds no connection and a busy replica makes one query per batch of notifications.

Positions: a job's stream is ordered by its per-job ``seq`` (assigned under the job's
row lock, so commit order equals seq order). The firehose is ordered by ``(xid, id)`` and
only reads rows of transactions older than every running one, so nothing can commit
behind a cursor. See ``firehose_after`` in ``sql/queries.sql``.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

from psycopg_pool import AsyncConnectionPool

from tierline import metrics
from tierline.database import Conn, describe_error
from tierline.logs import get_logger
from tierline.queries import QUERIES

log = get_logger(__name__)

FINAL = frozenset({"succeeded", "failed", "cancelled"})
PAGE = 500
_FIREHOSE_ID = re.compile(r"^(\d{1,20})-(\d{1,20})$")


@dataclass(frozen=True, slots=True)
class Event:
    job_id: int
    seq: int
    type: str
    queue: str
    kind: str
    data: Any
    at: str
    xid: int = 0
    id: int = 0

    @classmethod
    def from_row(cls, row: dict[str, Any]) -> Event:
        return cls(
            job_id=row["job_id"],
            seq=row["seq"],
            type=row["type"],
            queue=row["queue"],
            kind=row["kind"],
            data=row["data"],
            at=row["at"].isoformat(),
            xid=int(row.get("xid") or 0),
            id=int(row.get("id") or 0),
        )

    def payload(self) -> dict[str, Any]:
        return {
            "job_id": self.job_id,
            "seq": self.seq,
            "type": self.type,
            "queue": self.queue,
            "kind": self.kind,
            "at": self.at,
            "data": self.data,
        }

    @property
    def firehose_id(self) -> str:
        return f"{self.xid}-{self.id}"


def parse_firehose_id(value: str) -> tuple[int, int]:
    """Parse a firehose ``Last-Event-ID`` (``XID-ID``); ValueError when malformed."""
    m = _FIREHOSE_ID.match(value.strip())
    if not m:
        raise ValueError("expected XID-ID as sent in the stream's id: field")
    return int(m[1]), int(m[2])


class StreamClosed(Exception):
    """The subscriber fell too far behind and was disconnected (it may resume)."""


class Subscription:
    """One client's stream: a bounded buffer the hub fills, and its position."""

    def __init__(
        self,
        hub: EventHub,
        *,
        job_id: int | None,
        after: Any,
        queues: frozenset[str] = frozenset(),
        kinds: frozenset[str] = frozenset(),
    ) -> None:
        self.hub = hub
        self.job_id = job_id
        self.position = after  # seq (job stream) or (xid, id) (firehose)
        self.queues = queues
        self.kinds = kinds
        self.buffer: asyncio.Queue[Event | None] = asyncio.Queue(hub.buffer_size)
        self.overflowed = False

    def wants(self, ev: Event) -> bool:
        return (not self.queues or ev.queue in self.queues) and (
            not self.kinds or ev.kind in self.kinds
        )

    def _key(self, ev: Event) -> Any:
        return ev.seq if self.job_id is not None else (ev.xid, ev.id)

    def push(self, ev: Event) -> None:
        if self.overflowed:
            return
        try:
            self.buffer.put_nowait(ev)
        except asyncio.QueueFull:
            self.overflowed = True
            metrics.SSE_DROPPED.inc()
            # Wake the reader so it notices and ends the stream.
            self.buffer._queue.clear()  # type: ignore[attr-defined]
            self.buffer.put_nowait(None)

    async def events(self) -> AsyncIterator[Event]:
        """Replay from the database, then follow live events; ends after a job's final
        event. Raises StreamClosed when the client reads too slowly."""
        for ev in await self.hub.replay(self):
            if self._key(ev) > self.position:
                self.position = self._key(ev)
                yield ev
                if self.job_id is not None and ev.type in FINAL:
                    return
        while True:
            live = await self.buffer.get()
            if live is None:
                if self.overflowed:
                    raise StreamClosed("client too slow")
                return  # the hub closed (shutdown)
            if self._key(live) <= self.position:
                continue  # already sent during the replay
            self.position = self._key(live)
            yield live
            if self.job_id is not None and live.type in FINAL:
                return


class EventHub:
    """Per-replica fan-out of job events to subscribers."""

    def __init__(
        self,
        pool: Callable[[], AsyncConnectionPool[Conn] | None],
        *,
        buffer_size: int = 1000,
        poll_s: float = 1.0,
    ) -> None:
        self._pool = pool
        self.buffer_size = buffer_size
        self.poll_s = poll_s
        self.by_job: dict[int, set[Subscription]] = {}
        self.job_cursor: dict[int, int] = {}
        self.firehose: set[Subscription] = set()
        self.fire_cursor: tuple[int, int] | None = None
        self._dirty_jobs: set[int] = set()
        self._dirty_all = False
        self._wake = asyncio.Event()
        self.closed = False
        self.fetches = 0

    # -- subscribers ------------------------------------------------------------------------
    @property
    def active(self) -> int:
        return sum(len(s) for s in self.by_job.values()) + len(self.firehose)

    async def subscribe(self, sub: Subscription) -> None:
        if sub.job_id is not None:
            self.by_job.setdefault(sub.job_id, set()).add(sub)
            cursor = self.job_cursor.get(sub.job_id)
            if cursor is None or sub.position < cursor:
                self.job_cursor[sub.job_id] = sub.position
        else:
            if self.fire_cursor is None:
                self.fire_cursor = await self.firehose_head()
            self.firehose.add(sub)
        metrics.SSE_ACTIVE.set(self.active)

    def unsubscribe(self, sub: Subscription) -> None:
        if sub.job_id is not None:
            subs = self.by_job.get(sub.job_id)
            if subs is not None:
                subs.discard(sub)
                if not subs:
                    del self.by_job[sub.job_id]
                    self.job_cursor.pop(sub.job_id, None)
        else:
            self.firehose.discard(sub)
            if not self.firehose:
                self.fire_cursor = None
        metrics.SSE_ACTIVE.set(self.active)

    async def replay(self, sub: Subscription) -> list[Event]:
        """What the database holds after the subscriber's position (paged)."""
        out: list[Event] = []
        pos = sub.position
        async with self._connection() as conn:
            while True:
                if sub.job_id is not None:
                    rows = await (
                        await conn.execute(
                            QUERIES["job_events_after"],
                            {"job_id": sub.job_id, "after": pos, "limit": PAGE},
                        )
                    ).fetchall()
                else:
                    rows = await (
                        await conn.execute(
                            QUERIES["firehose_after"],
                            {"xid": str(pos[0]), "id": pos[1], "limit": PAGE},
                        )
                    ).fetchall()
                page = [Event.from_row(r) for r in rows]
                out.extend(e for e in page if sub.wants(e))
                if len(page) < PAGE:
                    return out
                last = page[-1]
                pos = last.seq if sub.job_id is not None else (last.xid, last.id)

    # -- notifications ----------------------------------------------------------------------
    def notify(self, channel: str, payload: str) -> None:
        """Called for each ``tierline_events`` notification (payload: job ids or ``*``)."""
        if channel != "tierline_events":
            return
        if payload == "*":
            self._dirty_all = True
        else:
            for part in payload.split(","):
                if part.isdigit():
                    job_id = int(part)
                    if job_id in self.by_job:
                        self._dirty_jobs.add(job_id)
        if self._dirty_jobs or self._dirty_all or self.firehose:
            self._wake.set()

    async def caught_up(self) -> None:
        """After a (re)connect of LISTEN: anything may have been missed; fetch it all."""
        self._dirty_all = True
        self._wake.set()

    async def run(self) -> None:
        """Fetch and distribute until cancelled; polls as a fallback for missed notes."""
        while True:
            try:
                await asyncio.wait_for(self._wake.wait(), timeout=self.poll_s)
            except TimeoutError:
                self._dirty_all = bool(self.by_job)
            self._wake.clear()
            try:
                more = await self._fetch()
            except Exception as exc:
                log.warning("event fetch failed; retrying", error=describe_error(exc))
                self._dirty_all = True
                await asyncio.sleep(0.2)
                continue
            if more:
                self._wake.set()

    async def _fetch(self) -> bool:
        jobs = (
            list(self.by_job)
            if self._dirty_all
            else [j for j in self._dirty_jobs if j in self.by_job]
        )
        self._dirty_all = False
        self._dirty_jobs.clear()
        more = False
        if not jobs and not self.firehose:
            return False
        self.fetches += 1
        async with self._connection() as conn:
            if jobs:
                rows = await (
                    await conn.execute(
                        QUERIES["jobs_events_after"],
                        {
                            "job_ids": jobs,
                            "afters": [self.job_cursor.get(j, 0) for j in jobs],
                            "limit": PAGE * 4,
                        },
                    )
                ).fetchall()
                for row in rows:
                    ev = Event.from_row(row)
                    if ev.seq > self.job_cursor.get(ev.job_id, 0):
                        self.job_cursor[ev.job_id] = ev.seq
                    for sub in list(self.by_job.get(ev.job_id, ())):
                        sub.push(ev)
                if len(rows) >= PAGE * 4:
                    self._dirty_all = more = True
            if self.firehose and self.fire_cursor is not None:
                rows = await (
                    await conn.execute(
                        QUERIES["firehose_after"],
                        {"xid": str(self.fire_cursor[0]), "id": self.fire_cursor[1], "limit": PAGE},
                    )
                ).fetchall()
                for row in rows:
                    ev = Event.from_row(row)
                    self.fire_cursor = (ev.xid, ev.id)
                    for sub in list(self.firehose):
                        if sub.wants(ev):
                            sub.push(ev)
                if len(rows) >= PAGE:
                    more = True
        return more

    async def firehose_head(self) -> tuple[int, int]:
        async with self._connection() as conn:
            row = await (await conn.execute(QUERIES["firehose_head"])).fetchone()
        return (int(row["xid"]), int(row["id"])) if row else (0, 0)

    def _connection(self) -> Any:
        pool = self._pool()
        if pool is None:
            raise RuntimeError("the replica has no database pool yet")
        return pool.connection()

    def close(self) -> None:
        """End every stream cleanly (shutdown)."""
        self.closed = True
        for sub in [*self.firehose, *(s for subs in self.by_job.values() for s in subs)]:
            try:
                sub.buffer.put_nowait(None)
            except asyncio.QueueFull:
                sub.buffer._queue.clear()  # type: ignore[attr-defined]
                sub.buffer.put_nowait(None)
