"""One shutdown recipe for both tiers (uvicorn's): the first SIGTERM or Ctrl+C stops
intake and drains within a grace period; a second one forces an immediate exit. Also the
pieces of a replica's life that both tiers share: supervised side tasks, the quiet
uvicorn server and the listening socket.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
from collections.abc import Coroutine, Generator
from typing import Any, TypeVar

import uvicorn

from tierline.errors import ListenError
from tierline.logs import get_logger

log = get_logger(__name__)
T = TypeVar("T")


class Shutdown:
    """Installs the signal handlers; ``stop`` is set on the first signal."""

    def __init__(self) -> None:
        self.stop = asyncio.Event()
        self.signals = 0

    def install(self) -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._on_signal, sig)

    def _on_signal(self, sig: int) -> None:
        self.signals += 1
        if self.signals == 1:
            log.info("shutting down; a second signal forces", signal=signal.Signals(sig).name)
            self.stop.set()
        else:
            log.warning("forced exit", signal=signal.Signals(sig).name)
            os._exit(1)


class SideTasks:
    """Background loops, supervised: one that ends on its own (above all one that
    crashes: it is logged) sets ``stop``, because a replica that silently lost, say, its
    heartbeat or its claimer would look alive and do nothing; ``cancel`` ends them all at
    shutdown."""

    def __init__(self, stop: asyncio.Event) -> None:
        self.stop = stop
        self.tasks: list[asyncio.Task[Any]] = []
        self.crashed: list[str] = []

    def start(self, coro: Coroutine[Any, Any, T], name: str) -> asyncio.Task[T]:
        task = asyncio.create_task(coro, name=name)
        task.add_done_callback(self._ended)
        self.tasks.append(task)
        return task

    def _ended(self, task: asyncio.Task[Any]) -> None:
        if task.cancelled():
            return
        exc = task.exception()
        if exc is not None:
            log.error("a task crashed; stopping", task=task.get_name(), error=repr(exc))
            self.crashed.append(task.get_name())
        self.stop.set()

    async def cancel(self) -> None:
        for task in self.tasks:
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)


# How long a stopping server waits, after it stopped accepting, before it closes the
# connections that have not sent a request yet.
FIRST_REQUEST_GRACE_S = 0.5


class QuietServer(uvicorn.Server):
    """uvicorn without its own signal handling (the tier's ``Shutdown`` owns signals), and
    with a kinder shutdown: a connection accepted just before the server stopped accepting
    gets a moment to send its request, which is then served. uvicorn closes at once every
    connection without a request in progress, so a client that had just connected to a
    replica that was beginning to stop saw "server disconnected" instead of an answer."""

    @contextlib.contextmanager
    def capture_signals(self) -> Generator[None, None, None]:
        yield

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        for server in self.servers:
            server.close()  # stop accepting (uvicorn's shutdown repeats it: harmless)
        if self.server_state.connections:
            await asyncio.sleep(FIRST_REQUEST_GRACE_S)
        await super().shutdown(sockets)


def listen_socket(host: str, port: int, *, setting: str, reuse_port: bool = False) -> socket.socket:
    """A bound, listening TCP socket; ``reuse_port`` lets replicas share a port (the
    kernel balances connections between them). A port that cannot be bound raises
    ``ListenError`` naming ``setting``, the variable that chose it."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if reuse_port:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise ListenError(
            f"cannot listen on {host}:{port} ({setting}): {exc.strerror or exc}"
        ) from None
    sock.listen(2048)
    sock.set_inheritable(True)
    return sock


def uvloop_policy() -> None:
    try:
        import uvloop

        asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    except ImportError:  # pragma: no cover - uvloop is a dependency on Linux
        pass
