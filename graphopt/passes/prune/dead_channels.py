"""prune-dead-channels: remove channels that are exactly zero everywhere (what
``torch.nn.utils.prune`` leaves behind), with the input channels of every consumer. Exact.

A channel is dead when every tensor of its coupled group is the constant 0 for every input.
That is proven by propagating, in graph order, a per-channel "this channel is the constant c
at every position" (NaN: not known to be constant) through each op of the group:
Conv/Gemm/MatMul output j is its bias when every weight of channel j is 0 or multiplies an
input channel known to be 0; BatchNormalization maps c to scale·(c−mean)/√(var+eps)+beta
(so a zeroed channel is dead after it only when that is 0); HardSigmoid(0) = 0.5 is not 0;
an Add of a bias keeps it dead only where the bias is 0. Activations are assumed finite
(0 · x = 0).
"""

from __future__ import annotations

import logging
import math

import numpy as np
import onnx_ir as ir

from graphopt.passes.base import GraphoptPass, PassContext, PassResult
from graphopt.passes.prune.cut import apply_cuts, removal_plan
from graphopt.passes.prune.dependency import ChannelGroup, Dependency, analyze, constant, weight_layout
from graphopt.passes.prune.report import layer_report
from graphopt.passes.prune.stats import model_cost
from graphopt.passes.registry import register

logger = logging.getLogger(__name__)

_erf = np.vectorize(math.erf, otypes=[np.float32])


def _unary(node: ir.Node, x: np.ndarray) -> np.ndarray:
    op, attrs = node.op_type, node.attributes
    if op in ("Identity", "Dropout"):
        return x
    if op == "Relu":
        return np.maximum(x, 0)
    if op == "Clip":
        low, high = (constant(node.inputs[i]) if len(node.inputs) > i else None for i in (1, 2))
        low = attrs.get_float("min", -np.inf) if low is None else float(low)
        high = attrs.get_float("max", np.inf) if high is None else float(high)
        return np.clip(x, low, high)
    if op == "LeakyRelu":
        return np.where(x >= 0, x, attrs.get_float("alpha", 0.01) * x)
    if op == "HardSigmoid":
        return np.clip(attrs.get_float("alpha", 0.2) * x + attrs.get_float("beta", 0.5), 0, 1)
    if op == "HardSwish":
        return x * np.clip(x / 6 + 0.5, 0, 1)
    if op == "Sigmoid":
        return 1 / (1 + np.exp(-x))
    if op == "Tanh":
        return np.tanh(x)
    if op == "Erf":
        return _erf(x)
    if op == "Gelu":
        return 0.5 * x * (1 + _erf(x / np.sqrt(2)))
    if op in ("Neg", "Abs", "Exp", "Sqrt"):
        return getattr(np, {"Neg": "negative", "Abs": "abs", "Exp": "exp", "Sqrt": "sqrt"}[op])(x)
    # Elu, Selu, Softplus, Mish, PRelu…: only "0 stays 0" is used, and none of them promises it.
    return np.full_like(x, np.nan)


def _per_channel(array: np.ndarray, axis: int, size: int) -> np.ndarray | None:
    """A constant operand as one value per channel, or None when it varies along other axes."""
    if array.ndim < -axis:
        return np.broadcast_to(array.reshape(-1)[:1], (size,)) if array.size == 1 else None
    other = [d for i, d in enumerate(array.shape) if i != array.ndim + axis]
    if any(d != 1 for d in other):
        return None
    return np.broadcast_to(array.reshape(-1), (size,)).astype(np.float32)


