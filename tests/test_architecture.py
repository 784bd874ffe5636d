"""The house rules of the package, checked on its source (issue 15; docs/architecture.md).

Every module of `gemmascope_jax` (and of `pallas_kernels`, the kernel package beside it) is
parsed with `ast`; nothing is imported. Imports are read wherever they are written: at module
level, inside functions (the code imports lazily, to keep `import gemmascope_jax` light), under
`if TYPE_CHECKING:`, and `importlib.import_module("literal")`. From them:

(a) no import cycles between modules: a cycle is reported as `a -> b -> ... -> a`, with the line
    of each import;
(b) no module imports from a higher floor (`FLOORS` below); on a shared floor only the pairs in
    `SAME_FLOOR` may import each other, one way.

Known violations that cannot be fixed here are listed in `ALLOWED`, each with its reason; an
entry that no longer matches an import fails the test, so the list only shrinks.
"""

from __future__ import annotations

import ast
from collections import defaultdict
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("gemmascope_jax", "pallas_kernels")
FACADE = "gemmascope_jax"  # gemmascope_jax/__init__.py: the `import gemmascope_jax as gsj` API

# The floors, lowest first: a module may import from its own floor or any lower one, never from
# a higher one. The key is the top-level part of `gemmascope_jax` (a subpackage or a module).
FLOORS = {
    "_version": 0,  # the version string, readable from anywhere (formats.native records it)
    "sharding": 0,  # device meshes and partition specs; imports no other part
    "io": 0,  # safetensors read/write; atomic output folders/files that refuse to replace what
    # we did not make; JSON files and FormatError. Imports no other part
    "pallas_kernels": 0,  # the sparse-decode kernels (a top-level package); never gemmascope_jax
    "gemma3": 1,  # the model, named activation sites, tokenizer and chat, generate, loading
    "dictionaries": 2,  # SAE / transcoder / skip-transcoder / CLT / crosscoder; registry KINDS
    "formats": 3,  # dictionary folders: gemma-scope-2, saelens, circuit-tracer, native
    "data": 4,  # text sources, corpora, packing, activation stream and cache, rollouts
    "evals": 5,  # metrics, splice, absorption, SAEBench, quality cards, synthetic truth
    "training": 5,  # run config, losses, optimizer, train step, trainer, checkpoints
    "analysis": 5,  # inspection, steering, refusal, CoT, attribution graphs, dashboard
    "cli": 6,  # `gemmascope-jax VERB`: parses arguments, calls the floors below
    FACADE: 6,  # gemmascope_jax/__init__.py: re-exports for users; no library module uses it
}

# Pairs on one floor that may import each other, one way (importer, imported). Any other import
# between two different parts of one floor is a violation.
SAME_FLOOR = {
    ("training", "evals"),  # a run evaluates its dictionaries and writes their quality cards
    (
        "evals",
        "analysis",
    ),  # a quality card scores attribution graphs (analysis.attribution.graph_quality)
    ("cli", FACADE),  # the `demo` verb uses the facade, as a user would
}
# analysis imports neither evals nor training; training does not import analysis.

# Known violations: (importer module, imported module) -> why it is allowed. These edges are
# skipped by both checks (an allowed edge cannot close a cycle either).
ALLOWED: dict[tuple[str, str], str] = {}


