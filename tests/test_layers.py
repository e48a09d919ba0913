"""The floor plan (docs/ARCHITECTURE.md) and the size limits, checked on every test run.

Floors, top to bottom; a module imports only from floors below its own (tests/ import anything):

    4  cli.py, bench/
    3  demo/
    2  actors/
    1  learner/, retriever/     (siblings: neither imports the other)
    0  common/

Sizes: a function or method at most 80 lines, a class at most 400, a module at most 600
(bench/ is exempt from the module limit: a bench is one scenario read top to bottom).
An import inside a function counts as much as one at the top of the module.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
FLOOR = {"common": 0, "learner": 1, "retriever": 1, "actors": 2, "demo": 3, "bench": 4, "cli": 4}
LIMITS = {"function": 80, "class": 400, "module": 600}
COMMON_USERS = 2  # common/ holds only what this many roles (or more) import
ROLES = ("actors", "learner", "retriever")


def _sources() -> list[tuple[str, Path]]:
    """(top-level package or module name, path) of every project source under a floor."""
    out = [("cli", ROOT / "cli.py")]
    for pkg in FLOOR:
        if (ROOT / pkg).is_dir():
            out += [(pkg, p) for p in sorted((ROOT / pkg).rglob("*.py"))]
    return out


def _imported_packages(tree: ast.AST) -> list[tuple[int, str]]:
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.append((node.lineno, node.module))
    return found


def test_every_import_points_down_the_floors():
    upward = []
    for pkg, path in _sources():
        for line, module in _imported_packages(ast.parse(path.read_text())):
            target = module.split(".")[0]
            if target in FLOOR and target != pkg and FLOOR[target] >= FLOOR[pkg]:
                upward.append(f"{path.relative_to(ROOT)}:{line}: {pkg} (floor {FLOOR[pkg]}) imports "
                              f"{module} (floor {FLOOR[target]})")
    assert not upward, "imports that do not point down:\n" + "\n".join(upward)


def _oversized(path: Path) -> list[str]:
    text = path.read_text()
    rel = path.relative_to(ROOT)
    found = []
    lines = text.count("\n")
    if lines > LIMITS["module"] and rel.parts[0] != "bench":
        found.append(f"{rel}: module of {lines} lines (> {LIMITS['module']})")
    for node in ast.walk(ast.parse(text)):
        kind = ("class" if isinstance(node, ast.ClassDef) else
                "function" if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) else None)
        if kind is not None:
            size = node.end_lineno - node.lineno + 1
            if size > LIMITS[kind]:
                found.append(f"{rel}:{node.lineno}: {kind} {node.name} of {size} lines (> {LIMITS[kind]})")
    return found


def test_no_unit_is_oversized():
    found = [f for _, path in _sources() for f in _oversized(path)]
    assert not found, "oversized units:\n" + "\n".join(found)


def test_common_holds_only_what_two_roles_import():
    """A module of common/ that fewer than two roles import belongs to the one role that does
    (or to demo/ when only the demo, benches and tests use it)."""
    users: dict[str, set[str]] = {}
    for pkg, path in _sources():
        if pkg not in ROLES:
            continue
        for _, module in _imported_packages(ast.parse(path.read_text())):
            parts = module.split(".")
            if parts[0] == "common" and len(parts) > 1:
                users.setdefault(parts[1], set()).add(pkg)
    # common's own modules count through the roles that import them (transport imports wire, ...)
    for _ in range(3):
        for path in (ROOT / "common").rglob("*.py"):
            name = path.relative_to(ROOT / "common").parts[0].removesuffix(".py")
            for _, module in _imported_packages(ast.parse(path.read_text())):
                parts = module.split(".")
                if parts[0] == "common" and len(parts) > 1 and parts[1] != name:
                    users.setdefault(parts[1], set()).update(users.get(name, set()))
    modules = {p.relative_to(ROOT / "common").parts[0].removesuffix(".py")
               for p in (ROOT / "common").iterdir() if p.suffix == ".py" or p.is_dir()}
    modules -= {"__init__", "__pycache__"}
    lonely = {m: sorted(users.get(m, set())) for m in modules if len(users.get(m, set())) < COMMON_USERS}
    assert not lonely, f"common/ modules imported by fewer than {COMMON_USERS} roles: {lonely}"


def test_the_check_sees_a_violation():
    """The checks above would fail on the shapes they look for (so a green run means something)."""
    tree = ast.parse("def f():\n    from demo.run import main\n")
    assert [m for _, m in _imported_packages(tree)] == ["demo.run"]
    body = "\n".join(["def f():"] + ["    x = 1"] * LIMITS["function"])
    probe = ROOT / "tests" / ".layers_probe.py"
    try:
        probe.write_text(body + "\n")
        assert any("function f of 81 lines" in f for f in _oversized(probe))
    finally:
        probe.unlink(missing_ok=True)
