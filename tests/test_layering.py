"""The import graph of pairforge's own modules, read with ``ast`` from the source (every ``import`` and ``from``
statement, those inside functions included): no cycles, and the layering rule of the design card holds.

    schemas                        imports no other project package
    generators, annotators, store  import only schemas
    flows                          imports anything
    bench                          imports nothing from tests
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
PACKAGES = ("schemas", "generators", "annotators", "store", "flows", "bench")
# What each package may import from the project besides itself; None: anything.
ALLOWED = {"schemas": set(), "generators": {"schemas"}, "annotators": {"schemas"}, "store": {"schemas"},
           "flows": None, "bench": None, "tests": None}
FORBIDDEN_EVERYWHERE_BUT_TESTS = {"tests"}


def _module_name(path: Path) -> str:
    rel = path.relative_to(REPO).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def project_modules() -> dict[str, Path]:
    """{dotted module name: file} for every .py file of the project's packages and of tests/ (which is on sys.path
    under pytest: its modules are importable both as ``tests.x`` and as ``x``)."""
    mods = {}
    for pkg in PACKAGES + ("tests",):
        for p in sorted((REPO / pkg).rglob("*.py")):
            mods[_module_name(p)] = p
    return mods


def _resolve(name: str, modules: dict[str, Path]) -> str | None:
    """The longest project module that ``name`` is or lies in (``store.read.x`` -> ``store.read``)."""
    parts = name.split(".")
    while parts:
        cand = ".".join(parts)
        if cand in modules:
            return cand
        parts.pop()
    return None


def imports_of(module: str, path: Path, modules: dict[str, Path]) -> dict[str, int]:
    """{imported project module: first line} for every import statement of ``path``, wherever it stands."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found: dict[str, int] = {}

    def add(name: str | None, line: int) -> None:
        if name is None:
            return
        target = _resolve(name, modules)
        if target is None and module.startswith("tests.") and name.split(".")[0] in {
                m.split(".")[1] for m in modules if m.startswith("tests.")}:
            target = _resolve(f"tests.{name}", modules)  # tests/ is on sys.path: ``import tiny_models``
        if target is not None and target != module:
            found.setdefault(target, line)

    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                add(a.name, node.lineno)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".") if package else []
                base = base[:len(base) - (node.level - 1)] if node.level > 1 else base
                prefix = ".".join(base + ([node.module] if node.module else []))
            else:
                prefix = node.module or ""
            for a in node.names:  # ``from store import read`` imports the submodule store.read
                sub = f"{prefix}.{a.name}"
                add(sub if _resolve(sub, modules) == sub else prefix, node.lineno)
    return found


def import_graph() -> dict[str, dict[str, int]]:
    modules = project_modules()
    return {m: imports_of(m, p, modules) for m, p in modules.items()}


def cycles(graph: dict[str, dict[str, int]]) -> list[list[str]]:
    """The strongly connected components with more than one module (or a module importing itself), sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[list[str]] = []
    counter = [0]

    def visit(v: str) -> None:  # Tarjan, iterative enough for a few hundred modules
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, {}):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1 or v in graph.get(v, {}):
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return sorted(out)


def _package(module: str) -> str:
    return module.split(".")[0]


def layering_breaches(graph: dict[str, dict[str, int]]) -> list[str]:
    out = []
    for mod, deps in sorted(graph.items()):
        pkg = _package(mod)
        allowed = ALLOWED.get(pkg)
        for dep, line in sorted(deps.items()):
            dep_pkg = _package(dep)
            if dep_pkg == pkg:
                continue
            if dep_pkg in FORBIDDEN_EVERYWHERE_BUT_TESTS or (allowed is not None and dep_pkg not in allowed):
                out.append(f"{mod} (line {line}) imports {dep}")
    return out


def _describe(comp: list[str], graph: dict[str, dict[str, int]]) -> str:
    edges = [f"{a} -> {b}" for a in comp for b in sorted(graph[a]) if b in comp]
    return f"{{{', '.join(comp)}}} via {'; '.join(edges)}"


# ----------------------------------------------------------------------------------------------------------- tests
def test_the_walker_sees_imports_inside_functions_relative_imports_and_from_imports(tmp_path):
    modules = {"store": REPO / "store/__init__.py", "store.read": REPO / "store/read.py",
               "schemas": REPO / "schemas/__init__.py", "schemas.errors": REPO / "schemas/errors.py",
               "flows": REPO / "flows/__init__.py", "flows.cli": REPO / "flows/cli.py"}
    src = tmp_path / "m.py"
    src.write_text("import os\nfrom . import read\n\ndef f():\n    from schemas.errors import SpecError\n"
                   "    import flows.cli as c\n    from flows import cli\n")
    got = imports_of("store.export", src, modules)
    assert got == {"store.read": 2, "schemas.errors": 5, "flows.cli": 6}
    g = {"a": {"b": 1}, "b": {"c": 1}, "c": {"a": 1}, "d": {"a": 1}, "e": {"e": 1}}
    assert cycles(g) == [["a", "b", "c"], ["e"]]
    assert layering_breaches({"store.x": {"flows.cli": 3, "schemas.a": 1}, "bench.y": {"tests.tiny": 1},
                              "flows.z": {"store.x": 1}, "schemas.a": {"store.x": 2}, "tests.t": {"flows.z": 1}}) == [
        "bench.y (line 1) imports tests.tiny", "schemas.a (line 2) imports store.x", "store.x (line 3) imports flows.cli"]


def test_the_graph_covers_every_package_and_finds_known_edges():
    g = import_graph()
    assert {_package(m) for m in g} == set(PACKAGES) | {"tests"}
    assert "store.read" in g["store"]  # ``from store.read import ...`` in store/__init__.py
    assert "schemas.errors" in g["flows.cli"]  # an import at module level
    assert "flows.pipeline" in g["flows.cli"]  # an import inside a command function


def _schemas_cycles() -> list[list[str]]:
    return [c for c in cycles(import_graph()) if all(_package(m) == "schemas" for m in c)]


def test_no_import_cycles_outside_schemas():
    g = import_graph()
    bad = [c for c in cycles(g) if not all(_package(m) == "schemas" for m in c)]
    assert not bad, "import cycles: " + " | ".join(_describe(c, g) for c in bad)


def test_no_import_cycles_inside_schemas():
    g = import_graph()
    bad = _schemas_cycles()
    assert not bad, "import cycles: " + " | ".join(_describe(c, g) for c in bad)


def test_layering_rule_holds():
    breaches = layering_breaches(import_graph())
    assert not breaches, "layering breaches: " + "; ".join(breaches)
