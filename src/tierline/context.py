"""The context a handler receives: who it is, progress and logs, cancellation."""

from __future__ import annotations

import asyncio
import math
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from psycopg_pool import AsyncConnectionPool

    from tierline.app import App
    from tierline.database import Conn

MAX_MESSAGE = 2000


def progress_data(fraction: float | None, message: str) -> dict[str, Any]:
    """A progress event's data: ``fraction`` checked and clamped to 0..1."""
    if fraction is not None:
        if not isinstance(fraction, int | float) or math.isnan(fraction):
            raise ValueError("fraction must be a number in 0..1")
        fraction = min(1.0, max(0.0, float(fraction)))
    return {"fraction": fraction, "message": str(message)[:MAX_MESSAGE]}


def log_data(message: str) -> dict[str, Any]:
    """A log event's data."""
    return {"message": str(message)[:MAX_MESSAGE]}


class JobContext:
    """Passed as the first argument (``ctx``) to handlers that ask for it."""

    def __init__(
        self,
        *,
        job_id: int,
        kind: str,
        queue: str,
        attempt: int,
        max_attempts: int,
        app: App,
        emit: Callable[[int, str, dict[str, Any]], None],
        loop: asyncio.AbstractEventLoop,
        pool: AsyncConnectionPool[Conn],
        cancel: asyncio.Event,
    ) -> None:
        """``cancel`` is set by the worker when someone asks to cancel the job."""
        self.job_id = job_id
        self.kind = kind
        self.queue = queue
        self.attempt = attempt
        self.max_attempts = max_attempts
        self.app = app
        self._emit = emit
        self._loop = loop
        self._pool = pool
        self._cancel = cancel

    # -- progress and logs (stored as job events, written in batches) ------------------------
    def progress(self, fraction: float | None = None, message: str = "") -> None:
        """Report progress (``fraction`` in 0..1); safe from threads; never blocks."""
        self._send("progress", progress_data(fraction, message))

    def log(self, message: str) -> None:
        """Add a line to the job's event stream."""
        self._send("log", log_data(message))

    def _send(self, type_: str, data: dict[str, Any]) -> None:
        try:
            running = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        if running is self._loop:
            self._emit(self.job_id, type_, data)
        else:  # a plain function in the thread pool
            self._loop.call_soon_threadsafe(self._emit, self.job_id, type_, data)

    # -- cancellation --------------------------------------------------------------------------
    @property
    def cancel_requested(self) -> bool:
        """True once someone asked to cancel this job; stop soon and raise ``Cancel``."""
        return self._cancel.is_set()

    async def wait_cancel_requested(self) -> None:
        await self._cancel.wait()

    # -- database --------------------------------------------------------------------------
    @asynccontextmanager
    async def connection(self) -> AsyncIterator[Conn]:
        """Borrow a connection of the worker's pool (register with ``uses_db=True``)."""
        async with self._pool.connection() as conn:
            yield conn
