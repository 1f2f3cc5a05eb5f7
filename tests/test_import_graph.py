"""No import cycles between first-party modules.

The graph has one node per module of `bot`, `adapters`, `personas`, `trainer` and `migrations`, and an
edge for every import of another first-party module, wherever it is written: at the top, inside a
function (a "local import" that only hides a cycle still counts), or under `if TYPE_CHECKING:` (a cycle
of types is still two modules that each need the other). `from pkg import name` points at the
submodule `pkg.name` when there is one, else at `pkg`.

Not counted: the implicit import of a package's `__init__` when one of its submodules is imported. A
package `__init__` that re-exports its submodules (`bot.store`, `bot.generation`) would otherwise form a
cycle with every submodule that imports a sibling, though nothing in it depends on the package; a real
cycle through an `__init__` (it imports a module that imports the package's own names) is still
caught, because that import names the package explicitly.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("bot", "adapters", "personas", "trainer", "migrations")


def first_party_modules(root: Path = ROOT) -> dict[str, Path]:
    modules: dict[str, Path] = {}
    for package in PACKAGES:
        for path in sorted((root / package).rglob("*.py")):
            parts = list(path.relative_to(root).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            modules[".".join(parts)] = path
    return modules


def _imported(node: ast.AST, module: str, is_package: bool) -> Iterator[str]:
    """Every module name an import statement names, relative imports resolved."""
    if isinstance(node, ast.Import):
        for alias in node.names:
            yield alias.name
    elif isinstance(node, ast.ImportFrom):
        if node.level:
            base = module.split(".")
            base = base[: len(base) - node.level + (1 if is_package else 0)]
            prefix = ".".join(base + ([node.module] if node.module else []))
        else:
            prefix = node.module or ""
        for alias in node.names:
            yield f"{prefix}.{alias.name}"
        yield prefix


def import_graph(root: Path = ROOT) -> dict[str, set[str]]:
    modules = first_party_modules(root)
    graph: dict[str, set[str]] = {name: set() for name in modules}
    for name, path in modules.items():
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        is_package = path.name == "__init__.py"
        for node in ast.walk(tree):
            if not isinstance(node, ast.Import | ast.ImportFrom):
                continue
            names = list(_imported(node, name, is_package))
            if isinstance(node, ast.ImportFrom):
                # `from pkg import sub` is the submodule where one exists, else a name from `pkg`.
                submodules = [n for n in names[:-1] if n in modules]
                targets = submodules if len(submodules) == len(names) - 1 else [*submodules, names[-1]]
            else:
                targets = names
            for target in targets:
                # `import a.b.c` of a name that is not a module (an attribute) counts as its module.
                while target and target not in modules:
                    target = target.rpartition(".")[0]
                if target and target != name:
                    graph[name].add(target)
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One cycle (as a path that returns to its start) for each strongly connected group of modules."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    groups: list[set[str]] = []

    def visit(node: str) -> None:  # Tarjan's algorithm
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in sorted(graph[node]):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            group = set()
            while True:
                member = stack.pop()
                on_stack.discard(member)
                group.add(member)
                if member == node:
                    break
            if len(group) > 1:
                groups.append(group)

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return [_path_in(group, graph) for group in groups]


def _path_in(group: set[str], graph: dict[str, set[str]]) -> list[str]:
    """A shortest cycle through the group's first module (breadth-first back to it)."""
    start = min(group)
    previous: dict[str, str] = {}
    frontier = [start]
    while frontier:
        following = []
        for node in frontier:
            for nxt in sorted(graph[node] & group):
                if nxt == start:
                    path = [node]
                    while path[-1] != start:
                        path.append(previous[path[-1]])
                    return [start, *reversed(path[:-1]), start]
                if nxt not in previous:
                    previous[nxt] = node
                    following.append(nxt)
        frontier = following
    return sorted(group)


def test_no_import_cycles() -> None:
    found = cycles(import_graph())
    assert not found, "import cycles between modules:\n" + "\n".join(" -> ".join(c) for c in found)


def test_a_cycle_is_found_and_named(tmp_path: Path) -> None:
    """The check itself: a function-local import that closes a cycle is reported with its path."""
    (tmp_path / "bot").mkdir()
    (tmp_path / "bot" / "__init__.py").write_text("")
    (tmp_path / "bot" / "a.py").write_text("from bot.b import thing\n")
    (tmp_path / "bot" / "b.py").write_text("def thing():\n    from bot import a\n    return a\n")
    (tmp_path / "bot" / "c.py").write_text("from . import a\n")
    found = cycles(import_graph(tmp_path))
    assert found == [["bot.a", "bot.b", "bot.a"]]
