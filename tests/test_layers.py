"""The package's imports go only downward (DESIGN.md): no circle, siblings apart, the top floor on top.

Every ``import`` is read, function-level ones too (a function-level import that hides a
circle is a circle). ``from vi_lab import sub`` counts as a dependency on ``vi_lab.sub``;
the package's ``__init__`` is the public facade above every floor and is left out.
Besides circles, two rules of the floor plan are checked along every import chain
(direct or through other modules): models and guides are siblings, so neither reaches
the other; and only the top floor (the ``vi-lab`` command, the examples' plumbing)
reaches the top floor.
"""

import ast
from collections import deque
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "vi_lab"

#: circles allowed for now: none (the last one, infer <-> estimators, went when the objective
#: layer moved into vi_lab.objectives). A circle not listed fails the test.
KNOWN: set[frozenset[str]] = set()


#: the top floor: the `vi-lab` command (cli, its subcommands, ``python -m vi_lab``) and the
#: examples' plumbing (runs). Nothing else reaches it; a new top-floor module goes here.
TOP_FLOOR = ("vi_lab.__main__", "vi_lab.cli", "vi_lab.commands", "vi_lab.runs")
#: packages on one floor that never reach each other: p and q (DESIGN.md)
SIBLINGS = (("vi_lab.models", "vi_lab.guides"),)


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


def within(module: str, packages) -> bool:
    """Whether ``module`` is one of ``packages`` (a name or a tuple) or inside one."""
    packages = (packages,) if isinstance(packages, str) else packages
    return any(module == p or module.startswith(p + ".") for p in packages)


def import_chain(graph: dict[str, set[str]], start: str, target) -> list[str] | None:
    """The shortest import chain ``start -> ... -> t`` with ``target(t)`` true, else None (breadth first)."""
    parent, queue = {start: None}, deque([start])
    while queue:
        v = queue.popleft()
        for w in sorted(graph.get(v, ())):
            if w in parent:
                continue
            parent[w] = v
            if target(w):
                chain = [w]
                while parent[chain[-1]] is not None:
                    chain.append(parent[chain[-1]])
                return chain[::-1]
            queue.append(w)
    return None


def floor_violations(graph: dict[str, set[str]]) -> list[str]:
    """Import chains that break the floor plan: a sibling reaching its sibling, the core reaching the top floor."""
    out = []
    for module in sorted(graph):
        for a, b in SIBLINGS + tuple((b, a) for a, b in SIBLINGS):
            if within(module, a):
                chain = import_chain(graph, module, lambda m: within(m, b))
                if chain:
                    out.append(f"{' -> '.join(chain)}: {a} and {b} are siblings and never import each other")
        if not within(module, TOP_FLOOR):
            chain = import_chain(graph, module, lambda m: within(m, TOP_FLOOR))
            if chain:
                out.append(f"{' -> '.join(chain)}: only the top floor {TOP_FLOOR} imports {chain[-1]}")
    return out


def test_no_new_import_circles():
    circles = strongly_connected(import_graph())
    new = [sorted(c) for c in circles if c not in KNOWN]
    assert not new, f"import circles: {new}"
    gone = [sorted(c) for c in KNOWN if c not in circles]
    assert not gone, f"these circles are gone: take them off KNOWN: {gone}"


def test_the_circle_finder_finds_a_circle():
    assert strongly_connected({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [frozenset({"a", "b", "c"})]


def test_models_and_guides_stay_apart_and_only_the_top_floor_reaches_it():
    violations = floor_violations(import_graph())
    assert not violations, "imports against the floor plan:\n" + "\n".join(violations)


def test_the_floor_checker_finds_indirect_violations():
    graph = {"vi_lab.models.cvae": {"vi_lab.labels"}, "vi_lab.labels": {"vi_lab.guides.base"},
             "vi_lab.guides.base": set(), "vi_lab.gaps": {"vi_lab.reporting"}, "vi_lab.reporting": {"vi_lab.runs"},
             "vi_lab.runs": {"vi_lab.infer"}, "vi_lab.infer": set(), "vi_lab.cli": {"vi_lab.runs"}}
    assert floor_violations(graph) == [
        "vi_lab.gaps -> vi_lab.reporting -> vi_lab.runs: only the top floor "
        f"{TOP_FLOOR} imports vi_lab.runs",
        "vi_lab.models.cvae -> vi_lab.labels -> vi_lab.guides.base: vi_lab.models and vi_lab.guides are siblings "
        "and never import each other",
        f"vi_lab.reporting -> vi_lab.runs: only the top floor {TOP_FLOOR} imports vi_lab.runs",
    ]
