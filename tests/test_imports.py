"""No import cycles inside the gspo package, and the library does not import its demo task for rewards.

The graph is read from the source (ast), not from a running interpreter, so an import inside a function
counts as much as one at the top: a cycle closed by a function-local import only moves the failure to the
moment that function first runs. Edges:

* `import a.b` and `from a.b import c` -> module a.b; when a.b.c is itself a module (`from gspo import
  checkpoint`), -> a.b.c instead of the package.
* A package's own `__init__` is not added as a dependency of its submodules (importing gspo.engines.hf runs
  gspo/engines/__init__.py first): a package that re-exports its submodules while they import each other
  is the ordinary layout, not a cycle.
"""

from __future__ import annotations

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src"


def _module_name(path: Path, src: Path) -> str:
    parts = list(path.relative_to(src).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph(src: Path = SRC) -> dict[str, set[str]]:
    """{module: the gspo modules its source imports}, every import statement included."""
    files = {_module_name(p, src): p for p in sorted(src.rglob("*.py"))}
    graph: dict[str, set[str]] = {}
    for name, path in files.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        deps: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), filename=str(path))):
            if isinstance(node, ast.Import):
                deps.update(alias.name for alias in node.names if alias.name in files)
            elif isinstance(node, ast.ImportFrom):
                if node.level:  # relative: from . import x, from ..a import b
                    base_parts = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                    base = ".".join(base_parts + ([node.module] if node.module else []))
                else:
                    base = node.module or ""
                subs = [f"{base}.{alias.name}" for alias in node.names if f"{base}.{alias.name}" in files]
                deps.update(subs)
                if len(subs) < len(node.names) and base in files:
                    deps.add(base)
        deps.discard(name)
        graph[name] = deps
    return graph


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Every strongly connected component with more than one module (Tarjan), each as a sorted list."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    cycles: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return cycles


def reachable(graph: dict[str, set[str]], start: str) -> set[str]:
    seen, todo = set(), [start]
    while todo:
        for w in graph.get(todo.pop(), ()):
            if w not in seen:
                seen.add(w)
                todo.append(w)
    return seen


def _describe(graph, cycle) -> str:
    return "\n".join(f"  {m} -> {sorted(graph[m] & set(cycle))}" for m in cycle)


def test_no_import_cycles_in_gspo():
    graph = import_graph()
    assert "gspo.trainer" in graph and "gspo.tasks.tiny_model" in graph  # the scan found the package
    cycles = find_cycles(graph)
    assert not cycles, "import cycles in src/gspo:\n" + "\n".join(_describe(graph, c) for c in cycles)


def test_rewards_do_not_import_the_demo_task():
    graph = import_graph()
    demo = {m for m in reachable(graph, "gspo.rewards") if m == "gspo.tasks" or m.startswith("gspo.tasks.")}
    assert not demo, f"gspo.rewards reaches the demo task: {sorted(demo)}"


def test_the_checker_sees_function_local_imports_and_cycles(tmp_path):
    """The scanner itself: a cycle closed only by an import inside a function, and `from pkg import module`."""
    pkg = tmp_path / "p"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from p import b\n")
    (pkg / "b.py").write_text("def f():\n    from p.c import g\n    return g\n")
    (pkg / "c.py").write_text("import p.a\n\ndef g():\n    pass\n")
    (pkg / "d.py").write_text("from . import a\nfrom .a import x\n")
    graph = import_graph(tmp_path)
    assert graph["p.a"] == {"p.b"} and graph["p.b"] == {"p.c"} and graph["p.c"] == {"p.a"}
    assert graph["p.d"] == {"p.a"}
    assert find_cycles(graph) == [["p.a", "p.b", "p.c"]]
    (pkg / "b.py").write_text("def f():\n    pass\n")
    assert find_cycles(import_graph(tmp_path)) == []
