"""Structured logging: JSON lines for machines, readable lines on a terminal."""

from __future__ import annotations

import json
import logging
import sys
from datetime import UTC, datetime
from typing import Any

import structlog

_configured = False
_json_output = False
_min_level = logging.INFO


def configure(level: str = "info", fmt: str = "auto", **context: Any) -> None:
    """Set up structlog once per process; ``context`` (tier, replica) joins every line."""
    global _configured, _json_output, _min_level
    json_output = fmt == "json" or (fmt == "auto" and not sys.stderr.isatty())
    _json_output = json_output
    _min_level = logging.getLevelNamesMapping()[level.upper()]
    renderer: Any = (
        structlog.processors.JSONRenderer()
        if json_output
        else structlog.dev.ConsoleRenderer(colors=sys.stderr.isatty())
    )
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(
            logging.getLevelNamesMapping()[level.upper()]
        ),
        logger_factory=structlog.PrintLoggerFactory(file=sys.stderr),
        cache_logger_on_first_use=True,
    )
    structlog.contextvars.clear_contextvars()
    structlog.contextvars.bind_contextvars(**context)
    # Libraries that log through the standard library (psycopg_pool, uvicorn) follow suit.
    logging.basicConfig(
        level=logging.WARNING, stream=sys.stderr, format="%(levelname)s %(name)s: %(message)s"
    )
    _configured = True


def get_logger(name: str) -> Any:
    return structlog.get_logger(name)


def emit_batch(name: str, records: list[tuple[str, str, dict[str, Any]]]) -> None:
    """Log many lines at once: ``(level, event, fields)`` each.

    For per-job lines on a busy worker (10,000 a second): in JSON mode the lines are
    rendered directly and written with one call, about ten times cheaper than one
    structlog call each; on a terminal they go through structlog as usual.
    """
    levels = logging.getLevelNamesMapping()
    if not _json_output:
        logger = get_logger(name)
        for level, event, fields in records:
            getattr(logger, level)(event, **fields)
        return
    context = structlog.contextvars.get_contextvars()
    stamp = datetime.now(UTC).isoformat().replace("+00:00", "Z")
    lines = [
        json.dumps(
            {**fields, "event": event, **context, "level": level, "timestamp": stamp}, default=str
        )
        for level, event, fields in records
        if levels[level.upper()] >= _min_level
    ]
    if lines:
        sys.stderr.write("\n".join(lines) + "\n")
        sys.stderr.flush()
