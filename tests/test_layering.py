"""Imports point one way: tests -> tierline.testing <- bench.

The harness (``src/tierline/testing``) imports neither the tests nor the benchmarks; no
test imports a benchmark module; only the fault suite (``tests/faults/``) imports its
own support. Imports are read with ``ast``, so imports inside functions count too.
"""

from __future__ import annotations

import ast
from collections.abc import Iterable, Iterator
from pathlib import Path

from tests.helpers import ROOT

TESTS = ROOT / "tests"
FAULTS = TESTS / "faults"
HARNESS = ROOT / "src" / "tierline" / "testing"


def package_of(path: Path) -> str:
    """The dotted package a module file belongs to (``src/`` is a source root)."""
    parts = path.resolve().relative_to(ROOT).parent.parts
    return ".".join(parts[1:] if parts[:1] == ("src",) else parts)


def imported(source: str, package: str) -> Iterator[tuple[int, str]]:
    """(line, module) of every import in ``source``, relative ones resolved against
    ``package``; ``from a import b`` yields ``a`` and ``a.b`` (b may be a module)."""
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                parts = parts[: len(parts) - node.level + 1]
                base = ".".join([*parts, base] if base else parts)
            yield node.lineno, base
            for alias in node.names:
                yield node.lineno, f"{base}.{alias.name}"


def offences(files: Iterable[Path], forbidden: tuple[str, ...]) -> list[str]:
    """``file:line imports module`` for each import of a ``forbidden`` module."""
    return [
        f"{path.relative_to(ROOT)}:{line} imports {module}"
        for path in files
        for line, module in imported(path.read_text(), package_of(path))
        if any(module == f or module.startswith(f + ".") for f in forbidden)
    ]


def test_the_harness_imports_neither_tests_nor_bench() -> None:
    assert not offences(HARNESS.rglob("*.py"), ("tests", "bench"))


def test_no_test_imports_bench() -> None:
    assert not offences(TESTS.rglob("*.py"), ("bench",))


def test_only_the_fault_suite_imports_the_fault_suite() -> None:
    outside = [p for p in TESTS.rglob("*.py") if FAULTS not in p.parents]
    assert not offences(outside, ("tests.faults",))


def test_the_check_sees_every_kind_of_import() -> None:
    """The parser is live: top-level, lazy, relative and package-member imports."""
    source = (
        "import bench.common\n"
        "from . import faults\n"
        "from .faults.support import Load\n"
        "def f():\n"
        "    from tests.faults import support\n"
    )
    found = {module for _, module in imported(source, "tests")}
    assert {"bench.common", "tests.faults", "tests.faults.support"} <= found
    assert package_of(HARNESS / "http.py") == "tierline.testing"
    assert package_of(FAULTS / "support.py") == "tests.faults"
