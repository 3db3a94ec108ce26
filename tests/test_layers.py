"""The layers hold (docs/architecture.md, "The layers"): imports point down, no cycles.

Every module under gateway/ is parsed (never imported) and each import, also those inside
functions, is an edge of the graph. The order, top first:

    cli > devtools > ops > http > core > upstream > store > obs > config

``gateway/config.py``, ``gateway/analysis.py``, ``gateway/upload.py``,
``gateway/event_loop.py`` and ``gateway/core/errors.py`` import nothing above them and may be
imported from every layer. An import that points up is an error unless it is in ``UPWARD``
below, with its reason; an entry that is no longer needed is an error too, so the list stays
the truth. ``gateway/core/``, ``gateway/store/`` and ``gateway/obs/`` never import aiohttp.
"""

from __future__ import annotations

import ast
import shutil
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

# Higher imports lower. A module's layer is the first of these its dotted name starts with.
RANK = {
    "gateway.__main__": 8,  # `python -m gateway`: runs the CLI
    "gateway.cli": 8,  # the `gateway` command: every subcommand, devtools' included
    "gateway.devtools": 7,
    "gateway.ops": 6,
    "gateway.http": 5,
    "gateway.core": 4,
    "gateway.upstream": 3,
    "gateway.store": 2,
    "gateway.obs": 1,  # metrics, the access log: recorded into from every layer above
    "gateway.config": 0,
    "gateway": 0,  # __init__.py (the version), analysis.py, upload.py, event_loop.py: leaves
}
# May be imported from every layer (each imports no module above it: checked below).
FLOOR = {"gateway.config", "gateway.core.errors", "gateway", "gateway.analysis",
         "gateway.upload", "gateway.event_loop"}
NO_AIOHTTP = ("gateway.core", "gateway.store", "gateway.obs")

# Upward imports allowed (importer, imported): one reason each. None is left (issue 11).
UPWARD: dict[tuple[str, str], str] = {}

# Imports inside a function that close a cycle of module-level imports: the documented way to
# break one. Each must be here (with its reason); the cycle check leaves them out.
CYCLE_BREAKERS: dict[tuple[str, str], str] = {}  # none is left


@dataclass(frozen=True)
class Edge:
    importer: str
    imported: str
    line: int
    local: bool  # inside a function (runs when called, not at import)


