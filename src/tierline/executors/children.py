"""One child process of the process executor, as the worker sees it: starting it
(``python -m tierline.executors.child``) until it has imported the application, sending
it messages, killing it with what it started, describing its exit, and turning its
outcome messages back into values and exceptions (``Retry``, ``Cancel``, the handler's
error).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sys
from typing import Any

from tierline.context import JobContext
from tierline.errors import TierlineError
from tierline.executors import wire
from tierline.outcomes import Cancel, Retry

START_TIMEOUT_S = 60.0  # importing a large application can take a while


class ChildFailed(TierlineError):
    """A child process could not start or run a job."""


class ChildDied(ChildFailed):
    """The child process running the job exited."""


class RemoteError(TierlineError):
    """A handler raised in a child process; ``type_name`` and ``remote_traceback`` are
    the original exception's, recorded as the attempt's error."""

    def __init__(self, type_name: str, message: str, remote_traceback: str) -> None:
        super().__init__(message)
        self.type_name = type_name
        self.remote_traceback = remote_traceback


class Child:
    """One child process and the job it runs, if any."""

    def __init__(self, proc: asyncio.subprocess.Process) -> None:
        assert proc.stdin is not None and proc.stdout is not None
        self.proc = proc
        self.pid = proc.pid
        self.stdin = proc.stdin
        self.stdout = proc.stdout
        self.jobs = 0
        self.rss: int | None = None
        self.ctx: JobContext | None = None
        self.outcome: asyncio.Future[dict[str, Any]] | None = None
        self.exited: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        self.expected = False  # we killed or stopped it: its exit is no death

    @property
    def alive(self) -> bool:
        return not self.exited.done()

    def send(self, message: dict[str, Any]) -> None:
        if self.alive and not self.stdin.is_closing():
            self.stdin.write(wire.encode(message))

    def kill(self) -> None:
        """SIGKILL to the child's process group (its own session): the child and what it
        started. Waiting for the exit is ``exited``'s."""
        self.expected = True
        try:
            os.killpg(self.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            with contextlib.suppress(ProcessLookupError):
                self.proc.kill()

    def describe_exit(self, code: int) -> str:
        if code < 0:
            try:
                name = signal.Signals(-code).name
            except ValueError:
                name = "unknown"
            hint = " (out of memory?)" if -code == signal.SIGKILL else ""
            return f"was killed by signal {-code} ({name}){hint}"
        return f"exited with code {code}"


async def start_child(app_spec: str) -> Child:
    """A new child that has imported the application (or ``ChildFailed`` saying why)."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "tierline.executors.child",
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        start_new_session=True,  # its own process group: a kill takes its subprocesses too
    )
    child = Child(proc)
    child.send({"op": "init", "app": app_spec, "path": list(sys.path)})
    try:
        hello = await asyncio.wait_for(wire.read(child.stdout), START_TIMEOUT_S)
    except (TimeoutError, wire.WireError, ValueError) as exc:
        child.kill()
        await proc.wait()
        raise ChildFailed(f"a child process did not start: {exc!r}") from None
    except asyncio.CancelledError:  # the pool is closing
        child.kill()
        await asyncio.shield(proc.wait())
        raise
    if hello is None or hello.get("op") != "ready":
        code = await proc.wait()
        why = hello.get("message") if hello else child.describe_exit(code)
        raise ChildFailed(f"a child process could not import {app_spec}: {why}")
    return child


def outcome_value(message: dict[str, Any]) -> Any:
    """A child's outcome message as the worker expects it: the value, or the raise."""
    op = message.get("op")
    if op == "done":
        return message.get("result")
    if op == "retry":
        raise Retry(message.get("delay"), message.get("reason") or "")
    if op == "cancel":
        raise Cancel(message.get("reason") or "")
    if op == "error":
        raise RemoteError(
            str(message.get("type", "Exception")),
            str(message.get("message", "")),
            str(message.get("traceback", "")),
        )
    raise ChildFailed(f"unexpected message from a child process: {op!r}")
