"""Structural checks of the package: no import cycles, no oversized modules.

The import graph is built from the source with ``ast`` (nothing is imported), so a new cycle
fails here with the exact import statements that form it, before it shows up as a
``partially initialized module`` error in some rarely taken import order.

Two graphs are checked. The module-level one (what runs at import time) must have no cycle, or
some import order fails. The full one also counts imports inside functions: an import moved into
a function to dodge a cycle still couples the two modules both ways, so it must have no cycle
either. Imports flow down the layers of docs/architecture.md's "Import layering": protocol <-
transport/store <- head, agent <- client <- worker, widgets <- api <- magics, jupyter <- the
package's ``__init__``, cli; a function-level import is fine for laziness, going down that order.
"""

from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path

PACKAGE = "nbcluster"
ROOT = Path(__file__).resolve().parent.parent
PACKAGE_DIR = ROOT / PACKAGE
MAX_LINES = 800


@dataclass(frozen=True)
class Edge:
    """One module-level import: ``source`` runs ``target``'s module body when it is imported."""

    source: str
    target: str
    path: str
    line: int
    statement: str

    def __str__(self) -> str:
        return f"{self.source} -> {self.target}    ({self.path}:{self.line}: {self.statement})"


def module_files(package_dir: Path = PACKAGE_DIR) -> dict[str, Path]:
    """Every module of the package by dotted name (``pkg/__init__.py`` is ``pkg``)."""
    modules: dict[str, Path] = {}
    for path in sorted(package_dir.rglob("*.py")):
        rel = path.relative_to(package_dir.parent).with_suffix("")
        parts = list(rel.parts)
        if parts[-1] == "__init__":
            parts.pop()
        modules[".".join(parts)] = path
    return modules


def _is_type_checking(test: ast.expr) -> bool:
    if isinstance(test, ast.Name):
        return test.id == "TYPE_CHECKING"
    if isinstance(test, ast.Attribute):
        return test.attr == "TYPE_CHECKING"
    return False


def imports(tree: ast.Module, *, in_functions: bool) -> list[ast.Import | ast.ImportFrom]:
    """The import statements of a module that can run.

    Statements nested in ``if``/``try``/``with``/``for``/class bodies run with the module body;
    function bodies run later and count only with ``in_functions``. ``if TYPE_CHECKING:`` never
    runs.
    """
    found: list[ast.Import | ast.ImportFrom] = []

    def walk(body: list[ast.stmt]) -> None:
        for node in body:
            if isinstance(node, ast.Import | ast.ImportFrom):
                found.append(node)
            elif isinstance(node, ast.If):
                if not _is_type_checking(node.test):
                    walk(node.body)
                walk(node.orelse)
            elif isinstance(node, ast.Try | ast.TryStar):
                walk(node.body)
                for handler in node.handlers:
                    walk(handler.body)
                walk(node.orelse)
                walk(node.finalbody)
            elif isinstance(node, ast.With | ast.ClassDef | ast.For | ast.While) or (
                in_functions and isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef)
            ):
                walk(node.body)

    walk(tree.body)
    return found


def _ancestors(name: str) -> list[str]:
    parts = name.split(".")
    return [".".join(parts[:i]) for i in range(1, len(parts))]


def import_graph(package_dir: Path = PACKAGE_DIR, *, in_functions: bool = False) -> list[Edge]:
    """The import edges between modules of the package (module-level ones by default).

    Importing ``a.b.c`` runs the bodies of ``a``, ``a.b`` and ``a.b.c``, so an edge goes to each
    of them, except to the importer's own ancestor packages: those were imported before the
    importer itself, so importing them again runs nothing. An import that names an ancestor
    itself (``import nbcluster``, ``from nbcluster import get``) does depend on its body: an
    edge. ``from a import name`` depends on ``a``'s body when ``name`` is not a submodule.
    """
    modules = module_files(package_dir)
    root = package_dir.parent
    edges: set[Edge] = set()
    for source, path in modules.items():
        tree = ast.parse(path.read_text(), filename=str(path))
        is_package = path.name == "__init__.py"
        lines = path.read_text().splitlines()
        for node in imports(tree, in_functions=in_functions):
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            else:
                if node.level:
                    base_parts = source.split(".")
                    if not is_package:
                        base_parts = base_parts[:-1]
                    base_parts = base_parts[: len(base_parts) - (node.level - 1)]
                    base = ".".join(base_parts + ([node.module] if node.module else []))
                else:
                    base = node.module or ""
                for alias in node.names:
                    sub = f"{base}.{alias.name}"
                    targets.append(sub if sub in modules else base)
            statement = lines[node.lineno - 1].strip()
            own_ancestors = set(_ancestors(source))
            for target in targets:
                if target.split(".")[0] != package_dir.name:
                    continue
                implied = [a for a in _ancestors(target) if a not in own_ancestors]
                for name in [*implied, target]:
                    if name == source or name not in modules:
                        continue
                    edges.add(
                        Edge(source, name, str(path.relative_to(root)), node.lineno, statement)
                    )
    return sorted(edges, key=lambda e: (e.source, e.line, e.target))