def _module_name(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules() -> dict[str, Path]:
    found = {}
    for package in PACKAGES:
        for path in sorted((REPO / package).rglob("*.py")):
            found[_module_name(path)] = path
    return found


def _ours(name: str) -> bool:
    return name.split(".")[0] in PACKAGES


def _resolve(name: str, symbol: str | None, modules: dict[str, Path]) -> str:
    """The module an import binds: `from a.b import c` is module a.b.c when that exists (a
    submodule), else a.b (a name defined in a/b or its __init__)."""
    if symbol is not None and f"{name}.{symbol}" in modules:
        return f"{name}.{symbol}"
    while name not in modules and "." in name:  # `import a.b.Missing` -> a.b
        name = name.rsplit(".", 1)[0]
    return name


def _imports(module: str, path: Path, modules: dict[str, Path]) -> list[tuple[str, int]]:
    """(imported module, line) for every import of our packages in `path`."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(_resolve(a.name, None, modules), node.lineno) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            name = node.module or ""
            if node.level:  # relative: from . import x, from ..y import z
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                name = ".".join(base + ([name] if name else []))
            out += [(_resolve(name, a.name, modules), node.lineno) for a in node.names]
        elif (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Attribute | ast.Name)
            and getattr(node.func, "attr", getattr(node.func, "id", None)) == "import_module"
            and node.args
            and isinstance(node.args[0], ast.Constant)
            and isinstance(node.args[0].value, str)
        ):
            out.append((_resolve(node.args[0].value, None, modules), node.lineno))
    return [(target, line) for target, line in out if _ours(target) and target != module]


@pytest.fixture(scope="module")
def graph() -> dict[str, dict[str, int]]:
    """module -> {imported module: first line}, over both packages."""
    modules = _modules()
    edges: dict[str, dict[str, int]] = defaultdict(dict)
    for module, path in modules.items():
        edges[module]  # every module is a node, even one that imports nothing of ours
        for target, line in _imports(module, path, modules):
            edges[module].setdefault(target, line)
    return dict(edges)


def _part(module: str) -> str:
    """The FLOORS key of a module."""
    parts = module.split(".")
    if parts[0] != "gemmascope_jax":
        return parts[0]
    return parts[1] if len(parts) > 1 else FACADE


def _where(graph, module: str, target: str) -> str:
    path = _modules()[module].relative_to(REPO)
    return f"{path}:{graph[module][target]}"


def test_every_part_has_a_floor(graph):
    missing = sorted({_part(m) for m in graph} - set(FLOORS))
    assert not missing, (
        f"new top-level part(s) {missing}: add a line to FLOORS in tests/test_architecture.py "
        "(and to the table in docs/architecture.md)"
    )


def test_allowed_exceptions_are_still_needed(graph):
    stale = [edge for edge in ALLOWED if edge[1] not in graph.get(edge[0], {})]
    assert not stale, f"these imports are gone; remove them from ALLOWED: {stale}"


def test_no_import_cycles(graph):
    edges = {m: sorted(t for t in ts if (m, t) not in ALLOWED) for m, ts in graph.items()}
    # Tarjan's strongly connected components, iteratively (no recursion limit to worry about)
    index, low, on_stack, stack, components = {}, {}, set(), [], []
    for root in sorted(edges):
        if root in index:
            continue
        work = [(root, iter(edges[root]))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(edges.get(child, ()))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1:
                    components.append(set(component))
    cycles = [_one_cycle(graph, edges, component) for component in components]
    assert not cycles, "import cycle(s):\n" + "\n".join(cycles)


def _one_cycle(graph, edges, component: set[str]) -> str:
    """One cycle through the component, as `a (file:line) -> b (file:line) -> ... -> a`."""
    start = min(component)
    # breadth-first from start back to start, staying inside the component
    previous = {}
    frontier = [start]
    while frontier and start not in previous:
        following = []
        for node in frontier:
            for child in edges[node]:
                if child in component and child not in previous:
                    previous[child] = node
                    following.append(child)
        frontier = following
    path = [start]
    node = previous[start]
    while node != start:
        path.append(node)
        node = previous[node]
    path.append(start)
    path.reverse()
    return (
        " -> ".join(f"{a} ({_where(graph, a, b)})" for a, b in zip(path, path[1:], strict=False))
        + f" -> {start}"
    )


def test_no_import_from_a_higher_floor(graph):
    problems = []
    for module, targets in sorted(graph.items()):
        for target in sorted(targets):
            if (module, target) in ALLOWED:
                continue
            here, there = _part(module), _part(target)
            if here == there or there not in FLOORS or here not in FLOORS:
                continue  # inside one part; unknown parts fail test_every_part_has_a_floor
            if FLOORS[there] > FLOORS[here]:
                problems.append(
                    f"{module} (floor {FLOORS[here]}) imports {target} (floor {FLOORS[there]}) "
                    f"at {_where(graph, module, target)}"
                )
            elif FLOORS[there] == FLOORS[here] and (here, there) not in SAME_FLOOR:
                problems.append(
                    f"{module} imports {target} at {_where(graph, module, target)}: {here} and "
                    f"{there} share floor {FLOORS[here]} and {here} may not import {there} "
                    f"(SAME_FLOOR)"
                )
    assert not problems, "imports that go up the floors:\n" + "\n".join(problems)


def test_the_checks_see_lazy_imports(graph):
    """The parser reads function-level imports (most cross-floor imports are lazy)."""
    assert "gemmascope_jax.formats.sets" in graph["gemmascope_jax.formats"]  # inside a function
    assert "gemmascope_jax.analysis" in graph[FACADE]  # importlib.import_module("...")
    assert "gemmascope_jax.gemma3.tokenizer" in graph["gemmascope_jax.gemma3.generate"]
