"""Typed outcomes a handler raises to choose what happens to its job."""

from __future__ import annotations


class Retry(Exception):
    """Run the job again after ``delay`` seconds (counts as an attempt)."""

    def __init__(self, delay: float | None = None, reason: str = "") -> None:
        super().__init__(reason or "retry requested")
        self.delay = delay
        self.reason = reason


class Cancel(Exception):
    """Stop the job for good: it ends ``cancelled``, no further attempts."""

    def __init__(self, reason: str = "") -> None:
        super().__init__(reason or "cancelled by handler")
        self.reason = reason
