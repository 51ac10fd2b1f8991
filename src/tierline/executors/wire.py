"""The messages between a worker and its child processes: JSON objects, each framed by
its length (4 bytes, big-endian), over the child's stdin (to it) and stdout (from it).

JSON, not pickle: arguments and results cross as they are stored, so a result a child
can send is one the database can hold, and a confused peer cannot run code by accident.

Worker to child: ``init`` (the application and ``sys.path``), ``run`` (a job),
``cancel`` (its job was asked to stop), ``stop`` (exit once idle).
Child to worker: ``ready`` or ``fatal`` (after importing the application), ``progress``
and ``log`` (from ``ctx``), then one outcome per job: ``done``, ``error``, ``retry`` or
``cancel``, each with the child's resident size.
"""

from __future__ import annotations

import asyncio
import json
import os
import struct
import threading
from typing import Any

HEADER = struct.Struct(">I")
MAX_FRAME = 256 * 1024 * 1024  # a larger length is a corrupt stream, not a message


class WireError(Exception):
    """The stream between a worker and a child is corrupt."""


def encode(message: dict[str, Any]) -> bytes:
    body = json.dumps(message, allow_nan=False, separators=(",", ":")).encode()
    return HEADER.pack(len(body)) + body


def decode(body: bytes) -> dict[str, Any]:
    message = json.loads(body)
    if not isinstance(message, dict):
        raise WireError("a message is not a JSON object")
    return message


async def read(reader: asyncio.StreamReader) -> dict[str, Any] | None:
    """The next message; None at the end of the stream (the child exited)."""
    try:
        (size,) = HEADER.unpack(await reader.readexactly(HEADER.size))
        if size > MAX_FRAME:
            raise WireError(f"a frame of {size} bytes")
        return decode(await reader.readexactly(size))
    except asyncio.IncompleteReadError:
        return None


class Channel:
    """The child's end: blocking reads from one file descriptor and writes to another.
    Writes take a lock, so handler threads may report progress at the same time."""

    def __init__(self, read_fd: int, write_fd: int) -> None:
        self.read_fd = read_fd
        self.write_fd = write_fd
        self._lock = threading.Lock()

    def send(self, message: dict[str, Any]) -> None:
        data = memoryview(encode(message))
        with self._lock:
            while data:
                data = data[os.write(self.write_fd, data) :]

    def recv(self) -> dict[str, Any] | None:
        """The next message; None at the end of the stream (the worker is gone)."""
        head = self._exactly(HEADER.size)
        if head is None:
            return None
        (size,) = HEADER.unpack(head)
        if size > MAX_FRAME:
            raise WireError(f"a frame of {size} bytes")
        body = self._exactly(size)
        return None if body is None else decode(body)

    def _exactly(self, n: int) -> bytes | None:
        parts: list[bytes] = []
        while n:
            chunk = os.read(self.read_fd, min(n, 1 << 20))
            if not chunk:
                return None
            parts.append(chunk)
            n -= len(chunk)
        return b"".join(parts)
