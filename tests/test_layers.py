"""The layers hold (docs/architecture.md, "The layers"): imports point down, no cycles.

Every module under gateway/ is parsed (never imported) and each import, also those inside
functions, is an edge of the graph. The order, top first:

    devtools > ops > http > core > upstream > store > config

``gateway/config.py`` and ``gateway/core/errors.py`` import nothing above them and may be
imported from every layer. An import that points up is an error unless it is in ``UPWARD``
below, with its reason; an entry that is no longer needed is an error too, so the list stays
the truth. ``gateway/core/`` and ``gateway/store/`` never import aiohttp.
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
    "gateway.__main__": 7,  # `python -m gateway`: runs the CLI
    "gateway.devtools": 6,
    "gateway.ops": 5,
    "gateway.http": 4,
    "gateway.core": 3,
    "gateway.upstream": 2,
    "gateway.store": 1,
    "gateway.config": 0,
    "gateway": 0,  # gateway/__init__.py: the version only
}
# May be imported from every layer (each imports no module above it: checked below).
FLOOR = {"gateway.config", "gateway.core.errors", "gateway"}
NO_AIOHTTP = ("gateway.core", "gateway.store")

# The upward imports that remain (importer, imported): one reason each. Issue 11's open edges.
UPWARD: dict[tuple[str, str], str] = {
    # The metrics are recorded into from below (the doc's open edge: pass them in behind a
    # protocol, or move them below the core).
    ("gateway.core.service", "gateway.ops.metrics"): "the service counts hits, misses, derivations",
    ("gateway.upstream", "gateway.ops.metrics"): "the client times and counts upstream calls",
    ("gateway.http.state", "gateway.ops.metrics"): "the process state holds the Metrics object",
    ("gateway.http.app", "gateway.ops.metrics"): "the app creates the Metrics it serves",
    ("gateway.http.app", "gateway.ops.scrape"): "GET /metrics renders the page scrape builds",
    ("gateway.http.app", "gateway.ops.notify"): "the background loop runs the Notifier",
    # The access log and the usage figures are written by ops and read by the handlers.
    ("gateway.http.api", "gateway.ops.logs"): "the handler writes its access-log line",
    ("gateway.http.team_status", "gateway.ops.logs"): "GET /team writes its access-log line",
    ("gateway.http.team_status", "gateway.ops.usage"): "GET /team shows the team's usage report",
    ("gateway.http.admin", "gateway.ops.usage"): "the admin API and status page show usage",
    ("gateway.core.keys", "gateway.ops.usage"): "key listings format times with usage.iso_utc",
    # Reload is signalled through the server (inside handle_reload: it also breaks the cycle
    # admin -> server -> app -> admin).
    ("gateway.http.admin", "gateway.ops.server"): "POST /admin/reload reloads via the server",
    # The uploaded file type lives with the parser (the doc: UploadedFile to core/).
    ("gateway.core.service", "gateway.http.form"): "the service reads UploadedFile",
    ("gateway.upstream", "gateway.http.form"): "the client forwards UploadedFile",
    # The breaker is a leaf of the core that only the upstream client calls.
    ("gateway.upstream", "gateway.core.breaker"): "the client asks the breaker before each call",
    # server.event_loop is validated against the loops ops knows (a leaf: imports no gateway).
    ("gateway.config", "gateway.ops.event_loop"): "server.event_loop's allowed values",
    # `gateway sim` and `gateway demo` (inside their commands: `gateway serve` never loads them).
    ("gateway.ops.cli", "gateway.devtools.sim"): "the `gateway sim` command",
    ("gateway.ops.cli", "gateway.devtools.demo"): "the `gateway demo` command",
}

# Imports inside a function that close a cycle of module-level imports: the documented way to
# break one. Each must be here (with its reason); the cycle check leaves them out.
CYCLE_BREAKERS: dict[tuple[str, str], str] = {
    ("gateway.http.admin", "gateway.ops.server"): "server imports app, which imports admin",
    ("gateway.ops.server", "gateway.ops.supervisor"): "the supervisor imports server's Options",
}


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
                "__init__", "__main__", "config", "upstream"):
            lost.append(name)  # a new top-level module: put it in a layer package
    assert lost == []


def test_the_graph_is_read() -> None:
    """The parser finds the imports (a broken walk would pass every rule below)."""
    pairs = {(e.importer, e.imported) for e in EDGES}
    assert ("gateway.http.app", "gateway.core.service") in pairs
    assert ("gateway.ops.cli", "gateway.devtools.sim") in pairs  # inside a function
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
            "def f() -> None:\n    from gateway.ops import metrics  # noqa")
    edges, _ = imports(copy)
    assert upward(edges) - upward(EDGES) == {("gateway.store.base", "gateway.ops.metrics")}


def test_a_new_cycle_is_caught(copy: Path) -> None:
    _append(copy / "gateway" / "core" / "envelope.py", "import gateway.core.service")
    edges, _ = imports(copy)
    assert any("gateway.core.envelope" in c for c in cycles(module_graph(edges)))


def test_aiohttp_in_the_core_is_caught(copy: Path) -> None:
    _append(copy / "gateway" / "core" / "derive.py", "from aiohttp import web")
    _, external = imports(copy)
    assert "aiohttp.web" in external["gateway.core.derive"]
