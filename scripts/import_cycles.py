"""Print the import cycles among hubkit's modules (function-level imports included, TYPE_CHECKING ones not).

    python scripts/import_cycles.py          # exit status 1 when there is a cycle

A cycle is a strongly connected component of the graph of direct imports that grimp (import-linter's
graph builder) reads from the source. A cycle that closes only through a package ``__init__``
re-exporting its own submodules is listed apart: importing the package runs its ``__init__`` first,
so such a cycle never sees a half-initialised module.
"""
from __future__ import annotations

import sys

import grimp


def strongly_connected(graph: grimp.ImportGraph, modules: set[str]) -> list[list[str]]:
    """Tarjan's algorithm, iteratively: the components of more than one module, each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components = []
    for root in sorted(modules):
        if root in index:
            continue
        work = [(root, iter(sorted(graph.find_modules_directly_imported_by(root) & modules)))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is None:
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
                        components.append(sorted(component))
            elif child not in index:
                index[child] = low[child] = len(index)
                stack.append(child)
                on_stack.add(child)
                work.append((child, iter(sorted(graph.find_modules_directly_imported_by(child) & modules))))
            elif child in on_stack:
                low[node] = min(low[node], index[child])
    return components


def only_through_package_reexports(graph: grimp.ImportGraph, component: list[str]) -> bool:
    """True when every import inside the cycle that points *into* a package ``__init__`` comes from that
    package's own submodules, i.e. removing those edges breaks the cycle."""
    members = set(component)
    packages = {m for m in members if graph.find_children(m)}
    trimmed = grimp.ImportGraph()
    for module in members:
        trimmed.add_module(module)
    for importer in members:
        for imported in graph.find_modules_directly_imported_by(importer) & members:
            if imported in packages and importer.startswith(imported + "."):
                continue
            if importer in packages and imported.startswith(importer + "."):
                continue  # the package __init__ importing its own submodules (a re-export)
            trimmed.add_import(importer=importer, imported=imported)
    return not strongly_connected(trimmed, members)


def main() -> int:
    graph = grimp.build_graph("hubkit", exclude_type_checking_imports=True)
    modules = {m for m in graph.modules if m == "hubkit" or m.startswith("hubkit.")}
    cycles = strongly_connected(graph, modules)
    real = [c for c in cycles if not only_through_package_reexports(graph, c)]
    reexports = [c for c in cycles if c not in real]
    print(f"{len(modules)} modules, {len(real)} import cycle(s), {len(reexports)} through package re-exports only")
    for title, group in (("cycle", real), ("re-export cycle", reexports)):
        for component in group:
            print(f"{title}: {' <-> '.join(component)}")
            for importer in component:
                for imported in sorted(graph.find_modules_directly_imported_by(importer) & set(component)):
                    lines = ", ".join(str(d["line_number"]) for d in graph.get_import_details(importer=importer,
                                                                                              imported=imported))
                    print(f"    {importer} -> {imported} (line {lines})")
    return 1 if real else 0


if __name__ == "__main__":
    sys.exit(main())
