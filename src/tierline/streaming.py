"""Job event streams: each client's buffer (``Subscription``) and the per-replica
``EventHub`` that fills them, fed by one LISTEN connection per web replica.

Why this module is long: the subscriber and the hub call into each other, and the
argument below for why no event is lost or repeated is about both at once.

A subscriber registers with the ``EventHub`` first, then replays what the database holds
after its position (a page at a time, holding a pooled connection only for each query),
then follows live events, dropping any it has already seen. The hub reads new events once
per notification for all subscribers together, so an idle stream holds no connection and
a busy replica makes one query per batch of notifications.

Positions: a job's stream is ordered by its per-job ``seq`` (assigned under the job's
row lock, so commit order equals seq order). The firehose is ordered by ``(xid, id)`` and
only reads rows of transactions older than every running one, so nothing can commit
behind a cursor; an enqueue record's jobs follow it at ``(xid, id, 1..n)``. See
``firehose_after`` in ``sql/queries.sql``.

The wire format (``Event`` frames, ``Last-Event-ID``) is in ``tierline.sse``; what the
notifications say, in ``tierline.notifications``.

Why nothing is lost or repeated: whatever the hub read before a subscriber registered was
committed (or, for the firehose, became visible) before the subscriber's replay began, so
the replay holds it; whatever the hub reads afterwards is pushed to the subscriber, which
drops what its replay already sent. A subscriber buffers at most
``TIERLINE_SSE_BUFFER_EVENTS`` events (and replays a page no larger): when the buffer
fills while its stream waits for the client's socket, the client reads too slowly and
its connection is cut (it may resume); when it fills otherwise (a burst, or a client
catching up on a long history), the buffer is dropped and the stream reads those events
from the database instead: the database is the buffer.

With a read replica (``TIERLINE_DATABASE_READ_URL``), a replay reads its pages from the
replica while the replica answers whole pages, and always reads its last page (the one
that ends the replay) from the primary; stream heads come from the replica unless it has
not replayed the job, or not as far as the client's position. Live events are always
read from the primary (a notification precedes the replica's replay). Why this is
still exact: the replica applies the primary's commits in commit order, so what it
holds of a job's stream (seq order = commit order) or of the firehose (rows of
transactions older than every running one, in ``(xid, id)`` order) is a prefix of what
the primary holds, with no gaps; a replica page is therefore exactly the primary's page
as of an earlier moment. A short page from the replica proves nothing about the end, so
the replay goes on from the same position on the primary, and the primary's last page
begins after the subscriber registered, which is all the argument above needs: every
event the hub read before the registration is in it. A head read on a lagging replica is
at most the true head: the hub then starts its cursor earlier and reads a few events
twice, which the position check drops.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque
from collections.abc import AsyncIterator, Callable
from typing import Any, LiteralString

from psycopg_pool import AsyncConnectionPool

from tierline import metrics
from tierline.coalesce import Coalescer
from tierline.database import Conn, borrow, describe_error, statement_cursor
from tierline.errors import DatabaseUnavailable, TierlineError
from tierline.jobs import FINAL_STATES
from tierline.logs import get_logger
from tierline.notifications import EVENTS_CHANNEL, event_job_ids
from tierline.queries import QUERIES
from tierline.queue import Reads
from tierline.sse import Event

log = get_logger(__name__)

PAGE = 500
# The fallback sweep checks this share of the followed jobs every poll_s / SWEEP_SLICES:
# every job still once per poll_s, and no single sweep holds the notified fetches back for
# long (one query over 1,000 followed jobs took 12 to 26 ms; the p99 of a stream's events
# is set by such stalls).
SWEEP_SLICES = 4
Page = tuple[list[Event], bool]  # a replay page, and whether the read replica answered it


class StreamClosed(TierlineError):
    """The subscriber fell too far behind and was disconnected (it may resume)."""


class Subscription:
    """One client's stream: a bounded buffer the hub fills, and its position.

    ``position`` is how far the subscriber has looked: a seq (job stream) or
    ``(xid, id, sub)`` (firehose, including events its filters skipped). ``head`` is the
    job's last seq when the stream was admitted: where the hub starts reading if no one
    follows the job yet.
    ``on_overflow`` is called when the client is too slow, to cut its connection.
    """

    def __init__(
        self,
        hub: EventHub,
        *,
        job_id: int | None,
        after: Any,
        head: int | None = None,
        queues: frozenset[str] = frozenset(),
        kinds: frozenset[str] = frozenset(),
    ) -> None:
        self.hub = hub
        self.job_id = job_id
        self.position = after
        self.head = head
        self.queues = queues
        self.kinds = kinds
        self.pending: deque[Event] = deque()
        self._ready = asyncio.Event()
        self.sending = False  # suspended at a yield: the client's socket is backed up
        self.missed = False  # the buffer was dropped: read again from the database
        self.overflowed = False
        self.ended = False
        self.registered = False  # with the hub (kept by the hub)
        self.on_overflow: Callable[[], None] | None = None

    def wants(self, ev: Event) -> bool:
        return (not self.queues or ev.queue in self.queues) and (
            not self.kinds or ev.kind in self.kinds
        )

    def _key(self, ev: Event) -> Any:
        return ev.seq if self.job_id is not None else ev.position

    def push(self, ev: Event) -> None:
        """Buffer a live event (called by the hub); never blocks, never grows unbounded.

        A full buffer while the stream waits for the client's socket means the client
        reads too slowly: the stream is cut (the client may resume). A full buffer while
        the stream is idle or replaying is a burst: the buffer is dropped and the stream
        reads the events from the database instead."""
        if self.overflowed or self.ended or self._key(ev) <= self.position:
            return
        if len(self.pending) < self.hub.buffer_size:
            self.pending.append(ev)
        else:
            self.pending.clear()
            if self.sending:
                self.overflowed = True
                metrics.SSE_DROPPED.inc()
                if self.on_overflow is not None:
                    self.on_overflow()
            else:
                self.missed = True
        self._ready.set()

    def close(self) -> None:
        """End the stream after the event being sent (shutdown)."""
        self.ended = True
        self._ready.set()

    async def events(self) -> AsyncIterator[Event]:
        """Replay from the database, then follow live events; ends after a job's final
        event. Raises StreamClosed when the client reads too slowly."""
        while not self.ended:
            self.missed = False
            async for ev in self._replay():
                self.sending = True
                yield ev
                self.sending = False
                # A job's final event has its final state as its type.
                if self.job_id is not None and ev.type in FINAL_STATES:
                    return
                if self.overflowed:
                    raise StreamClosed("client too slow")
            if self.missed:
                continue
            while not self.missed:
                if self.overflowed:
                    raise StreamClosed("client too slow")
                if self.ended:
                    return
                if not self.pending:
                    self._ready.clear()
                    await self._ready.wait()
                    continue
                live = self.pending.popleft()
                key = self._key(live)
                if key <= self.position:
                    continue  # already sent during the replay
                self.position = key
                self.sending = True
                yield live
                self.sending = False
                if self.job_id is not None and live.type in FINAL_STATES:
                    return

    async def _replay(self) -> AsyncIterator[Event]:
        replica = self.hub.reads is not None  # whole pages from the replica, if any
        while not self.ended:
            page, replica = await self.hub.page(self.job_id, self.position, replica=replica)
            for ev in page:
                key = self._key(ev)
                if key <= self.position:
                    continue
                self.position = key
                if self.job_id is not None or self.wants(ev):
                    yield ev
            if len(page) < self.hub.page_size:
                if not replica:
                    return
                replica = False  # only the primary can say where the stream ends


class EventHub:
    """Per-replica fan-out of job events to subscribers. ``reads``: the read replica's
    routing, for replays and heads (live events always come from ``pool``)."""

    def __init__(
        self,
        pool: Callable[[], AsyncConnectionPool[Conn] | None],
        *,
        buffer_size: int = 1000,
        poll_s: float = 1.0,
        reads: Reads | None = None,
    ) -> None:
        self._pool = pool
        self.reads = reads
        self.buffer_size = buffer_size
        # A replaying stream holds one page: no more than a live one may buffer.
        self.page_size = min(PAGE, buffer_size)
        self.poll_s = poll_s
        self.by_job: dict[int, set[Subscription]] = {}
        self.job_cursor: dict[int, int] = {}
        self.firehose: set[Subscription] = set()
        self.fire_cursor: tuple[int, int, int] | None = None
        self._dirty_jobs: set[int] = set()
        self._dirty_all = False
        self._wake = asyncio.Event()
        self.closed = False
        self.fetches = 0
        self._active = 0  # subscribers, kept as a count: checked on every admission
        self._heads: Coalescer[int, tuple[str, int]] = Coalescer(
            lambda ids: self._read_heads(ids, False), 1000, name="stream-lookups"
        )
        self._replica_heads: Coalescer[int, tuple[str, int]] = Coalescer(
            lambda ids: self._read_heads(ids, True), 1000, name="stream-lookups"
        )
        self._pages: Coalescer[tuple[int, int], Page] = Coalescer(
            lambda keys: self._read_pages(keys, False), 200, name="stream-lookups"
        )
        self._replica_pages: Coalescer[tuple[int, int], Page] = Coalescer(
            lambda keys: self._read_pages(keys, True), 200, name="stream-lookups"
        )

    # -- subscribers ------------------------------------------------------------------------
    @property
    def active(self) -> int:
        return self._active

    async def subscribe(self, sub: Subscription) -> None:
        """Register ``sub`` for live events (before its replay starts)."""
        if self.closed:
            sub.close()
            return
        if sub.registered:
            return
        sub.registered = True
        self._active += 1
        metrics.SSE_ACTIVE.set(self._active)
        if sub.job_id is not None:
            self.by_job.setdefault(sub.job_id, set()).add(sub)
            if sub.job_id not in self.job_cursor:
                # Everything up to the head was committed before the subscriber's replay
                # starts, so the hub need not read it again.
                start = sub.position if sub.head is None else max(sub.head, sub.position)
                self.job_cursor[sub.job_id] = start
        else:
            # Registered before the await so the stream cap counts it at once; the hub
            # pushes nothing to the firehose until its cursor is set.
            self.firehose.add(sub)
            if self.fire_cursor is None:
                try:
                    head = await self.firehose_head()
                except BaseException:
                    self.unsubscribe(sub)  # the caller answers an error; no stream follows
                    raise
                if self.fire_cursor is None and self.firehose:
                    self.fire_cursor = head

    def unsubscribe(self, sub: Subscription) -> None:
        """Forget ``sub`` (idempotent)."""
        if not sub.registered:
            return
        sub.registered = False
        self._active -= 1
        metrics.SSE_ACTIVE.set(self._active)
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

    async def page(
        self, job_id: int | None, after: Any, *, replica: bool = False
    ) -> tuple[list[Event], bool]:
        """One page of stored events after ``after``: a job's, or the firehose's; from
        the read replica when ``replica`` and it is usable. Also says whether the
        replica answered (False: the primary did)."""
        if job_id is not None:
            lookups = self._replica_pages if replica and self.reads else self._pages
            return await lookups.get((job_id, after)) or ([], False)
        params = {"xid": str(after[0]), "id": after[1], "sub": after[2], "limit": self.page_size}
        rows, from_replica = await self._fetch_rows(QUERIES["firehose_after"], params, replica)
        return [Event.from_row(r) for r in rows], from_replica

    async def job_head(self, job_id: int, at_least: int = 0) -> tuple[str, int] | None:
        """A job's state and last event seq, or None when there is no such job. From the
        read replica if it has the job with at least ``at_least`` events (the client's
        position), else from the primary."""
        if self.reads is not None:
            head = await self._replica_heads.get(job_id)
            if head is not None and head[1] >= at_least:
                return head
            metrics.READ_FALLBACKS.labels("not_replayed").inc()
        return await self._heads.get(job_id)

    async def _fetch_rows(
        self, query: LiteralString, params: dict[str, Any], replica: bool
    ) -> tuple[list[dict[str, Any]], bool]:
        if replica and self.reads is not None:
            rows, target = await self.reads.fetch(query, params)
            return rows, target == "replica"
        async with self._connection() as conn:
            rows = await (await statement_cursor(conn).execute(query, params)).fetchall()
        return rows, False

    async def _read_heads(self, job_ids: list[int], replica: bool) -> dict[int, tuple[str, int]]:
        rows, _ = await self._fetch_rows(QUERIES["job_stream_heads"], {"ids": job_ids}, replica)
        return {r["id"]: (str(r["state"]), int(r["event_seq"])) for r in rows}

    async def _read_pages(
        self, keys: list[tuple[int, int]], replica: bool
    ) -> dict[tuple[int, int], Page]:
        params = {
            "job_ids": [k[0] for k in keys],
            "afters": [k[1] for k in keys],
            "limit": self.page_size,
        }
        rows, from_replica = await self._fetch_rows(QUERIES["job_event_pages"], params, replica)
        pages: dict[tuple[int, int], Page] = {k: ([], from_replica) for k in keys}
        for row in rows:
            pages[keys[row["ord"] - 1]][0].append(Event.from_row(row))
        return pages

    # -- notifications ----------------------------------------------------------------------
    def notify(self, channel: str, payload: str) -> None:
        """Called for each ``tierline_events`` notification (payload: job ids or ``*``)."""
        if channel != EVENTS_CHANNEL:
            return
        job_ids = event_job_ids(payload)
        if job_ids is None:
            self._dirty_all = True
        else:
            self._dirty_jobs.update(j for j in job_ids if j in self.by_job)
        if self._dirty_jobs or self._dirty_all or self.firehose:
            self._wake.set()

    async def caught_up(self) -> None:
        """After a (re)connect of LISTEN: anything may have been missed; fetch it all."""
        self._dirty_all = True
        self._wake.set()

    async def run(self) -> None:
        """Fetch and distribute until cancelled; polls as a fallback for missed notes."""
        loop = asyncio.get_running_loop()
        slice_s = self.poll_s / SWEEP_SLICES
        checked = loop.time()
        turn = 0
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), timeout=slice_s)
            # Every stream is checked at least once per poll_s, busy or not: the fallback
            # for notifications that never came (LISTEN down, a producer that named only
            # some jobs), which a steady flow of other notifications must not starve. One
            # slice of the followed jobs per slice_s, each slice once per poll_s.
            if loop.time() - checked >= slice_s:
                checked = loop.time()
                self._dirty_jobs.update(j for j in self.by_job if j % SWEEP_SLICES == turn)
                turn = (turn + 1) % SWEEP_SLICES
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
                    await statement_cursor(conn).execute(
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
                    subs = self.by_job.get(ev.job_id)
                    if not subs:
                        continue  # everyone left while the query ran: keep no cursor
                    if ev.seq > self.job_cursor.get(ev.job_id, 0):
                        self.job_cursor[ev.job_id] = ev.seq
                    for sub in list(subs):
                        sub.push(ev)
                if len(rows) >= PAGE * 4:
                    self._dirty_all = more = True
            if self.firehose and self.fire_cursor is not None:
                rows = await (
                    await statement_cursor(conn).execute(
                        QUERIES["firehose_after"],
                        {
                            "xid": str(self.fire_cursor[0]),
                            "id": self.fire_cursor[1],
                            "sub": self.fire_cursor[2],
                            "limit": PAGE,
                        },
                    )
                ).fetchall()
                for row in rows:
                    ev = Event.from_row(row)
                    if self.fire_cursor is None:
                        break  # the last firehose subscriber left while the query ran
                    self.fire_cursor = ev.position
                    for sub in list(self.firehose):
                        if sub.wants(ev):
                            sub.push(ev)
                if len(rows) >= PAGE:
                    more = True
        return more

    async def firehose_head(self) -> tuple[int, int, int]:
        async with self._connection() as conn:
            row = await (await statement_cursor(conn).execute(QUERIES["firehose_head"])).fetchone()
        return (int(row["xid"]), int(row["id"]), int(row["sub"])) if row else (0, 0, 0)

    def _connection(self) -> Any:
        pool = self._pool()
        if pool is None:
            raise DatabaseUnavailable("the replica has no database pool yet")
        return borrow(pool)

    def close(self) -> None:
        """End every stream cleanly (shutdown); later subscribers end at once."""
        self.closed = True
        for sub in [*self.firehose, *(s for subs in self.by_job.values() for s in subs)]:
            sub.close()
