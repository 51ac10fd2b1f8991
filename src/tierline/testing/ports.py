"""Free local ports for the servers a test or a benchmark starts."""

from __future__ import annotations

import os
import random
import socket
import time
from collections.abc import Iterator
from pathlib import Path


def _ports() -> Iterator[int]:
    """Ports below the kernel's ephemeral range, from a per-process random start: no
    outgoing connection (and the suite opens many) can take one between the check here
    and the server's own bind, and two test processes rarely walk the same ports."""
    try:
        low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        low = 32768
    first, last = 10_000, max(low, 12_000)
    port = random.Random(os.getpid() ^ time.time_ns()).randrange(first, last)
    while True:
        yield port
        port = first if port + 1 >= last else port + 1


_PORT_SEQUENCE = _ports()


def free_port() -> int:
    """A port nothing listens on, never handed out before by this process."""
    for port in _PORT_SEQUENCE:
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise AssertionError("unreachable: the port sequence is endless")