def _binary(op: str, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    if op == "Add":
        return a + b
    if op == "Sub":
        return a - b
    if op == "Mul":
        return np.where((a == 0) | (b == 0), np.float32(0), a * b)
    if op == "Div":
        return a / b
    return np.maximum(a, b) if op == "Max" else np.minimum(a, b)


class ConstantChannels:
    """Per channel tensor: the constant each channel is known to hold (NaN: unknown)."""

    def __init__(self, graph: ir.Graph, dependency: Dependency) -> None:
        self.dependency = dependency
        self.values: dict[int, np.ndarray] = {}
        for node in graph:
            output = dependency.tensor(node.outputs[0]) if node.outputs else None
            if output is not None and id(node) in dependency.understood:
                with np.errstate(all="ignore"):
                    self.values[id(output.value)] = self._evaluate(node, output.size).astype(np.float32)

    def of(self, value: ir.Value | None, size: int) -> np.ndarray:
        tensor = self.dependency.tensor(value)
        if tensor is None or id(tensor.value) not in self.values or tensor.size != size:
            return np.full(size, np.nan, np.float32)
        return self.values[id(tensor.value)]

    def _evaluate(self, node: ir.Node, size: int) -> np.ndarray:
        op = node.op_type
        unknown = np.full(size, np.nan, np.float32)
        if op in ("Conv", "ConvTranspose", "Gemm", "MatMul"):
            return self._weight_op(node, size)
        if op == "BatchNormalization":
            x = self.of(node.inputs[0], size)
            params = [constant(v) for v in node.inputs[1:5]]
            if any(p is None or p.shape != (size,) for p in params):
                return unknown
            scale, bias, mean, var = (p.astype(np.float32) for p in params)
            eps = node.attributes.get_float("epsilon", 1e-5)
            return np.where(scale == 0, bias, scale * (x - mean) / np.sqrt(var + np.float32(eps)) + bias)
        if op in ("GlobalAveragePool", "GlobalMaxPool", "MaxPool", "Flatten"):
            return self.of(node.inputs[0], size)
        if op == "AveragePool":
            x = self.of(node.inputs[0], size)
            return np.where(x == 0, x, np.nan) if node.attributes.get_int("count_include_pad", 0) else x
        if op == "Concat":
            parts = [self.of(v, self.dependency.tensor(v).size) if self.dependency.tensor(v) else None
                     for v in node.inputs]
            joined = np.concatenate(parts) if all(p is not None for p in parts) else unknown
            return joined if joined.size == size else unknown
        if len(node.inputs) >= 2 and node.inputs[1] is not None and op in ("Add", "Sub", "Mul", "Div", "Max", "Min"):
            return self._binary_op(node, size)
        return _unary(node, self.of(node.inputs[0], size))

    def _binary_op(self, node: ir.Node, size: int) -> np.ndarray:
        axis = self.dependency.tensor(node.outputs[0]).axis
        operands = []
        for value in node.inputs:
            array = constant(value)
            if array is not None:
                per_channel = _per_channel(array, axis, size)
                operands.append(per_channel if per_channel is not None else np.full(size, np.nan, np.float32))
            else:
                operands.append(self.of(value, size))
        return _binary(node.op_type, operands[0], operands[1])

    def _weight_op(self, node: ir.Node, size: int) -> np.ndarray:
        if weight_layout(node) is None:
            return np.full(size, np.nan, np.float32)
        weight = constant(node.inputs[1])
        source = self.dependency.tensor(node.inputs[0])
        x = self.of(node.inputs[0], source.size) if source else None
        op, group = node.op_type, node.attributes.get_int("group", 1)
        if op in ("Conv", "ConvTranspose"):
            nonzero = np.any(weight.reshape(weight.shape[0], weight.shape[1], -1) != 0, axis=2)
            if op == "ConvTranspose":
                nonzero = nonzero.T
            if group != 1 and not (op == "Conv" and group == size and weight.shape[1] == 1):
                return np.full(size, np.nan, np.float32)  # grouped: blocked, and not evaluated
            if group != 1:  # depthwise [C, 1, k…]: output j reads input j only
                live = nonzero[:, 0] & ~(x == 0) if x is not None and x.size == size else nonzero[:, 0]
            else:
                live = np.any(nonzero & ~(x == 0)[None, :], axis=1) if x is not None else np.any(nonzero, axis=1)
            bias = constant(node.inputs[2]) if len(node.inputs) > 2 and node.inputs[2] is not None else None
        else:
            out_axis = 0 if op == "Gemm" and node.attributes.get_int("transB", 0) else 1
            nonzero = np.moveaxis(weight != 0, out_axis, 0)  # [out, in]
            live = np.any(nonzero & ~(x == 0)[None, :], axis=1) if x is not None else np.any(nonzero, axis=1)
            bias = None
            if op == "Gemm" and len(node.inputs) > 2 and node.inputs[2] is not None:
                bias = np.broadcast_to(constant(node.inputs[2]).reshape(-1), (size,)) * node.attributes.get_float("beta", 1.0)
        if live.shape != (size,):
            return np.full(size, np.nan, np.float32)
        base = np.zeros(size, np.float32) if bias is None else np.broadcast_to(bias.reshape(-1), (size,))
        return np.where(live, np.nan, base)


def dead_groups(graph: ir.Graph, dependency: Dependency) -> list[ChannelGroup]:
    constants = ConstantChannels(graph, dependency)
    return [g for g in dependency.groups
            if g.prunable and all(constants.of(t.value, t.size)[c] == 0 for t, c in g.members)]


@register
class PruneDeadChannelsPass(GraphoptPass, name="prune-dead-channels",
                            summary="remove channels that are exactly zero (torch pruning masks) with their consumers' inputs: exact"):
    def apply(self, model: ir.Model, context: PassContext) -> PassResult:
        dependency = analyze(model, context.exclude)
        dead = dead_groups(model.graph, dependency)
        if not dead:
            return PassResult(model, modified=False, changes={"channels removed": 0})
        before = model_cost(model)
        removed, groups = removal_plan(dependency, dead)
        layers = layer_report(dependency, removed)
        nodes = apply_cuts(model.graph, dependency, removed)
        after = model_cost(model)
        logger.info("removed %d dead channel groups", len(groups))
        return PassResult(
            model,
            modified=bool(groups),
            changes={"channels removed": len(groups), "nodes cut": nodes,
                     "parameters removed": before["parameters"] - after["parameters"]},
            details={"layers": layers, "before": before, "after": after},
        )
