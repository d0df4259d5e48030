"""The package imports without cycles: no module of ``digilut`` imports, at module level or for type
checking, a module that imports it back (directly or through others). A cycle makes import order
matter and hides which layer a module belongs to (``storage`` and ``transfer`` imported each other,
one of the two under ``if TYPE_CHECKING:``)."""

import ast
from pathlib import Path

import digilut

ROOT = Path(digilut.__file__).parent


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _module_level_imports(path: Path, modules: set[str]) -> set[str]:
    """The digilut modules ``path`` imports at module level, ``if TYPE_CHECKING:`` included (not
    the imports inside functions, which load heavy modules late)."""
    found = set()
    tree = ast.parse(path.read_text())
    nodes = [*tree.body, *(n for s in tree.body if isinstance(s, ast.If) for n in s.body)]
    for node in nodes:
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found |= {f"{node.module}.{a.name}" for a in node.names} | {node.module}
        elif isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
    return found & modules


def import_graph() -> dict[str, set[str]]:
    paths = {_module_name(p): p for p in ROOT.rglob("*.py")}
    modules = set(paths)
    return {name: _module_level_imports(path, modules) - {name} for name, path in paths.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str]:
    """One cycle of ``graph`` as ``[a, b, …, a]``, or ``[]``."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str]:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return [*path[path.index(nxt) :], nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        path.pop()
        state[node] = 2
        return []

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return []


def test_the_cycle_finder_finds_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set(), "c": {"a", "b"}}) == []


def test_digilut_has_no_import_cycle():
    graph = import_graph()
    assert {"digilut.storage", "digilut.transfer", "digilut.s3config"} <= set(graph)
    assert "digilut.s3config" in graph["digilut.transfer"]  # the graph sees module-level imports
    assert find_cycle(graph) == [], " -> ".join(find_cycle(graph))
