"""ARCHITECTURE.md stays true: every function, class and named query it walks a reader
through exists in the code."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DOC = (ROOT / "ARCHITECTURE.md").read_text()
SOURCES = "\n".join(p.read_text() for p in (ROOT / "src" / "tierline").rglob("*.py"))
SQL = "\n".join(p.read_text() for p in (ROOT / "src" / "tierline" / "sql").glob("*.sql"))
SCHEMA = "\n".join(
    p.read_text() for p in (ROOT / "src" / "tierline" / "sql" / "migrations").glob("*.sql")
)


def test_named_queries_exist() -> None:
    named = set(re.findall(r"^-- name: (\w+)$", SQL, re.M))
    cited = set(re.findall(r'QUERIES\["(\w+)"\]', DOC))
    assert cited, "the walk-throughs cite no query"
    assert cited <= named, f"not in sql/*.sql: {sorted(cited - named)}"


def test_cited_names_exist() -> None:
    """``Worker.claim``, ``budget.fit_to_budget``, ``Subscription._replay``: the last
    part is defined (``def``/``class``) or assigned somewhere in the package, or, for
    ``tierline.job_stream``, is a table or view of the schema."""
    cited = {
        m.group(1).split(".")[-1]
        for m in re.finditer(r"`([A-Za-z_]\w*(?:\.\w+)+)(?:\([^`]*\))?`", DOC)
        if not m.group(1).endswith((".py", ".sql", ".md", ".json"))
    }
    modules = {p.stem for p in (ROOT / "src" / "tierline").rglob("*.py")}
    packages = {p.parent.name for p in (ROOT / "src" / "tierline").rglob("__init__.py")}
    defined = (
        set(re.findall(r"(?:def|class)\s+(\w+)", SOURCES))
        | set(re.findall(r"^\s*(\w+)\s*[:=]", SOURCES, re.M))
        | modules
        | packages
        | set(re.findall(r"CREATE (?:TABLE|VIEW) tierline\.(\w+)", SCHEMA))
    )
    assert len(cited) > 20
    missing = sorted(name for name in cited if name not in defined)
    assert not missing, f"ARCHITECTURE.md names what the code does not define: {missing}"
