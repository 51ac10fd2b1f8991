"""Waiting for a condition with a timeout: every wait in a test has one."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any


def wait_for(
    predicate: Callable[[], Any],
    timeout: float,
    what: str,
    interval: float = 0.05,
    *,
    tolerate: tuple[type[BaseException], ...] = (Exception,),
) -> Any:
    """Poll ``predicate`` until it returns something truthy, and return that.

    Fails with ``AssertionError`` naming ``what`` after ``timeout`` seconds. Exceptions
    of the ``tolerate`` types count as "not yet" (the last one is reported on timeout);
    ``tolerate=()`` lets the first one through, to fail fast.
    """
    deadline = time.monotonic() + timeout
    last_exc: BaseException | None = None
    while time.monotonic() < deadline:
        try:
            value = predicate()
            if value:
                return value
        except tolerate as exc:  # keep polling; report the last one on timeout
            last_exc = exc
        time.sleep(interval)
    raise AssertionError(
        f"timed out after {timeout}s waiting for {what}"
        + (f" (last error: {last_exc!r})" if last_exc else "")
    )
