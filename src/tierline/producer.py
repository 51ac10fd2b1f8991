"""Where an enqueue runs: on the queue of the tier that runs this process, or, in a
process that runs no tier (a script, a sync web framework, a test), on a small pool of
its own.

There is one enqueue implementation, ``Queue`` (async). Sync callers reach it through
``Producer.call``: on the tier's event loop when they are on another thread of a tier
process (a plain-function handler), else on a private event loop in a daemon thread that
owns the process's small pool, so a script that enqueues a thousand jobs opens one
connection, not a thousand, and every path validates, limits and counts alike.
"""

from __future__ import annotations

import asyncio
import atexit
import threading
from collections.abc import Awaitable, Callable
from typing import TypeVar
from weakref import WeakKeyDictionary

from tierline.enqueue import Registry
from tierline.queue import Queue
from tierline.settings import Settings

T = TypeVar("T")


class Producer:
    """The queues one application enqueues through, per event loop."""

    def __init__(self, registry: Registry, settings: Callable[[], Settings]) -> None:
        """``settings``: where a private pool connects, read when first needed."""
        self.registry = registry
        self._settings = settings
        self._bound: tuple[Queue, asyncio.AbstractEventLoop] | None = None
        self._own: WeakKeyDictionary[asyncio.AbstractEventLoop, Queue] = WeakKeyDictionary()
        self._lock = threading.Lock()
        self._thread_loop: asyncio.AbstractEventLoop | None = None

    def bind(self, queue: Queue) -> None:
        """Use a running tier's queue (and its budgeted pool) from now on. Called on the
        tier's event loop."""
        self._bound = (queue, asyncio.get_running_loop())

    async def queue(self) -> Queue:
        """The queue for the running event loop."""
        loop = asyncio.get_running_loop()
        if self._bound is not None and self._bound[1] is loop:
            return self._bound[0]
        found = self._own.get(loop)
        if found is None:
            settings = self._settings()
            made = await Queue.standalone(
                self.registry, settings.dsn(), max_args_bytes=settings.max_args_bytes
            )
            found = self._own.setdefault(loop, made)
            if found is not made:  # another task of this loop made one meanwhile
                await made.pool.close()
        return found

    def max_args_bytes(self) -> int:
        """The arguments limit of this process (the tier's, else the settings')."""
        if self._bound is not None:
            return self._bound[0].max_args_bytes
        return self._settings().max_args_bytes

    def call(self, make: Callable[[], Awaitable[T]]) -> T:
        """Run ``make()`` to completion for a synchronous caller."""
        bound = self._bound
        if bound is not None and not _runs_on(bound[1]):
            # Another thread of a tier process: the tier's loop and pool do the work.
            return asyncio.run_coroutine_threadsafe(_await(make), bound[1]).result()
        return asyncio.run_coroutine_threadsafe(_await(make), self._private_loop()).result()

    def _private_loop(self) -> asyncio.AbstractEventLoop:
        with self._lock:
            if self._thread_loop is None:
                loop = asyncio.new_event_loop()
                threading.Thread(
                    target=loop.run_forever, name="tierline-enqueue", daemon=True
                ).start()
                atexit.register(_close, self, loop)
                self._thread_loop = loop
            return self._thread_loop


def _runs_on(loop: asyncio.AbstractEventLoop) -> bool:
    try:
        return asyncio.get_running_loop() is loop
    except RuntimeError:
        return False


async def _await(make: Callable[[], Awaitable[T]]) -> T:
    return await make()


def _close(producer: Producer, loop: asyncio.AbstractEventLoop) -> None:
    """At exit: close the private pool (its connections say goodbye to the server)."""
    queue = producer._own.get(loop)
    if queue is not None and loop.is_running():
        try:
            asyncio.run_coroutine_threadsafe(queue.pool.close(), loop).result(timeout=5)
        except Exception:  # exiting anyway; the server notices the closed sockets
            pass
    loop.call_soon_threadsafe(loop.stop)
