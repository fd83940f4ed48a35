"""Remove what does not contribute to the outputs: dead nodes, unused or duplicate
initializers, Identity nodes, unused functions and opsets."""

from __future__ import annotations


import onnx_ir as ir
from onnx_ir.passes import common

from graphopt.passes.base import GraphoptPass, PassContext, PassResult
from graphopt.passes.registry import register
from graphopt.passes.weights import weights_on_disk


@register
class CleanupPass(GraphoptPass, name="cleanup",
                  summary="remove dead nodes, Identity, unused and duplicate initializers, unused functions"):
    class Options:
        keep_value_info: bool = False
        """Keep the types and shapes recorded for intermediate tensors. onnxruntime infers them
        itself; dropping them keeps a simplified model from growing."""

    def apply(self, model: ir.Model, context: PassContext) -> PassResult:
        nodes_before = _count_nodes(model)
        inits_before = _count_initializers(model)
        # A model too large to hold (its weights left in external data) is not hashed whole: that
        # would read every weight; only tensors up to a million elements are compared there.
        streamed = weights_on_disk(model.graph)
        steps = (
            _IdentityEliminationPass(),
            common.DeduplicateHashedInitializersPass(**({"size_limit": 1 << 20} if streamed else {})),
            common.RemoveUnusedNodesPass(),
            common.RemoveUnusedFunctionsPass(),
            common.RemoveUnusedOpsetsPass(),
        )
        for step in steps:
            step(model)
        changes = {
            "nodes removed": nodes_before - _count_nodes(model),
            "initializers removed": inits_before - _count_initializers(model),
            "value infos dropped": 0 if self.options.keep_value_info else drop_value_info(model),
        }
        # onnx-ir reports "modified" for opset bookkeeping too; only real removals count.
        return PassResult(model, modified=any(changes.values()), changes=changes)


class _IdentityEliminationPass(common.IdentityEliminationPass):
    """onnx-ir's pass, except where ``y = Identity(x)`` is an output of its graph and ``x`` is
    not made by a node of that same graph:

    - ``x`` is itself an output of the graph: removing the Identity returns one value twice
      under one name, so an output name is lost (onnxruntime returns zeros for a Scan state
      written that way);
    - ``x`` comes from outside the graph (an outer-scope value read by an ``If``/``Loop``
      branch, a graph input, an initializer): removing it renames that value or leaves the
      branch output dangling.
    Such an Identity stays."""

    def _try_eliminate_identity_node(self, node: ir.Node) -> bool:
        source = node.inputs[0] if len(node.inputs) == 1 else None
        if node.op_type == "Identity" and source is not None and any(out.is_graph_output() for out in node.outputs):
            producer = source.producer()
            if source.is_graph_output() or producer is None or producer.graph is not node.graph:
                return False
        return super()._try_eliminate_identity_node(node)


def drop_value_info(model: ir.Model) -> int:
    """Forget types and shapes of intermediate values (graph inputs and outputs keep theirs)."""
    dropped = 0
    for graph in (model.graph, *model.graph.subgraphs()):
        boundary = {id(v) for v in (*graph.inputs, *graph.outputs)}
        for node in graph:
            for value in node.outputs:
                if id(value) in boundary or (value.type is None and value.shape is None):
                    continue
                value.type = None
                value.shape = None
                dropped += 1
    return dropped


def _count_nodes(model: ir.Model) -> int:
    return sum(1 for _ in ir.traversal.RecursiveGraphIterator(model.graph))


def _count_initializers(model: ir.Model) -> int:
    total = len(model.graph.initializers)
    for node in ir.traversal.RecursiveGraphIterator(model.graph):
        for attr in node.attributes.values():
            if attr.type == ir.AttributeType.GRAPH:
                total += len(attr.value.initializers)
    return total
