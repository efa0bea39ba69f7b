"""No import circles inside the trainer package, function-local imports included.

A circle hidden in a function-local import still ties the modules together (neither can be read,
tested or moved alone) and breaks as soon as one of the imports moves to the top of its file.
Read from the source with `ast`, so nothing is imported.
"""

from __future__ import annotations

import ast
import os

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def module_imports(package: str) -> dict[str, set[str]]:
    """{module: the package's modules it imports}, every import statement counted."""
    paths = {}
    for directory, _, files in os.walk(os.path.join(REPO, package)):
        for name in files:
            if name.endswith(".py"):
                path = os.path.join(directory, name)
                module = os.path.relpath(path, REPO)[: -len(".py")].replace(os.sep, ".")
                paths[module.removesuffix(".__init__")] = path
    graph = {}
    for module, path in paths.items():
        with open(path) as f:
            tree = ast.parse(f.read())
        package_of = module if path.endswith("__init__.py") else module.rpartition(".")[0]
        found = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                found.update(a.name for a in node.names)
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    parent = (
                        package_of.rsplit(".", node.level - 1)[0] if node.level > 1 else package_of
                    )
                    base = f"{parent}.{base}" if base else parent
                # `from pkg import sub` imports the submodule; any other name comes from `base`.
                subs = {f"{base}.{a.name}" for a in node.names} & paths.keys()
                found.update(subs or {base})
        graph[module] = {m for m in found if m in paths and m != module}
    return graph


def circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
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
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_the_checker_finds_a_circle_through_a_function_local_import():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert circles(graph) == [["a", "b", "c"]]


def test_the_trainer_package_has_no_import_circle():
    graph = module_imports("trainer")
    assert "trainer.config" in graph and "trainer.flags" in graph["trainer.__main__"]
    assert circles(graph) == []
    # The settings module stands alone: the command line and the run directory build on it.
    assert graph["trainer.config"] <= {"trainer.choices"}
