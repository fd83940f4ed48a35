"""`remove-no-ops`: ops that do nothing, and outputs nobody reads, leave the graph.

An exported and fused decoder runs these on every decode step:

* **reshape chains back to their source**: ``Reshape``/``Squeeze``/``Unsqueeze``
  steps whose last output has its first input's shape (GroupQueryAttention's output goes
  ``[b, s, 576] → [b, s, 9, 64] → [b, s, 576]``), and a Reshape to the shape its input has;
* **Expand to the shape its input has** (every target dimension 1 or the input's own);
* **inverse Transpose chains** (the permutations compose to the identity);
* **lossless Cast round trips** (``float16 → float32 → float16``) and a Cast to its input's type;
* **optional outputs nobody reads** of the normalization kernels (onnxruntime computes whatever
  output is named: SkipSimplifiedLayerNormalization's input + skip sum, means, inverse deviations).

Every removal is proven, never measured. Shapes are proven by a symbolic inference over the
graph (``ShapeFacts``) that trusts only the declared shapes of graph inputs — one dimension name
is one size there, as ONNX says — and the constants; a size it cannot follow stays unknown and
proves nothing. A dimension an op computes is known only where the op ran, so the rewritten
graph gives the same outputs as the original on every input the original runs on. The
nodes left computing nothing but what was removed (the target shapes) go with it.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Iterable

import onnx_ir as ir

from graphopt.passes.base import GraphoptPass, PassContext, PassResult
from graphopt.passes.registry import register
from graphopt.passes.shape_facts import DEFAULT, MICROSOFT, RESHAPES, ShapeFacts, transpose_perm

logger = logging.getLogger(__name__)


# Outputs a kernel computes only when they are named, independent of the outputs it keeps.
OPTIONAL_OUTPUTS: dict[tuple[str, str], tuple[int, ...]] = {
    (MICROSOFT, "SkipSimplifiedLayerNormalization"): (1, 2, 3),  # mean, inverse std dev, input + skip (+ bias)
    (MICROSOFT, "SkipLayerNormalization"): (1, 2, 3),
    ("", "SimplifiedLayerNormalization"): (1,),  # inverse std dev
    ("", "LayerNormalization"): (1, 2),  # mean, inverse std dev
}



@register
class RemoveNoOpsPass(GraphoptPass, name="remove-no-ops",
                      summary="remove what provably changes nothing: reshape chains back to their input's shape, "
                              "no-op Expand, inverse Transposes, lossless Cast round trips, unread optional outputs"):

    def apply(self, model: ir.Model, context: PassContext) -> PassResult:
        changes: Counter[str] = Counter()
        for graph in (model.graph, *model.graph.subgraphs()):
            facts = ShapeFacts(graph)
            bypassed: list[ir.Node] = []
            for node in list(graph):
                rule = _RULES.get(node.op_type) if node.domain in DEFAULT else None
                source = rule(node, facts) if rule else None
                if source is not None and not node.outputs[0].is_graph_output():
                    node.outputs[0].replace_all_uses_with(source)
                    bypassed.append(node)
                    changes[_CHANGE[node.op_type]] += 1
            nodes, initializers = _remove_dead(bypassed)
            changes["nodes removed"] += nodes
            changes["initializers removed"] += initializers
            changes["unread outputs dropped"] += _drop_unread_outputs(graph)
        changes = Counter({key: count for key, count in changes.items() if count})
        logger.debug("remove-no-ops: %s", dict(changes))
        return PassResult(model, modified=bool(changes), changes=dict(changes))


# -- the rules: each returns the value a node's output equals, or None ---------------------------


def _reshaped_back(node: ir.Node, facts: ShapeFacts) -> ir.Value | None:
    """The start of a chain of reshapes ending at ``node`` that has the shape ``node`` gives."""
    target = facts.shape(node.outputs[0])
    source = node.inputs[0]
    while target is not None and source is not None:
        if facts.shape(source) == target:
            return source
        producer = source.producer()
        if producer is None or producer.op_type not in RESHAPES or producer.domain not in DEFAULT:
            return None
        source = producer.inputs[0]
    return None


def _expanded_to_itself(node: ir.Node, facts: ShapeFacts) -> ir.Value | None:
    shape, target = facts.shape(node.inputs[0]), facts.elements(node.inputs[1])
    if shape is None or target is None or len(target) > len(shape):
        return None
    aligned = shape[len(shape) - len(target):]
    return node.inputs[0] if all(t == 1 or t == d for t, d in zip(target, aligned)) else None


def _transposed_back(node: ir.Node, facts: ShapeFacts) -> ir.Value | None:
    """The start of a chain of Transposes whose permutations compose to the identity."""
    composed = transpose_perm(node, facts)
    source = node.inputs[0]
    while composed is not None and source is not None:
        if composed == list(range(len(composed))):
            return source
        producer = source.producer()
        if producer is None or producer.op_type != "Transpose" or producer.domain not in DEFAULT:
            return None
        earlier = transpose_perm(producer, facts)
        if earlier is None or len(earlier) != len(composed):
            return None
        composed = [earlier[axis] for axis in composed]
        source = producer.inputs[0]
    return None


def _cast_back(node: ir.Node, facts: ShapeFacts) -> ir.Value | None:
    """``x`` for ``Cast(x, to=type(x))`` and for ``Cast(Cast(x, to=W), to=type(x))`` where W holds
    every value of x's type exactly."""
    target = ir.DataType(node.attributes["to"].value)
    source = node.inputs[0]
    if facts.dtype(source) == target:
        return source
    producer = source.producer()
    if producer is None or producer.op_type != "Cast" or producer.domain not in DEFAULT:
        return None
    original = producer.inputs[0]
    if facts.dtype(original) == target and _holds_every(facts.dtype(source), target):
        return original
    return None


