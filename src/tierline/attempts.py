"""What became of one attempt: a handler's return or raise, as the ``Finish`` the flusher
writes (state, result or error, the delay before the next attempt).

``Retry(delay)`` retries (or fails, on the last attempt), ``Cancel`` cancels, a cancel
request that ended the task cancels, any other exception (a timeout included) retries
with full-jitter backoff until ``max_attempts``; an exception raised in a child process
keeps its own type name and traceback.
"""

from __future__ import annotations

import json
import traceback
from typing import Any

from tierline.backoff import full_jitter
from tierline.executors.children import RemoteError
from tierline.flusher import Finish
from tierline.outcomes import Cancel, Retry

MAX_ERROR_CHARS = 8000
RETRY_BASE_S = 1.0
RETRY_CAP_S = 3600.0


def retry_delay(attempt: int) -> float:
    """The delay before a failed job's next attempt (a handler's ``Retry`` may set one)."""
    return full_jitter(attempt, RETRY_BASE_S, RETRY_CAP_S)


def succeeded(finish: Finish, value: Any) -> Finish:
    """The handler returned ``value``; checked now, so a bad one fails this attempt, not
    the acknowledgement batch."""
    if value is not None and not isinstance(value, str | int | float | bool):
        try:
            json.dumps(value)
        except (TypeError, ValueError) as exc:
            raise TypeError(f"the handler's result is not JSON-serialisable: {exc}") from None
    finish.result = value
    return finish


def raised(finish: Finish, exc: BaseException, max_attempts: int) -> Finish:
    """The handler raised ``exc`` (a ``CancelledError`` only for a requested cancel)."""
    attempt = finish.attempt
    if isinstance(exc, Retry):
        finish.state = "retrying" if attempt < max_attempts else "failed"
        finish.delay_s = exc.delay if exc.delay is not None else retry_delay(attempt)
        finish.error = _error("Retry", exc.reason or "retry requested", attempt)
    elif isinstance(exc, Cancel):
        finish.state = "cancelled"
        finish.error = _error("Cancel", exc.reason or "cancelled by handler", attempt)
    elif not isinstance(exc, Exception):  # asyncio.CancelledError: cancelled on request
        finish.state = "cancelled"
        finish.error = _error("Cancelled", "cancelled on request", attempt)
    else:
        if isinstance(exc, RemoteError):  # raised in a child process: its type, its trace
            kind, trace = exc.type_name, exc.remote_traceback
        else:
            kind, trace = type(exc).__name__, "".join(traceback.format_exception(exc))
        finish.error = _error(kind, str(exc)[:2000], attempt)
        finish.error["traceback"] = trace[-MAX_ERROR_CHARS:]
        if attempt < max_attempts:
            finish.state, finish.delay_s = "retrying", retry_delay(attempt)
        else:
            finish.state = "failed"
    return finish


def _error(kind: str, message: str, attempt: int) -> dict[str, Any]:
    return {"type": kind, "message": message, "attempt": attempt}
