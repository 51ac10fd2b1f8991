"""One LISTEN connection per replica, reconnected with backoff, fanned out in-process.

The connection uses the direct URL (LISTEN does not survive transaction pooling) and is
claimed in the connection budget. After every (re)connect ``on_connect`` runs, so
subscribers catch up from the database on whatever they may have missed.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence

import psycopg

from tierline.database import backoff_delays, connect, describe_error
from tierline.logs import get_logger
from tierline.settings import Settings

log = get_logger(__name__)

Handler = Callable[[str, str], None]


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