_INT_RANGES = {ir.DataType.BOOL: (0, 1), ir.DataType.INT8: (-2**7, 2**7 - 1), ir.DataType.UINT8: (0, 2**8 - 1),
               ir.DataType.INT16: (-2**15, 2**15 - 1), ir.DataType.UINT16: (0, 2**16 - 1),
               ir.DataType.INT32: (-2**31, 2**31 - 1), ir.DataType.UINT32: (0, 2**32 - 1),
               ir.DataType.INT64: (-2**63, 2**63 - 1), ir.DataType.UINT64: (0, 2**64 - 1)}
_FLOAT_INTEGER_BITS = {ir.DataType.FLOAT16: 11, ir.DataType.BFLOAT16: 8, ir.DataType.FLOAT: 24, ir.DataType.DOUBLE: 53}
_FLOAT_WIDER = {ir.DataType.FLOAT16: (ir.DataType.FLOAT, ir.DataType.DOUBLE),
                ir.DataType.BFLOAT16: (ir.DataType.FLOAT, ir.DataType.DOUBLE), ir.DataType.FLOAT: (ir.DataType.DOUBLE,)}


def _holds_every(wide: ir.DataType | None, narrow: ir.DataType) -> bool:
    """Every value of ``narrow`` converts to ``wide`` and back unchanged (booleans as 0 and 1)."""
    if wide is None or wide == ir.DataType.BOOL:
        return False
    if narrow in _INT_RANGES:
        low, high = _INT_RANGES[narrow]
        if wide in _INT_RANGES:
            return _INT_RANGES[wide][0] <= low and high <= _INT_RANGES[wide][1]
        return wide in _FLOAT_INTEGER_BITS and max(-low, high) <= 2 ** _FLOAT_INTEGER_BITS[wide]
    return wide in _FLOAT_WIDER.get(narrow, ())


_RULES = {**{op: _reshaped_back for op in RESHAPES}, "Expand": _expanded_to_itself,
          "Transpose": _transposed_back, "Cast": _cast_back}
_CHANGE = {**{op: "identity reshapes" for op in RESHAPES}, "Expand": "identity expands",
           "Transpose": "inverse transposes", "Cast": "cast round trips"}


def _remove_dead(nodes: Iterable[ir.Node]) -> tuple[int, int]:
    """Remove ``nodes`` and then whatever computed only for them; how many nodes and initializers."""
    removed, dropped, pending = 0, 0, list(nodes)
    while pending:
        node = pending.pop()
        if node.graph is None or any(out.uses() or out.is_graph_output() for out in node.outputs):
            continue
        inputs = [value for value in node.inputs if value is not None]
        node.graph.remove(node, safe=True)
        removed += 1
        for value in inputs:
            if value.producer() is not None:
                pending.append(value.producer())
            elif value.is_initializer() and _unread(value) and not value.is_graph_input():
                value.graph.initializers.pop(value.name)
                dropped += 1
    return removed, dropped


def _drop_unread_outputs(graph: ir.Graph) -> int:
    """Unname the optional outputs nobody reads; trailing ones go (the kernel then skips them)."""
    dropped = 0
    for node in graph:
        optional = OPTIONAL_OUTPUTS.get(("" if node.domain in DEFAULT else node.domain, node.op_type), ())
        for index in optional:
            if index < len(node.outputs) and _unread(node.outputs[index]) and node.outputs[index].name:
                node.outputs[index].name = ""
                dropped += 1
        keep = len(node.outputs)
        while keep > 1 and keep - 1 in optional and _unread(node.outputs[keep - 1]):
            keep -= 1
        if keep < len(node.outputs):
            node.resize_outputs(keep)
    return dropped


def _unread(value: ir.Value) -> bool:
    return not value.uses() and not value.is_graph_output()
