"""The shape of the library, checked from its source: no import cycles, short functions, and
model types named only in the registry."""

from __future__ import annotations

import ast
import re
from pathlib import Path

from seqmodels.models import FAMILIES
from tests.conftest import REPO

PACKAGE = REPO / "seqmodels"
MAX_FUNCTION_LINES = 80
# A function may be longer only with a comment on its `def` line saying why.
LONG_FUNCTION_MARK = "# long:"


def module_name(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported_modules(path: Path, known: set[str]) -> set[str]:
    """Every seqmodels module `path` imports, at the top or inside a function. Importing
    seqmodels.a.b also runs seqmodels.a (its package), so that is an edge too, except for the
    importing module's own packages: they are already initialised when its body runs."""
    own = module_name(path).split(".")
    own_packages = {".".join(own[:i]) for i in range(1, len(own))}
    tree = ast.parse(path.read_text(encoding="utf-8"))
    targets: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            targets |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            targets.add(node.module)
            targets |= {f"{node.module}.{alias.name}" for alias in node.names}
    edges = set()
    for target in targets:
        parts = target.split(".")
        for i in range(2, len(parts) + 1):  # seqmodels.a, seqmodels.a.b, ...
            name = ".".join(parts[:i])
            if name in known and (name not in own_packages or name == target):
                edges.add(name)
    return edges


def import_graph() -> dict[str, set[str]]:
    files = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    known = set(files)
    graph = {}
    for name, path in files.items():
        graph[name] = imported_modules(path, known) - {name}
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt) :] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_the_cycle_finder_finds_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_seqmodels_has_no_import_cycle_lazy_imports_included():
    graph = import_graph()
    assert "seqmodels.models.family" in graph["seqmodels.models"]
    assert find_cycle(graph) is None, " -> ".join(find_cycle(graph))


def test_no_function_is_longer_than_80_lines_without_a_reason():
    too_long = []
    for path in PACKAGE.rglob("*.py"):
        lines = path.read_text(encoding="utf-8").splitlines()
        for node in ast.walk(ast.parse("\n".join(lines))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                length = node.end_lineno - node.lineno + 1
                if length > MAX_FUNCTION_LINES and LONG_FUNCTION_MARK not in lines[node.lineno - 1]:
                    too_long.append(f"{path.relative_to(REPO)}:{node.lineno} {node.name} {length}")
    assert not too_long, too_long


def test_model_types_are_named_only_in_the_registry():
    registry = PACKAGE / "models" / "__init__.py"
    pattern = re.compile("|".join(rf"[\"']{re.escape(name)}[\"']" for name in FAMILIES))
    places = []
    for folder in ("seqmodels", "tasks", "flows"):
        for path in (REPO / folder).rglob("*.py"):
            if path != registry:
                places += [
                    f"{path.relative_to(REPO)}:{i}"
                    for i, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1)
                    if pattern.search(line)
                ]
    assert not places, places


def test_no_private_name_is_imported_from_another_module():
    offenders = []
    for folder in ("seqmodels", "tasks", "flows"):
        for path in (REPO / folder).rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
                if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                    if node.module.split(".")[0] in ("seqmodels", "tasks", "flows"):
                        private = [a.name for a in node.names if a.name.startswith("_")]
                        if private:
                            offenders.append(f"{path.relative_to(REPO)}: {private}")
    assert not offenders, offenders
