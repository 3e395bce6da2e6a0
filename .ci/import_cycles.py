"""Fail if any two of hfserve's modules import each other, directly or through others.

Every import statement counts: module level, inside functions, and under ``TYPE_CHECKING``
(grimp reads them all from the source). A package's ``__init__`` is a module like any other;
importing a submodule is not counted as importing its package. Prints each cycle found.
"""

from __future__ import annotations

import sys

import grimp


def strongly_connected(graph: dict[str, set[str]]) -> list[list[str]]:
    """Tarjan's algorithm, iterative: the strongly connected components with more than one module."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    on_stack: set[str] = set()
    stack: list[str] = []
    found: list[list[str]] = []
    counter = 0
    for root in sorted(graph):
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = counter
        counter += 1
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = counter
                    counter += 1
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph[child]))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                parent = work[-1][0]
                low[parent] = min(low[parent], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1:
                    found.append(sorted(component))
    return found


def main() -> int:
    built = grimp.build_graph("hfserve", exclude_type_checking_imports=False)
    graph = {m: set(built.find_modules_directly_imported_by(m)) & built.modules for m in built.modules}
    selfish = sorted(m for m, deps in graph.items() if m in deps)
    cycles = strongly_connected(graph)
    for component in cycles:
        members = set(component)
        print("import cycle between: " + ", ".join(component))
        for m in component:
            for dep in sorted(graph[m] & members):
                lines = built.get_import_details(importer=m, imported=dep)
                where = ", ".join(f"l.{d['line_number']}" for d in lines)
                print(f"    {m} -> {dep} ({where})")
    for m in selfish:
        print(f"{m} imports itself")
    if cycles or selfish:
        return 1
    print(f"no import cycles among {len(graph)} modules")
    return 0


if __name__ == "__main__":
    sys.exit(main())