def module_name(root: Path, path: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules(root: Path) -> dict[str, Path]:
    return {module_name(root, p): p for p in sorted((root / "gateway").rglob("*.py"))}


def _resolve(name: str, known: dict[str, Path]) -> str | None:
    """The module of the gateway that ``name`` (a module or a name in one) is."""
    while name:
        if name in known:
            return name
        name = name.rpartition(".")[0]
    return None


class _Imports(ast.NodeVisitor):
    def __init__(self, module: str, is_package: bool) -> None:
        self.module, self.package = module, module if is_package else module.rpartition(".")[0]
        self.found: list[tuple[str, int, bool]] = []  # (dotted, line, inside a function)
        self.depth = 0

    def _function(self, node: ast.AST) -> None:
        self.depth += 1
        self.generic_visit(node)
        self.depth -= 1

    visit_FunctionDef = visit_AsyncFunctionDef = visit_Lambda = _function

    def visit_Import(self, node: ast.Import) -> None:
        for alias in node.names:
            self.found.append((alias.name, node.lineno, self.depth > 0))

    def visit_ImportFrom(self, node: ast.ImportFrom) -> None:
        if node.level:
            base = self.package.split(".")
            base = base[: len(base) - node.level + 1]
            module = ".".join(base + ([node.module] if node.module else []))
        else:
            module = node.module or ""
        for alias in node.names:  # `from gateway import derive` imports gateway.derive
            self.found.append((f"{module}.{alias.name}", node.lineno, self.depth > 0))


def imports(root: Path) -> tuple[list[Edge], dict[str, list[str]]]:
    """The gateway-internal edges, and each module's imports of anything (top names)."""
    known = modules(root)
    edges, external = [], {}
    for name, path in known.items():
        visitor = _Imports(name, path.name == "__init__.py")
        visitor.visit(ast.parse(path.read_text(encoding="utf-8"), str(path)))
        external[name] = sorted({d for d, _, _ in visitor.found})
        for dotted, line, local in visitor.found:
            target = _resolve(dotted, known) if dotted.startswith("gateway") else None
            if target is not None and target != name:
                edges.append(Edge(name, target, line, local))
    return edges, external


def rank(module: str) -> int:
    for prefix in sorted(RANK, key=len, reverse=True):
        if module == prefix or module.startswith(prefix + "."):
            return RANK[prefix]
    raise LookupError(module)


def upward(edges: list[Edge]) -> set[tuple[str, str]]:
    return {(e.importer, e.imported) for e in edges
            if e.imported not in FLOOR and rank(e.imported) > rank(e.importer)}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def module_graph(edges: list[Edge]) -> dict[str, set[str]]:
    graph: dict[str, set[str]] = {}
    for e in edges:
        if not e.local:
            graph.setdefault(e.importer, set()).add(e.imported)
    return graph


def reaches(graph: dict[str, set[str]], start: str, goal: str) -> bool:
    seen, todo = set(), [start]
    while todo:
        v = todo.pop()
        if v == goal:
            return True
        if v not in seen:
            seen.add(v)
            todo += graph.get(v, ())
    return False


# -- the rules, on the real tree --------------------------------------------------------------

EDGES, EXTERNAL = imports(ROOT)


def test_every_module_is_in_a_layer() -> None:
    lost = []
    for name, path in modules(ROOT).items():
        try:
            rank(name)
        except LookupError:
            lost.append(name)
        if path.parent == ROOT / "gateway" and path.stem not in (
                "__init__", "__main__", "analysis", "cli", "config", "upload", "event_loop"):
            lost.append(name)  # a new top-level module: put it in a layer package
    assert lost == []


def test_the_graph_is_read() -> None:
    """The parser finds the imports (a broken walk would pass every rule below)."""
    pairs = {(e.importer, e.imported) for e in EDGES}
    assert ("gateway.http.app", "gateway.core.service") in pairs
    assert ("gateway.cli", "gateway.devtools.sim") in pairs  # inside a function
    assert len(pairs) > 100


def test_no_import_cycle_at_module_level() -> None:
    assert cycles(module_graph(EDGES)) == [], "break it, or import inside the function and list it"


def test_the_cycle_breakers_are_the_documented_ones() -> None:
    """A function-local import that would close a cycle is listed in CYCLE_BREAKERS."""
    graph = module_graph(EDGES)
    closing = {(e.importer, e.imported) for e in EDGES
               if e.local and reaches(graph, e.imported, e.importer)}
    assert closing == set(CYCLE_BREAKERS)


@pytest.mark.parametrize("layer", NO_AIOHTTP)
def test_core_and_store_never_import_aiohttp(layer: str) -> None:
    offenders = {m: [d for d in ds if d == "aiohttp" or d.startswith("aiohttp.")]
                 for m, ds in EXTERNAL.items() if m == layer or m.startswith(layer + ".")}
    assert {m: ds for m, ds in offenders.items() if ds} == {}


def test_imports_point_down_the_layers() -> None:
    """An upward import that is not in UPWARD (with a reason) fails here."""
    new = sorted(upward(EDGES) - set(UPWARD))
    where = [f"{e.importer} -> {e.imported} (line {e.line})" for e in EDGES
             if (e.importer, e.imported) in new]
    assert where == [], "upward imports not in UPWARD (move the code, or list it with a reason)"


def test_the_allow_list_has_no_stale_entry() -> None:
    assert sorted(set(UPWARD) - upward(EDGES)) == []


def test_the_floor_imports_nothing_above_it() -> None:
    allowed = {pair for pair in UPWARD if pair[0] in FLOOR}
    above = {(e.importer, e.imported) for e in EDGES
             if e.importer in FLOOR and e.importer != "gateway" and rank(e.imported) > 0}
    assert above - allowed == set()
    assert {e.imported for e in EDGES if e.importer == "gateway.core.errors"} == set()


LONG = 400  # lines; a longer module says why in its docstring ("Long because: ...")


def too_long_without_a_reason(root: Path) -> list[str]:
    found = []
    for name, path in modules(root).items():
        text = path.read_text(encoding="utf-8")
        doc = ast.get_docstring(ast.parse(text)) or ""
        if text.count("\n") > LONG and "Long because:" not in doc:
            found.append(f"{name} ({text.count(chr(10))} lines)")
    return found


def test_a_long_module_says_why_in_its_docstring() -> None:
    assert too_long_without_a_reason(ROOT) == []


# -- the checker catches what it is for (on a copy of the package) ----------------------------

@pytest.fixture
def copy(tmp_path: Path) -> Path:
    shutil.copytree(ROOT / "gateway", tmp_path / "gateway",
                    ignore=shutil.ignore_patterns("__pycache__"))
    return tmp_path


def _append(path: Path, line: str) -> None:
    path.write_text(path.read_text(encoding="utf-8") + "\n" + line + "\n", encoding="utf-8")


def test_a_new_upward_import_is_caught(copy: Path) -> None:
    _append(copy / "gateway" / "core" / "quota.py", "from gateway.http.state import STATE")
    edges, _ = imports(copy)
    assert upward(edges) - upward(EDGES) == {("gateway.core.quota", "gateway.http.state")}


def test_a_new_upward_import_inside_a_function_is_caught(copy: Path) -> None:
    _append(copy / "gateway" / "store" / "base.py",
            "def f() -> None:\n    from gateway.ops import server  # noqa")
    edges, _ = imports(copy)
    assert upward(edges) - upward(EDGES) == {("gateway.store.base", "gateway.ops.server")}


def test_a_new_cycle_is_caught(copy: Path) -> None:
    _append(copy / "gateway" / "core" / "envelope.py", "import gateway.core.service")
    edges, _ = imports(copy)
    assert any("gateway.core.envelope" in c for c in cycles(module_graph(edges)))


def test_aiohttp_in_the_core_is_caught(copy: Path) -> None:
    _append(copy / "gateway" / "core" / "derive.py", "from aiohttp import web")
    _, external = imports(copy)
    assert "aiohttp.web" in external["gateway.core.derive"]


def test_a_long_module_without_a_reason_is_caught(copy: Path) -> None:
    _append(copy / "gateway" / "core" / "quota.py", "\n" * LONG)
    assert too_long_without_a_reason(copy) == [f"gateway.core.quota ({_lines(copy)} lines)"]


def _lines(copy: Path) -> int:
    return (copy / "gateway" / "core" / "quota.py").read_text(encoding="utf-8").count("\n")


# The test files that try the repository as a whole (its docs, layout, container, bench),
# beside the folders that mirror the packages.
REPOSITORY_TESTS = {"test_bench.py", "test_compose_sentinel.py", "test_container.py",
                    "test_docs.py", "test_layers.py", "test_readme.py", "test_soak.py"}


def test_the_tests_mirror_the_packages() -> None:
    """tests/<layer>/ for each package of gateway/ (tests/config/ for the floor's config);
    a test file elsewhere is one of the repository-wide ones."""
    tests = ROOT / "tests"
    packages = {p.name for p in (ROOT / "gateway").iterdir() if (p / "__init__.py").exists()}
    folders = {p.parent.name for p in tests.glob("*/test_*.py")}
    assert folders <= packages | {"config"}, folders - packages
    assert {p.name for p in tests.glob("test_*.py")} == REPOSITORY_TESTS


def test_tests_share_helpers_through_tests_support_only() -> None:
    """Fixtures come from conftest.py by name; a helper is imported from tests.support, never
    from conftest or from another test file."""
    found = []
    for path in sorted((ROOT / "tests").rglob("*.py")):
        if "node_modules" in path.parts:
            continue
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            names = ([node.module or ""] if isinstance(node, ast.ImportFrom)
                     else [a.name for a in node.names] if isinstance(node, ast.Import) else [])
            for name in names:
                ours = name == "conftest" or name.startswith(("tests.", "test_"))
                last = name.rpartition(".")[2]
                if ours and (last == "conftest" or last.startswith("test_")):
                    found.append(f"{path.relative_to(ROOT)}: {name}")
    assert found == []
