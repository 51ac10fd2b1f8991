"""Named SQL queries, loaded from the ``.sql`` files beside this module.

A file holds blocks that start with ``-- name: NAME``; Python refers to queries by name
(``QUERIES["claim"]``), so SQL stays SQL and is read, reviewed and tuned as such.
"""

from __future__ import annotations

import re
from importlib import resources
from typing import LiteralString, cast

_NAME = re.compile(r"^--\s*name:\s*([a-z_][a-z0-9_]*)\s*$", re.MULTILINE)


def parse(text: str) -> dict[str, str]:
    """Split a ``.sql`` file into ``{name: query}``."""
    parts = _NAME.split(text)
    queries: dict[str, str] = {}
    for name, body in zip(parts[1::2], parts[2::2], strict=True):
        sql = body.strip()
        if name in queries:
            raise ValueError(f"query {name!r} is defined twice")
        queries[name] = sql
    return queries


def load() -> dict[str, LiteralString]:
    queries: dict[str, LiteralString] = {}
    for entry in sorted(resources.files("tierline.sql").iterdir(), key=lambda e: e.name):
        if entry.name.endswith(".sql"):
            for name, sql in parse(entry.read_text("utf-8")).items():
                if name in queries:
                    raise ValueError(f"query {name!r} is defined twice")
                # The files ship with the package: they are code, not input.
                queries[name] = cast(LiteralString, sql)  # type: ignore[redundant-cast]
    return queries


QUERIES = load()
