"""Turn Constant-node weights into initializers.

Exporters from other frameworks (Paddle, TF) keep weights in Constant nodes; quantization,
pruning and factorization all look for initializers.
"""

from __future__ import annotations


import onnx_ir as ir
from onnx_ir.passes.common import LiftConstantsToInitializersPass as _IrLift

from graphopt.passes.base import GraphoptPass, PassContext, PassResult
from graphopt.passes.registry import register


@register
class LiftConstantsPass(GraphoptPass, name="lift-constants",
                        summary="Constant-node tensors become initializers (subgraphs included)"):
    class Options:
        min_elements: int = 0
        """Constants with fewer elements stay Constant nodes."""

    def apply(self, model: ir.Model, context: PassContext) -> PassResult:
        before = _count_constants(model)
        result = _IrLift(lift_all_constants=False, size_limit=self.options.min_elements)(model)
        lifted = before - _count_constants(model)
        return PassResult(model, modified=result.modified, changes={"constants lifted": lifted})


def _count_constants(model: ir.Model) -> int:
    return sum(1 for node in ir.traversal.RecursiveGraphIterator(model.graph) if node.op_type == "Constant")
