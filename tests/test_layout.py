"""The package's shape, read from the source: dependencies go one way (no import cycle between
modules or between packages), modules stay small, and a package is used through its
`__init__` from outside it (its other modules are its own business)."""
from __future__ import annotations

import ast
from pathlib import Path

from tests.conftest import REPO

TUNER = REPO / "tuner"
MAX_LINES = 450
# Separate programs or test helpers, imported by module from tests and benchmarks.
OPEN_PACKAGES = {"sim", "testing"}


def _modules() -> dict[str, Path]:
    out = {}
    for path in TUNER.rglob("*.py"):
        parts = list(path.relative_to(REPO).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = path
    return out


def _imports(path: Path) -> list[str]:
    """Every `tuner.*` module this file imports, anywhere in it."""
    out = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "tuner" and node.level == 0:
            out += [f"{node.module}.{a.name}" if node.module == "tuner" else node.module for a in node.names]
        elif isinstance(node, ast.Import):
            out += [a.name for a in node.names if a.name.split(".")[0] == "tuner"]
    return out


def _package(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of the graph, or None."""
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(v: str) -> list[str] | None:
        state[v] = 1
        stack.append(v)
        for w in sorted(graph.get(v, ())):
            if state.get(w) == 1:
                return stack[stack.index(w):] + [w]
            if w not in state and (found := visit(w)):
                return found
        stack.pop()
        state[v] = 2
        return None

    for v in sorted(graph):
        if v not in state and (found := visit(v)):
            return found
    return None


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        # `from tuner.x import name` may name a module or a name in tuner.x
        graph[name] = {m if m in modules else m.rpartition(".")[0] for m in _imports(path)} - {name}
    return graph


def test_no_import_cycle_between_modules() -> None:
    graph = _graph()
    # a module's own package __init__ re-exports it: that edge is not a dependency of the module
    for name in graph:
        graph[name] = {m for m in graph[name] if not name.startswith(m + ".")}
    assert _cycle(graph) is None, f"import cycle: {' -> '.join(_cycle(graph) or [])}"


def test_no_import_cycle_between_packages() -> None:
    packages: dict[str, set[str]] = {}
    for name, deps in _graph().items():
        packages.setdefault(_package(name), set()).update(_package(d) for d in deps if _package(d) != _package(name))
    packages.pop("", None)  # tuner/__init__.py: the public API, importing everything lazily
    assert _cycle(packages) is None, f"package cycle: {' -> '.join(_cycle(packages) or [])}"


def test_modules_stay_small() -> None:
    big = {str(p.relative_to(REPO)): n for p in TUNER.rglob("*.py") if (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert not big, f"modules over {MAX_LINES} lines: {big}"


def test_packages_are_used_through_their_init() -> None:
    modules = _modules()
    packages = {_package(m) for m, p in modules.items() if p.name == "__init__.py" and m != "tuner"}
    wrong = []
    for name, path in modules.items():
        for target in _imports(path):
            target = target if target in modules else target.rpartition(".")[0]
            pkg = _package(target)
            if pkg in packages and pkg not in OPEN_PACKAGES and target != f"tuner.{pkg}" \
                    and _package(name) != pkg and name != "tuner":
                wrong.append(f"{name} imports {target}")
    assert not wrong, "import the package, not its modules: " + "; ".join(sorted(set(wrong)))
