"""Tierline's NOTIFY protocol, and the one LISTEN connection per replica that receives it.

Channels and payloads (every ``pg_notify`` is in ``sql/queries.sql``, in the statement's
``notified`` CTE, so a notification is sent on commit or not at all):

``tierline_jobs`` (``JOBS_CHANNEL``), payload: a queue name
    A job became available in that queue; a worker that works the queue claims at once.
    Sent by ``enqueue`` and ``retry`` (the job), ``enqueue_batch``, ``release``,
    ``rescue_expired`` and ``promote_due`` (once per distinct queue).
``tierline_cancel`` (``CANCEL_CHANNEL``), payload: a job id
    A cancel was requested for a running job; the worker running it stops it (its lease
    heartbeat, ``renew_leases``, tells it at the latest). Sent by ``cancel`` for a
    running job; a waiting one is cancelled at once, which is a ``tierline_events`` note.
``tierline_events`` (``EVENTS_CHANNEL``), payload: job ids joined by ``,``, or ``*``
    Those jobs have new stored events; the web tier's ``EventHub`` reads them. Sent by
    every statement that writes ``job_events``: ``enqueue``, ``enqueue_batch``,
    ``claim``, ``record_events``, ``finish_batch``, ``release``, ``rescue_expired``,
    ``cancel`` and ``retry``. ``event_job_ids`` parses it.

The ``*`` rule: a statement that wrote events of more than 300 jobs sends ``*`` (``ALL``,
"any job may have new events") instead of naming them. A NOTIFY payload must be shorter
than 8000 bytes, or ``pg_notify`` raises and the statement that wrote the events fails
with it; a job id has at most 19 digits, so 300 ids and their commas take at most 6,000
bytes. Naming only some of the jobs instead would leave the others' streams waiting for
the hub's next poll; ``*`` makes the hub read every job it follows, in the one query it
makes for any batch of notifications.

Notifications are hints, never the only way news travels: they are lost while a LISTEN
connection is down, so workers also claim every poll interval, the hub reads every
stream at least once per poll interval, and after every (re)connect ``on_connect`` runs,
so subscribers catch up from the database on whatever they may have missed.

The LISTEN connection uses the direct URL (LISTEN does not survive transaction pooling)
and is claimed in the connection budget.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence

import psycopg

from tierline.backoff import backoff_delays
from tierline.database import connect, describe_error
from tierline.logs import get_logger
from tierline.settings import Settings

log = get_logger(__name__)

Handler = Callable[[str, str], None]

JOBS_CHANNEL = "tierline_jobs"
CANCEL_CHANNEL = "tierline_cancel"
EVENTS_CHANNEL = "tierline_events"
ALL = "*"  # a tierline_events payload: any job may have new events (see the * rule above)


def event_job_ids(payload: str) -> list[int] | None:
    """The job ids a ``tierline_events`` payload names; None for ``*`` (any job).

    Parts that are not ids are skipped: a payload is a hint, and anyone allowed to
    NOTIFY can send one."""
    if payload == ALL:
        return None
    return [int(part) for part in payload.split(",") if part.isascii() and part.isdigit()]


class Listener:
    """LISTEN on ``channels``; call ``handler(channel, payload)`` for each notification."""

    def __init__(
        self,
        settings: Settings,
        channels: Sequence[str],
        handler: Handler,
        *,
        on_connect: Callable[[], Awaitable[None]] | None = None,
        name: str = "listen",
    ) -> None:
        self.settings = settings
        self.channels = list(channels)
        self.handler = handler
        self.on_connect = on_connect
        self.name = name
        self.connected = asyncio.Event()
        self.conn: psycopg.AsyncConnection[object] | None = None
        self.reconnects = 0
        self.backend_pid: int | None = None

    async def run(self) -> None:
        """Listen until cancelled, reconnecting with jittered backoff."""
        delays = backoff_delays(base=0.05, cap=5.0)
        while True:
            try:
                conn = await connect(
                    self.settings.direct_dsn(),
                    self.settings,
                    attempts=1,
                    application_name=f"tierline-{self.name}",
                )
            except Exception as exc:
                delay = next(delays)
                log.warning(
                    "LISTEN connection failed; retrying",
                    error=describe_error(exc),
                    retry_in_s=round(delay, 2),
                )
                await asyncio.sleep(delay)
                continue
            try:
                self.conn = conn
                self.backend_pid = conn.info.backend_pid
                for channel in self.channels:
                    await conn.execute(f"LISTEN {channel}")
                self.connected.set()
                delays = backoff_delays(base=0.05, cap=5.0)
                if self.on_connect is not None:
                    await self.on_connect()
                async for note in conn.notifies():
                    self.handler(note.channel, note.payload)
            except Exception as exc:
                # psycopg.Error when the server or the network drops us; anything else
                # (a catch-up that failed, an OSError) must not end the task either:
                # without it the replica would silently fall back to polling.
                self.connected.clear()
                self.reconnects += 1
                log.warning("LISTEN connection lost; reconnecting", error=describe_error(exc))
            finally:
                self.connected.clear()
                self.conn = None
                await _close(conn)
            await asyncio.sleep(next(delays))


async def _close(conn: psycopg.AsyncConnection[object]) -> None:
    try:
        await asyncio.wait_for(conn.close(), timeout=2)
    except Exception:  # closing a dead connection may fail; nothing to do about it
        pass
