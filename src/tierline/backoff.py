"""Exponential backoff with full jitter: retry n waits uniform(0, min(cap, base * 2**n)).

Full jitter rather than plain doubling: clients that failed together (replicas after a
database restart, jobs that hit the same outage) spread out instead of retrying in step.
"""

from __future__ import annotations

import itertools
import random
from collections.abc import Iterator

# Past this the doubling has long reached any cap; without it ``2**n`` eventually
# overflows a float (after ~1,000 retries of a database that stays down).
MAX_EXPONENT = 30


def full_jitter(attempt: int, base: float, cap: float) -> float:
    """The delay in seconds before retry ``attempt`` (0 for the first)."""
    return random.uniform(0, min(cap, base * 2 ** min(attempt, MAX_EXPONENT)))


def backoff_delays(base: float = 0.1, cap: float = 10.0) -> Iterator[float]:
    """``full_jitter`` delays for attempts 0, 1, 2...; start a new one after a success."""
    for attempt in itertools.count():
        yield full_jitter(attempt, base, cap)
