"""A child process of the process executor: ``python -m tierline.executors.child``.

It imports the application (``TIERLINE_APP``, sent by the worker with its ``sys.path``),
then runs one job at a time in its main thread, for as long as the worker keeps it. A
second thread reads the worker's messages, so a cancel request reaches
``ctx.cancel_requested`` while the handler runs, and the child exits at once when the
worker is gone (its stdin ends): nobody is left to take the result.

The protocol travels on the original stdin and stdout, moved to private descriptors
first; the handler's ``print`` goes to stderr (the worker's log) and reads an empty
stdin, so nothing it does can corrupt the stream.
"""

from __future__ import annotations

import importlib
import json
import os
import queue
import signal
import sys
import threading
import traceback
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from tierline.context import log_data, progress_data
from tierline.errors import TierlineError
from tierline.executors.wire import Channel
from tierline.memory import resident_bytes
from tierline.outcomes import Cancel, Retry

MAX_ERROR_CHARS = 8000


class ChildContext:
    """What a handler's ``ctx`` is in a child process: the same attributes, progress,
    logs and cancellation as ``JobContext``, sent to the worker; no database pool."""

    def __init__(self, channel: Channel, app: Any, job: dict[str, Any]) -> None:
        self._channel = channel
        self.app = app
        self.job_id: int = job["job_id"]
        self.kind: str = job["kind"]
        self.queue: str = job["queue"]
        self.attempt: int = job["attempt"]
        self.max_attempts: int = job["max_attempts"]
        self._cancel = threading.Event()

    def progress(self, fraction: float | None = None, message: str = "") -> None:
        """Report progress (``fraction`` in 0..1); safe from threads."""
        self._send("progress", progress_data(fraction, message))

    def log(self, message: str) -> None:
        """Add a line to the job's event stream."""
        self._send("log", log_data(message))

    def _send(self, op: str, data: dict[str, Any]) -> None:
        self._channel.send({"op": op, "job_id": self.job_id, **data})

    @property
    def cancel_requested(self) -> bool:
        """True once someone asked to cancel this job; stop soon and raise ``Cancel``."""
        return self._cancel.is_set()

    async def wait_cancel_requested(self) -> None:
        raise TierlineError(
            "ctx.wait_cancel_requested() needs the worker's event loop; in the process "
            "executor poll ctx.cancel_requested instead"
        )

    @asynccontextmanager
    async def connection(self) -> AsyncIterator[Any]:
        raise TierlineError(
            "ctx.connection() is not available in the process executor: the worker's pool "
            "cannot cross into a child process; register the job with executor='thread' "
            "and uses_db=True, or connect from the handler itself"
        )
        yield  # pragma: no cover - makes this an async generator


class _Current:
    """The job being run, so a cancel request finds its context."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.ctx: ChildContext | None = None

    def cancel(self, job_id: int) -> None:
        with self.lock:
            if self.ctx is not None and self.ctx.job_id == job_id:
                self.ctx._cancel.set()

    def set(self, ctx: ChildContext | None) -> None:
        with self.lock:
            self.ctx = ctx


def main() -> int:
    channel = Channel(*_take_stdio())
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl+C is the worker's to handle
    init = channel.recv()
    if init is None:
        return 0
    sys.path[:] = init["path"]
    try:
        app = _load(init["app"])
    except BaseException as exc:
        channel.send({"op": "fatal", "message": f"{type(exc).__name__}: {exc}"})
        return 1
    channel.send({"op": "ready", "pid": os.getpid()})
    inbox: queue.SimpleQueue[dict[str, Any] | None] = queue.SimpleQueue()
    current = _Current()
    threading.Thread(
        target=_read_forever, args=(channel, inbox, current), name="tierline-child-reader"
    ).start()
    while (job := inbox.get()) is not None:
        ctx = ChildContext(channel, app, job)
        current.set(ctx)
        outcome = _run(app, ctx, job)
        current.set(None)
        outcome["rss"] = resident_bytes()
        channel.send(outcome)
    return 0


def _take_stdio() -> tuple[int, int]:
    """Private copies of stdin and stdout for the protocol (not inherited by processes
    the handler starts); then stdin reads nothing and stdout writes to stderr."""
    read_fd, write_fd = os.dup(0), os.dup(1)
    devnull = os.open(os.devnull, os.O_RDONLY)
    os.dup2(devnull, 0)
    os.close(devnull)
    os.dup2(2, 1)
    return read_fd, write_fd


def _load(spec: str) -> Any:
    module_name, _, attr = spec.partition(":")
    return getattr(importlib.import_module(module_name), attr)


def _read_forever(
    channel: Channel, inbox: queue.SimpleQueue[dict[str, Any] | None], current: _Current
) -> None:
    while True:
        try:
            message = channel.recv()
        except (OSError, ValueError):
            message = None
        if message is None:
            os._exit(0)  # the worker is gone: nobody wants the result
        op = message.get("op")
        if op == "run":
            inbox.put(message)
        elif op == "cancel":
            current.cancel(int(message["job_id"]))
        elif op == "stop":
            inbox.put(None)
            return


def _run(app: Any, ctx: ChildContext, job: dict[str, Any]) -> dict[str, Any]:
    try:
        handler = app.handler(job["kind"])
        args = job["args"]
        result = handler.func(ctx, **args) if handler.wants_context else handler.func(**args)
        try:
            json.dumps(result, allow_nan=False)
        except (TypeError, ValueError) as exc:
            raise TypeError(f"the handler's result is not JSON-serialisable: {exc}") from None
        return {"op": "done", "result": result}
    except Retry as r:
        return {"op": "retry", "delay": r.delay, "reason": r.reason}
    except Cancel as c:
        return {"op": "cancel", "reason": c.reason}
    except BaseException as exc:  # SystemExit too: the handler failed, the child lives on
        return {
            "op": "error",
            "type": type(exc).__name__,
            "message": str(exc)[:2000],
            "traceback": "".join(traceback.format_exception(exc))[-MAX_ERROR_CHARS:],
        }


if __name__ == "__main__":
    raise SystemExit(main())
