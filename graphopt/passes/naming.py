"""New names for what passes add: one place, so no pass shadows a name another made.

Every value name in a graph and its subgraphs counts as taken (a new initializer named like a
subgraph's value would shadow it there); node names are unique among the graph's nodes.
"""

from __future__ import annotations

import onnx_ir as ir


def value_names(graph: ir.Graph) -> set[str]:
    """Every value name in ``graph`` and its subgraphs: inputs, initializers, node outputs."""
    names = {v.name for v in (*graph.inputs, *graph.initializers.values()) if v.name}
    for node in ir.traversal.RecursiveGraphIterator(graph):
        names.update(v.name for v in node.outputs if v.name)
    for sub in graph.subgraphs():
        names.update(v.name for v in (*sub.inputs, *sub.initializers.values()) if v.name)
    return names


def fresh_name(base: str, taken: set[str], *, first: int = 1) -> str:
    """``base``, or ``base_N`` with the smallest N >= ``first`` not in ``taken``; the name
    returned is added to ``taken``."""
    name, index = base, first
    while name in taken:
        name, index = f"{base}_{index}", index + 1
    taken.add(name)
    return name


def unique_value_name(graph: ir.Graph, base: str) -> str:
    return fresh_name(base, value_names(graph))


def unique_node_name(graph: ir.Graph, base: str) -> str:
    return fresh_name(base, {node.name for node in graph if node.name})