def strongly_connected(nodes: list[str], edges: list[Edge]) -> list[list[str]]:
    """Tarjan's strongly connected components (iterative), each sorted."""
    succ: dict[str, list[str]] = {n: [] for n in nodes}
    for e in edges:
        succ[e.source].append(e.target)
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    on_stack: set[str] = set()
    stack: list[str] = []
    components: list[list[str]] = []
    counter = 0
    for root in nodes:
        if root in index:
            continue
        work: list[tuple[str, int]] = [(root, 0)]
        while work:
            node, i = work.pop()
            if i == 0:
                index[node] = low[node] = counter
                counter += 1
                stack.append(node)
                on_stack.add(node)
            recurse = False
            for j in range(i, len(succ[node])):
                nxt = succ[node][j]
                if nxt not in index:
                    work.append((node, j + 1))
                    work.append((nxt, 0))
                    recurse = True
                    break
                if nxt in on_stack:
                    low[node] = min(low[node], index[nxt])
            if recurse:
                continue
            if low[node] == index[node]:
                component: list[str] = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                components.append(sorted(component))
            if work:
                parent = work[-1][0]
                low[parent] = min(low[parent], low[node])
    return components


def cycle_report(edges: list[Edge], package_dir: Path = PACKAGE_DIR) -> str:
    """Each cycle (strongly connected component) with the imports inside it; empty if none."""
    modules = sorted(module_files(package_dir))
    cycles = [c for c in strongly_connected(modules, edges) if len(c) > 1]
    report = []
    for component in cycles:
        members = set(component)
        inner = [e for e in edges if e.source in members and e.target in members]
        report.append(
            f"cycle between {', '.join(component)}:\n" + "\n".join(f"  {e}" for e in inner)
        )
    return "\n\n".join(report)


HOW_TO_BREAK = (
    "break each by moving what both sides need into a lower module (imports flow protocol <- "
    "transport/store <- head, agent <- client <- worker, widgets <- api <- magics, jupyter <- "
    "the package's __init__, cli: docs/architecture.md's 'Import layering'), not by moving an "
    "import into a function"
)


def test_no_import_cycles_at_import_time() -> None:
    report = cycle_report(import_graph())
    assert not report, f"module-level imports form cycles; {HOW_TO_BREAK}:\n\n{report}"


def test_no_import_cycles_through_function_imports() -> None:
    report = cycle_report(import_graph(in_functions=True))
    assert not report, f"imports (some inside functions) form cycles; {HOW_TO_BREAK}:\n\n{report}"


def test_graph_sees_relative_package_and_function_imports(tmp_path: Path) -> None:
    # The checker itself: a small package whose cycles it must see (and not invent).
    pkg = tmp_path / "pkg"
    (pkg / "sub").mkdir(parents=True)
    files = {
        "__init__.py": "from pkg.sub import leaf\n",
        "low.py": "X = 1\n",
        "sub/__init__.py": "from . import leaf\n",
        "sub/leaf.py": "from ..low import X\n",
        "high.py": (
            "from typing import TYPE_CHECKING\n"
            "if TYPE_CHECKING:\n    from pkg import mid\n"
            "def f():\n    from pkg import later\n"
        ),
        "mid.py": "from pkg.high import f\n",
        "later.py": "import pkg.mid\n",
        "top.py": "from pkg import X\n",  # a name of pkg/__init__.py: its body runs first
    }
    for name, text in files.items():
        (pkg / name).write_text(text)
    edges = {(e.source, e.target) for e in import_graph(pkg)}
    assert ("pkg", "pkg.sub") in edges and ("pkg", "pkg.sub.leaf") in edges
    assert ("pkg.sub", "pkg.sub.leaf") in edges
    assert ("pkg.sub.leaf", "pkg.low") in edges
    assert ("pkg.top", "pkg") in edges
    assert ("pkg.sub.leaf", "pkg.sub") not in edges  # its own package ran before it
    assert not any(s == "pkg.high" for s, _ in edges)  # TYPE_CHECKING and functions: later
    assert cycle_report(import_graph(pkg), pkg) == ""
    report = cycle_report(import_graph(pkg, in_functions=True), pkg)
    assert "cycle between pkg.high, pkg.later, pkg.mid:" in report
    assert "pkg.high -> pkg.later    (pkg/high.py:5: from pkg import later)" in report
    assert report.count("cycle between") == 1
    # And the real package: nbcluster/__init__.py runs nbcluster.api, which runs the client.
    real = {(e.source, e.target) for e in import_graph()}
    assert ("nbcluster", "nbcluster.api") in real
    assert ("nbcluster.api", "nbcluster.client") in real
    assert len(real) > 100


def test_no_oversized_modules() -> None:
    oversized = {
        str(path.relative_to(ROOT)): n
        for path in module_files().values()
        if (n := len(path.read_text().splitlines())) > MAX_LINES
    }
    assert not oversized, (
        f"modules past {MAX_LINES} lines (split each along a responsibility): {oversized}"
    )


def test_every_module_is_in_the_module_map() -> None:
    """docs/architecture.md's module map names every module (package ``__init__`` files aside),
    so that it cannot fall behind the code again."""
    text = (ROOT / "docs" / "architecture.md").read_text()
    missing = [
        rel
        for path in sorted(PACKAGE_DIR.rglob("*.py"))
        if path.name != "__init__.py"
        and f"`{(rel := path.relative_to(ROOT).as_posix())}`" not in text
    ]
    assert not missing, "add these to the module map in docs/architecture.md:\n" + "\n".join(
        missing
    )
