"""Static (calibrated) QDQ int8 for Conv, ConvTranspose, MatMul and Gemm.

Two phases, as in onnxruntime's quantizer: first decide which tensors are quantized and with
which parameters (from calibration statistics), then insert the nodes. For each quantized
op: QuantizeLinear→DequantizeLinear on its float activation input (uint8, per tensor, ranges
from calibration), DequantizeLinear on its int8 per-channel weight, an int32 bias with scale
input_scale·weight_scale (weights requantized where the bias would overflow), and a QDQ pair
on its output so that onnxruntime can fuse DQ→op→Q into QLinearConv / QLinearMatMul.
Requires opset >= 13 (per-channel DequantizeLinear ``axis``).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Literal

import numpy as np
import onnx_ir as ir

from graphopt.passes.base import GraphoptPass, PassContext, PassResult
from graphopt.passes.quantize.calibrate import RangeMethod, TensorStats, activation_range, collect
from graphopt.passes.quantize.dynamic import weight_form
from graphopt.passes.quantize.numeric import (
    QuantizedWeight,
    quantize_bias,
    quantize_symmetric,
    relative_error,
    stored_weight,
    weight_max_int,
)
from graphopt.passes.weights import WeightUse, column_importance, initializer, select_uses, weight_uses
from graphopt.passes.registry import register

STATIC_OPS = ("Conv", "ConvTranspose", "MatMul", "Gemm")


@dataclasses.dataclass(frozen=True)
class ActivationParams:
    scale: float
    zero_point: int  # uint8

    @classmethod
    def from_range(cls, low: float, high: float) -> ActivationParams:
        low, high = min(low, 0.0), max(high, 0.0)
        scale = (high - low) / 255.0 if high > low else 1.0
        zero_point = int(np.clip(np.rint(-low / scale), 0, 255))
        return cls(float(scale), zero_point)


def static_refusal(use: WeightUse) -> str | None:
    if use.kind == "Gemm" and use.node.attributes.get_int("transA", 0):
        return "Gemm with transA"
    if use.kind not in STATIC_OPS:
        return f"{use.kind} has no static int8 compute form"
    activation = use.node.inputs[0]
    if activation is None or activation.name is None:
        return "activation has no name"
    return None


class _QdqInserter:
    """Insert (once per tensor) QuantizeLinear→DequantizeLinear pairs with fixed parameters."""

    def __init__(self, graph: ir.Graph) -> None:
        self.graph = graph
        self.done: dict[int, ir.Value] = {}
        self.dequantized: set[int] = set()

    def on_input(self, activation: ir.Value, params: ActivationParams, before: ir.Node) -> ir.Value:
        if id(activation) in self.dequantized:  # the previous quantized op's output pair
            return activation
        key = id(activation)
        if key not in self.done:
            self.done[key] = self._pair(activation, params, before)
            self.dequantized.add(id(self.done[key]))
        return self.done[key]

    def on_output(self, output: ir.Value, params: ActivationParams, after: ir.Node) -> None:
        """Route every reader of ``output`` through a QDQ pair placed after its producer."""
        readers = list(output.uses())
        quant, dequant = self._nodes(output, params)
        self.graph.insert_after(after, [quant, dequant])
        for user, index in readers:
            user.replace_input_with(index, dequant.outputs[0])
        if output.is_graph_output():  # keep the graph's output the quantized-then-dequantized value
            outputs = self.graph.outputs
            position = next(i for i, v in enumerate(outputs) if v is output)
            original = output.name
            output.name = f"{original}_float"
            dequant.outputs[0].name = original
            dequant.outputs[0].type, dequant.outputs[0].shape = output.type, output.shape
            outputs[position] = dequant.outputs[0]
        self.done[id(output)] = dequant.outputs[0]
        self.dequantized.add(id(dequant.outputs[0]))

    def _pair(self, activation: ir.Value, params: ActivationParams, before: ir.Node) -> ir.Value:
        quant, dequant = self._nodes(activation, params)
        self.graph.insert_before(before, [quant, dequant])
        return dequant.outputs[0]

    def _nodes(self, value: ir.Value, params: ActivationParams) -> tuple[ir.Node, ir.Node]:
        """QuantizeLinear→DequantizeLinear of ``value`` (not yet inserted); the pair's output
        is named ``<value>_qdq``."""
        name = value.name or "activation"
        scale = initializer(self.graph, f"{name}_scale", np.array(params.scale, np.float32))
        zero = initializer(self.graph, f"{name}_zero_point", np.array(params.zero_point, np.uint8))
        quant = ir.node("QuantizeLinear", [value, scale, zero], name=f"{name}_quantize")
        dequant = ir.node("DequantizeLinear", [quant.outputs[0], scale, zero], name=f"{name}_dequantize")
        dequant.outputs[0].name = f"{name}_qdq"
        return quant, dequant


def _dequantized_weight(graph: ir.Graph, name: str, weight: QuantizedWeight, form: str) -> ir.Value:
    codes, zero_points = stored_weight(weight, form)
    q_value = initializer(graph, f"{name}_int8", codes)
    scale = initializer(graph, f"{name}_scale", weight.scale)
    zero = initializer(graph, f"{name}_zero_point", zero_points)
    dequant = ir.node("DequantizeLinear", [q_value, scale, zero], {"axis": weight.axis}, name=f"{name}_dequantize")
    return dequant


def encode_static(graph: ir.Graph, use: WeightUse, qdq: _QdqInserter, input_params: ActivationParams,
                  output_params: ActivationParams, importance: np.ndarray | None = None, *,
                  form: str = "s8") -> dict[str, Any]:
    """Rewrite one layer as QDQ int8; ``form`` is the weight encoding (``graphopt.cpu``)."""
    node = use.node
    name = node.name or use.weight.name or use.kind
    weight = use.weight.const_value.numpy()
    max_int = weight_max_int(form)
    quantized = quantize_symmetric(weight, use.channel_axis, importance=importance, max_int=max_int)
    new_nodes = []
    bias_value = node.inputs[2] if len(node.inputs) > 2 else None
    bias_overflow = 0
    if use.kind in ("Conv", "ConvTranspose") and bias_value is not None and bias_value.const_value is not None:
        bias_int, weight_scale = quantize_bias(bias_value.const_value.numpy(), input_params.scale, quantized.scale)
        bias_overflow = int(np.count_nonzero(weight_scale > quantized.scale))
        if bias_overflow:
            quantized = _requantize(weight, use.channel_axis, weight_scale, max_int)
        b_q = initializer(graph, f"{bias_value.name}_int32", bias_int)
        b_scale = initializer(graph, f"{bias_value.name}_scale", (input_params.scale * quantized.scale).astype(np.float32))
        b_zero = initializer(graph, f"{bias_value.name}_zero_point", np.zeros(bias_int.shape, np.int32))
        bias_dq = ir.node("DequantizeLinear", [b_q, b_scale, b_zero], {"axis": 0}, name=f"{name}_bias_dequantize")
        new_nodes.append(bias_dq)
        node.replace_input_with(2, bias_dq.outputs[0])
    weight_dq = _dequantized_weight(graph, use.weight.name or name, quantized, form)
    new_nodes.append(weight_dq)
    graph.insert_before(node, new_nodes)
    node.replace_input_with(use.input_index, weight_dq.outputs[0])
    node.replace_input_with(0, qdq.on_input(node.inputs[0], input_params, node))
    qdq.on_output(node.outputs[0], output_params, node)
    return {
        "node": name,
        "kind": use.kind,
        "mode": "static",
        "input_scale": input_params.scale,
        "input_zero_point": input_params.zero_point,
        "output_scale": output_params.scale,
        "weight_relative_error": relative_error(weight, quantized.dequantize()),
        "bias_overflow_channels": bias_overflow,
        "weight_form": form,
    }


def _requantize(weight: np.ndarray, axis: int, scale: np.ndarray, max_int: int) -> QuantizedWeight:
    shape = [1] * weight.ndim
    shape[axis] = scale.size
    values = np.clip(np.rint(weight / scale.reshape(shape)), -max_int, max_int).astype(np.int8)
    return QuantizedWeight(values, scale.astype(np.float32), axis)


@register
class QuantizeStaticPass(GraphoptPass, name="quantize-static",
                         summary="calibrated QDQ int8: per-channel weights, int32 bias, uint8 activations (needs --calib)"):
    role = "compress"

    class Options:
        ops: tuple[str, ...] = STATIC_OPS
        method: Literal["minmax", "percentile", "entropy", "mse"] = "percentile"
        """How activation ranges are chosen from the calibration histograms."""
        percentile: float = 99.99
        min_elements: int = 16
        nodes: tuple[str, ...] = ()
        """When given, only these node names are quantized (the automatic mode's choice)."""
        weight_form: Literal["auto", "s8", "u8", "s7"] = "auto"
        """As quantize-dynamic's: auto writes what is exact on the target CPU (``graphopt.cpu``)."""

    def requires(self, model: ir.Model) -> None:
        self.require_opset(model, 13)  # per-channel DequantizeLinear ``axis``

    def apply(self, model: ir.Model, context: PassContext) -> PassResult:
        graph = model.graph
        uses, skipped = weight_uses(graph, self.options.ops, self.options.min_elements, context.exclude)
        chosen = select_uses(uses, static_refusal, self.options.nodes, skipped)
        if not chosen:
            return PassResult(model, modified=False, details={"layers": [], "skipped": skipped})
        stats = calibrate_static(model, chosen, context.calibration_feeds(self.name).feeds, self.options.method,
                                 threads=context.threads)
        layers = apply_static(graph, plan_static(chosen, stats, self.options.method, self.options.percentile),
                              weight_form(self.options.weight_form, context))
        return PassResult(model, modified=True, changes={"layers quantized": len(layers)},
                          details={"layers": layers, "skipped": skipped, "method": self.options.method})


@dataclasses.dataclass(frozen=True)
class StaticPlan:
    """Everything needed to rewrite one layer, computed from the untouched float graph."""

    use: WeightUse
    input_params: ActivationParams
    output_params: ActivationParams
    importance: np.ndarray | None


def calibrate_static(model: ir.Model, uses: list[WeightUse], feeds: list[dict[str, np.ndarray]],
                     method: RangeMethod, *, threads: int | None = None) -> dict[str, TensorStats]:
    names = [u.node.inputs[0].name for u in uses] + [u.node.outputs[0].name for u in uses]
    return collect(model, [n for n in names if n], feeds, histograms=method != "minmax", threads=threads)


def plan_static(uses: list[WeightUse], stats: dict[str, TensorStats], method: RangeMethod,
                percentile: float = 99.99) -> list[StaticPlan]:
    def params(name: str) -> ActivationParams:
        return ActivationParams.from_range(*activation_range(stats[name], method, percentile=percentile))

    return [
        StaticPlan(use, params(use.node.inputs[0].name), params(use.node.outputs[0].name),
                   column_importance(use, stats[use.node.inputs[0].name].channel_meansq))
        for use in uses
    ]


def apply_static(graph: ir.Graph, plans: list[StaticPlan], form: str) -> list[dict[str, Any]]:
    """Phase 2: insert the nodes (weights in ``form``); returns the per-layer report."""
    qdq = _QdqInserter(graph)
    layers = [encode_static(graph, p.use, qdq, p.input_params, p.output_params, p.importance, form=form)
              for p in plans]
    for name in [n for n, v in graph.initializers.items() if not v.uses() and not v.is_graph_output()]:
        graph.initializers.pop(name)
    return layers
