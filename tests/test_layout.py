"""The house plan, checked: which room may import which, no imports by string, no oversized module.

Rooms (README, "Layout"): ``schemas`` (event and manifest shapes) and ``runtime`` (the shared runtime) below;
``worker``, ``drift`` and ``training`` side by side above them, never importing each other; ``cli`` on top of
all three; ``bench`` and ``tests`` may import anything. The graph is read with ``ast``, so imports inside
functions count as much as those at the top of a module.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
ROOMS = ("schemas", "runtime", "worker", "drift", "training", "cli", "bench", "tests", "deploy")
# room -> the project rooms it may import (besides itself)
ALLOWED: dict[str, set[str]] = {
    "schemas": set(),
    "runtime": {"schemas"},
    "worker": {"schemas", "runtime"},
    "drift": {"schemas", "runtime"},
    "training": {"schemas", "runtime"},
    "cli": {"schemas", "runtime", "worker", "drift", "training"},
    "bench": set(ROOMS),
    "tests": set(ROOMS),
    "deploy": {"schemas", "runtime", "training"},  # build and deploy scripts (teacher fetch, registry seed)
}
MAX_LINES = 450


def sources() -> list[Path]:
    return sorted(p for room in ROOMS for p in (REPO / room).rglob("*.py") if "__pycache__" not in p.parts)


def project_imports(tree: ast.AST) -> list[tuple[int, str]]:
    """(line, top-level package) of every import of a project room in ``tree``."""
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name.split(".")[0]) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.append((node.lineno, node.module.split(".")[0]))
    return [(line, top) for line, top in found if top in ROOMS]


def imports_by_string(tree: ast.AST) -> list[int]:
    """Lines that call ``__import__`` or ``importlib.import_module``: arrows a reader cannot see."""
    lines = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            name = node.func.id if isinstance(node.func, ast.Name) else (
                node.func.attr if isinstance(node.func, ast.Attribute) else "")
            if name in {"__import__", "import_module"}:
                lines.append(node.lineno)
    return lines


def test_the_walk_sees_every_room():
    # Guards the test itself: a renamed room must not make the checks below vacuous.
    rooms = {p.relative_to(REPO).parts[0] for p in sources()}
    assert {"schemas", "runtime", "worker", "drift", "training", "cli", "tests"} <= rooms


@pytest.mark.parametrize("path", sources(), ids=lambda p: str(p.relative_to(REPO)))
def test_no_forbidden_import_arrow(path: Path):
    room = path.relative_to(REPO).parts[0]
    tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
    wrong = [f"line {line}: {room} -> {top}" for line, top in project_imports(tree)
             if top != room and top not in ALLOWED[room]]
    assert not wrong, f"{path.relative_to(REPO)} imports a room it must not: {wrong}"
    if room not in {"tests", "bench"}:
        assert not imports_by_string(tree), f"{path.relative_to(REPO)} imports by string at {imports_by_string(tree)}"


@pytest.mark.parametrize("path", sources(), ids=lambda p: str(p.relative_to(REPO)))
def test_no_module_over_the_size_limit(path: Path):
    lines = path.read_text(encoding="utf-8").count("\n")
    assert lines <= MAX_LINES, f"{path.relative_to(REPO)} has {lines} lines (limit {MAX_LINES}): split it by mechanism"


def test_the_import_check_would_catch_a_forbidden_arrow():
    # A worker module that imports training, inside a function: the walk must see it.
    tree = ast.parse("def f():\n    from training.data import load\n    import drift.monitor\n")
    assert [top for _, top in project_imports(tree)] == ["training", "drift"]
    assert imports_by_string(ast.parse("m = __import__('training.cli')\nimportlib.import_module('x')")) == [1, 2]
