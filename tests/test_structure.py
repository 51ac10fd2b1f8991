"""The shape of ``src/tierline`` (ARCHITECTURE.md): imports flow one way (no cycle), modules
stay small enough to read in one sitting, and the tier entry points stay a walk through
named steps rather than long functions."""

from __future__ import annotations

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parent.parent / "src"
PACKAGE = SRC / "tierline"
MAX_MODULE_LINES = 400
# A longer module says why at its top, in its docstring.
LONG_REASON = "Why this module is long:"
TIER_ENTRY_POINTS = ("tier.py", "web_tier.py", "worker_tier.py", "worker.py", "lifecycle.py")
MAX_FUNCTION_LINES = 60


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(SRC).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for p in PACKAGE.rglob("*.py")}


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _imports(name: str, path: Path, known: set[str]) -> set[str]:
    """The tierline modules ``name`` needs to run: imports inside functions count (they
    run too, and a lazy import is the usual way to hide a cycle); annotation-only imports
    under ``if TYPE_CHECKING:`` do not."""
    found: set[str] = set()
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and _is_type_checking(node):
            for stmt in node.orelse:
                visit(stmt)
            return
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, *([base] if base else [])])
            targets = [base, *(f"{base}.{a.name}" for a in node.names)]
        else:
            targets = []
        for target in targets:
            while target and target not in known:
                target = target.rpartition(".")[0]
            if target and target != name:
                found.add(target)
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(ast.parse(path.read_text()))
    return found


def test_no_import_cycle_in_src() -> None:
    modules = _modules()
    known = set(modules)
    graph = {name: _imports(name, path, known) for name, path in modules.items()}
    # A package's __init__ importing its own submodules is not a cycle of concepts.
    for name in graph:
        graph[name] = {t for t in graph[name] if not name.startswith(t + ".")}
    cycles: list[list[str]] = []
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def walk(node: str, path: list[str]) -> None:
        state[node] = 1
        for target in sorted(graph[node]):
            if state.get(target) == 1:
                cycles.append([*path[path.index(target) :], target])
            elif target not in state:
                walk(target, [*path, target])
        state[node] = 2

    for name in sorted(graph):
        if name not in state:
            walk(name, [name])
    assert not cycles, "import cycles: " + "; ".join(" -> ".join(c) for c in cycles)


def test_modules_are_small_or_say_why() -> None:
    too_long = []
    for name, path in sorted(_modules().items()):
        lines = len(path.read_text().splitlines())
        docstring = ast.get_docstring(ast.parse(path.read_text())) or ""
        if lines > MAX_MODULE_LINES and LONG_REASON not in docstring:
            too_long.append(f"{name} ({lines} lines)")
    assert not too_long, (
        f"over {MAX_MODULE_LINES} lines without '{LONG_REASON}' in the module docstring: "
        + ", ".join(too_long)
    )


def test_tier_entry_points_have_short_functions() -> None:
    long_functions = []
    for file in TIER_ENTRY_POINTS:
        tree = ast.parse((PACKAGE / file).read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                length = (node.end_lineno or node.lineno) - node.lineno + 1
                if length > MAX_FUNCTION_LINES:
                    long_functions.append(f"{file}:{node.name} ({length} lines)")
    assert not long_functions, f"over {MAX_FUNCTION_LINES} lines: " + ", ".join(long_functions)
