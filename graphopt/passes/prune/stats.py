"""What a pruned model costs: parameters, multiply-accumulates from inferred shapes, and the
per-layer channel counts the pruning passes report."""

from __future__ import annotations

import math

import onnx_ir as ir

from graphopt.passes.prune.cut import parameter_count
from graphopt.passes.prune.dependency import constant, inferred_shapes


def count_macs(model: ir.Model) -> int:
    """Multiply-accumulates of Conv, ConvTranspose, Gemm and MatMul from ONNX shape
    inference; a symbolic dimension (batch, sequence) counts as 1, so for a transformer this
    is the cost per token and sample."""
    shapes = inferred_shapes(model)

    def shape(value: ir.Value | None) -> list[int] | None:
        if value is None:
            return None
        array = constant(value)
        if array is not None:
            return list(array.shape)
        dims = shapes.get(value.name or "")
        return None if dims is None else [d or 1 for d in dims]

    total = 0
    for node in model.graph:
        if node.op_type not in ("Conv", "ConvTranspose", "Gemm", "MatMul") or len(node.inputs) < 2:
            continue
        out, weight, source = shape(node.outputs[0]), shape(node.inputs[1]), shape(node.inputs[0])
        if out is None or weight is None or source is None:
            continue
        if node.op_type == "Conv":
            total += math.prod(out) * math.prod(weight[1:])
        elif node.op_type == "ConvTranspose":
            total += math.prod(source) * math.prod(weight[1:])
        elif node.op_type == "Gemm":
            inner = source[0] if node.attributes.get_int("transA", 0) else source[-1]
            total += math.prod(out) * inner
        else:
            total += math.prod(out) * (source[-1] if source else 1)
    return total


def model_cost(model: ir.Model) -> dict[str, int]:
    return {"parameters": parameter_count(model.graph), "macs": count_macs(model)}
