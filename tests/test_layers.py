"""The package's imports form no circle: modules import only from floors below them (DESIGN.md).

Every ``import`` is read, function-level ones too (a function-level import that hides a
circle is a circle). ``from vi_lab import sub`` counts as a dependency on ``vi_lab.sub``;
the package's ``__init__`` is the public facade above every floor and is left out.
"""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "vi_lab"

#: circles allowed for now: none (the last one, infer <-> estimators, went when the objective
#: layer moved into vi_lab.objectives). A circle not listed fails the test.
KNOWN: set[frozenset[str]] = set()


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph() -> dict[str, set[str]]:
    modules = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph = {}
    for name, path in modules.items():
        deps = set()
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                deps |= {a.name for a in node.names}
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    up = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join(up + ([node.module] if node.module else []))
                subs = {f"{base}.{a.name}" for a in node.names if f"{base}.{a.name}" in modules}
                deps |= subs if subs and len(subs) == len(node.names) else {base} | subs
        graph[name] = {d for d in deps if d in modules and d not in (name, "vi_lab")}
    graph.pop("vi_lab")
    return graph


def strongly_connected(graph: dict[str, set[str]]) -> list[frozenset[str]]:
    """Tarjan's algorithm: the groups of modules that reach each other (the circles)."""
    index, low, stack, on, out = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = set()
            while True:
                w = stack.pop()
                on.discard(w)
                group.add(w)
                if w == v:
                    break
            if len(group) > 1:
                out.append(frozenset(group))

    for v in graph:
        if v not in index:
            visit(v)
    return out


def test_no_new_import_circles():
    circles = strongly_connected(import_graph())
    new = [sorted(c) for c in circles if c not in KNOWN]
    assert not new, f"import circles: {new}"
    gone = [sorted(c) for c in KNOWN if c not in circles]
    assert not gone, f"these circles are gone: take them off KNOWN: {gone}"


def test_the_circle_finder_finds_a_circle():
    assert strongly_connected({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [frozenset({"a", "b", "c"})]
