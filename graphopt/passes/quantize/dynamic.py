"""Dynamic int8 for MatMul/Gemm and LSTM with constant weights.

Weights are int8 per output channel; the activation is quantized to uint8 at run time
(DynamicQuantizeLinear, per tensor). The emitted pattern — DynamicQuantizeLinear →
MatMulInteger → Cast → Mul(a_scale · w_scale) — is the one onnxruntime fuses into
DynamicQuantizeMatMul / MatMulIntegerToFloat. Activations shared by several MatMuls (Q, K, V)
are quantized once. LSTM becomes onnxruntime's DynamicQuantizeLSTM (recurrent.py).
"""

from __future__ import annotations

from typing import Any, Literal

import numpy as np
import onnx_ir as ir

from graphopt.passes.base import GraphoptPass, PassContext, PassResult
from graphopt.passes.quantize.numeric import quantize_symmetric, relative_error, stored_weight, weight_max_int
from graphopt.passes.quantize.recurrent import encode_lstm, float_recurrent_notes, lstm_refusal
from graphopt.passes.weights import (RECURRENT_OPS, WeightUse, gemm_bias, initializer, replace_output, select_uses,
                                     weight_uses)
from graphopt.passes.registry import register


def dynamic_refusal(use: WeightUse) -> str | None:
    """Why this use cannot become a dynamic int8 MatMul (or LSTM), or None."""
    node = use.node
    if use.kind in RECURRENT_OPS:
        return lstm_refusal(use)
    if use.kind not in ("MatMul", "Gemm"):
        return f"{use.kind} has no dynamic int8 form here"
    if use.kind == "Gemm":
        if node.attributes.get_int("transA", 0):
            return "Gemm with transA"
        if node.attributes.get_float("alpha", 1.0) != 1.0:
            return "Gemm with alpha != 1"
    activation = node.inputs[0]
    if activation is None or activation.dtype not in (None, ir.DataType.FLOAT):
        return "activation is not float"
    return None


class _ActivationQuantizer:
    """One DynamicQuantizeLinear per activation value, however many MatMuls read it."""

    def __init__(self, graph: ir.Graph) -> None:
        self.graph = graph
        self.cache: dict[int, ir.Node] = {}

    def __call__(self, activation: ir.Value, before: ir.Node) -> ir.Node:
        key = id(activation)
        if key not in self.cache:
            name = activation.name or "activation"
            node = ir.node("DynamicQuantizeLinear", [activation], num_outputs=3, name=f"{name}_dynamic_quant")
            for output, suffix in zip(node.outputs, ("quantized", "scale", "zero_point")):
                output.name = f"{name}_{suffix}"
            self.graph.insert_before(before, node)
            self.cache[key] = node
        return self.cache[key]


def matmul_weight(use: WeightUse) -> np.ndarray:
    """The weight as [in, out], whatever the op's layout."""
    weight = use.weight.const_value.numpy()
    if use.kind == "Gemm" and use.node.attributes.get_int("transB", 0):
        weight = weight.T
    return weight


def encode_dynamic_alone(graph: ir.Graph, use: WeightUse, *, form: str) -> dict[str, Any]:
    """One layer in its dynamic int8 form, its activation quantized for it alone (the speed
    profile's one-node models)."""
    if use.kind == "LSTM":
        return encode_lstm(graph, use, form=form)
    return encode_dynamic(graph, use, _ActivationQuantizer(graph), use.node.inputs[0], form=form)


def encode_dynamic(graph: ir.Graph, use: WeightUse, quantize_activation: _ActivationQuantizer,
                   activation: ir.Value, row_scale: np.ndarray | None = None, *, form: str = "s8") -> dict[str, Any]:
    """Rewrite one MatMul/Gemm as dynamic int8 reading ``activation``. ``row_scale`` (per input
    channel) multiplies the weight rows; the caller has divided the activation by it. ``form``
    is the weight encoding (``graphopt.cpu``: exact on the CPU the model is for)."""
    node = use.node
    name = node.name or use.weight.name or "matmul"
    weight = matmul_weight(use)
    before = node
    if row_scale is not None:
        weight = weight * row_scale[:, None]
    quantized = quantize_symmetric(weight, axis=1, max_int=weight_max_int(form))
    codes, zero_points = stored_weight(quantized, form)
    w_q = initializer(graph, f"{use.weight.name}_int8", codes)
    w_scale = initializer(graph, f"{use.weight.name}_scale", quantized.scale)
    w_zero = initializer(graph, f"{use.weight.name}_zero_point", zero_points)
    dql = quantize_activation(activation, before)
    a_q, a_scale, a_zero = dql.outputs
    scales = ir.node("Mul", [a_scale, w_scale], name=f"{name}_scales")
    matmul = ir.node("MatMulInteger", [a_q, w_q, a_zero, w_zero], name=f"{name}_int8")
    cast = ir.node("Cast", [matmul.outputs[0]], {"to": ir.DataType.FLOAT}, name=f"{name}_int32_to_float")
    rescale = ir.node("Mul", [cast.outputs[0], scales.outputs[0]], name=f"{name}_rescale")
    new_nodes = [scales, matmul, cast, rescale]
    result = rescale.outputs[0]
    added, result = gemm_bias(graph, node, result, name)
    new_nodes += added
    graph.insert_before(before, new_nodes)
    replace_output(graph, node, result, "float")
    return {
        "node": name,
        "kind": use.kind,
        "mode": "dynamic",
        "weight_shape": list(weight.shape),
        "weight_relative_error": relative_error(weight, quantized.dequantize()),
        "weight_form": form,
        "smoothed": row_scale is not None,
    }


@register
class QuantizeDynamicPass(GraphoptPass, name="quantize-dynamic",
                          summary="dynamic int8 MatMul/Gemm/LSTM: per-channel weights, uint8 activations at run time"):
    role = "compress"

    class Options:
        ops: tuple[str, ...] = ("MatMul", "Gemm", "LSTM")
        min_elements: int = 1024
        """Smaller weights stay float."""
        smooth_alpha: float = 0.0
        """SmoothQuant migration strength (0 = off; 0.5 typical). Needs --calib: activation
        channels with outliers are divided by s = max|x|^a / max|w|^(1-a), the weight rows
        multiplied by it — folded into a preceding LayerNormalization when it is the only
        reader, else an explicit Mul."""
        smooth_min_outlier: float = 8.0
        """Smooth only activations whose largest channel max|x| is at least this many times
        the median channel's: elsewhere per-tensor quantization is already fine, and the
        extra Mul would only cost time."""
        nodes: tuple[str, ...] = ()
        """When given, only these node names are quantized (the automatic mode's choice)."""
        weight_form: Literal["auto", "s8", "u8", "s7"] = "auto"
        """int8 weights (s8), uint8 around 128 (u8: exact where uint8 x int8 saturates), or int8
        on 7 bits (s7, reduce_range); auto: what is exact on the target CPU (``graphopt.cpu``)."""

    def apply(self, model: ir.Model, context: PassContext) -> PassResult:
        graph = model.graph
        uses, skipped = weight_uses(graph, self.options.ops, self.options.min_elements, context.exclude)
        eligible = select_uses(uses, dynamic_refusal, self.options.nodes, skipped)
        lstms = [use for use in eligible if use.kind == "LSTM"]
        eligible = [use for use in eligible if use.kind != "LSTM"]
        groups: dict[int, list[WeightUse]] = {}
        for use in eligible:
            groups.setdefault(id(use.node.inputs[0]), []).append(use)
        channel_max = self._activation_channel_max(model, eligible, context) if self.options.smooth_alpha > 0 else {}
        quantize_activation = _ActivationQuantizer(graph)
        form = weight_form(self.options.weight_form, context)
        layers = []
        for group in groups.values():
            activation = group[0].node.inputs[0]
            scale = _smoothing_scale(group, channel_max.get(activation.name), self.options.smooth_alpha,
                                     self.options.smooth_min_outlier)
            if scale is not None:
                activation = _divide_activation(graph, activation, scale, group)
            for use in group:
                layers.append(encode_dynamic(graph, use, quantize_activation, activation, scale, form=form))
        layers += [encode_lstm(graph, use, form=form) for use in lstms]
        _remove_unused_initializers(graph)
        return PassResult(model, modified=bool(layers), changes={"layers quantized": len(layers)},
                          notes=self._notes(graph, skipped), details={"layers": layers, "skipped": skipped})

    def _notes(self, graph: ir.Graph, skipped: dict[str, str]) -> list[str]:
        # Given ``nodes``, the automatic mode chose them and reports every other layer itself.
        return [] if self.options.nodes else float_recurrent_notes(graph, skipped)

    def _activation_channel_max(self, model: ir.Model, uses: list[WeightUse], context: PassContext) -> dict[str, np.ndarray]:
        names = sorted({u.node.inputs[0].name for u in uses if u.node.inputs[0].name})
        stats = context.statistics(self.name, model, names)
        return {name: s.channel_absmax for name, s in stats.items() if s.channel_absmax is not None}


def weight_form(option: str, context: PassContext) -> str:
    """The weight form an int8 pass writes: the option, or (auto) the target CPU's exact one."""
    from graphopt.cpu import target_cpu

    return target_cpu(context.target_cpu).int8_weight_form if option == "auto" else option


def _smoothing_scale(group: list[WeightUse], activation_max: np.ndarray | None, alpha: float,
                     min_outlier: float) -> np.ndarray | None:
    """Per input channel s = max|x|^a / max|w|^(1-a), normalised so the typical channel is ~1."""
    if activation_max is None or alpha <= 0:
        return None
    if activation_max.max() < min_outlier * max(float(np.median(activation_max)), 1e-12):
        return None
    weight_max = np.max([np.abs(matmul_weight(u)).max(axis=1) for u in group], axis=0)
    if weight_max.shape != activation_max.shape:
        return None
    floor = 1e-5
    scale = np.power(np.maximum(activation_max, floor), alpha) / np.power(np.maximum(weight_max, floor), 1 - alpha)
    scale = scale / np.median(scale)
    return np.clip(scale, 1e-2, 1e2).astype(np.float32)


def _divide_activation(graph: ir.Graph, activation: ir.Value, scale: np.ndarray, group: list[WeightUse]) -> ir.Value:
    """activation / scale, per last-axis channel: folded into a LayerNormalization's gamma and
    beta when this group is its only reader (exact, no extra op), else an explicit Mul."""
    producer = activation.producer()
    readers = {id(n) for n in activation.consumers()}
    if (
        producer is not None
        and producer.op_type == "LayerNormalization"
        and readers == {id(u.node) for u in group}
        and not activation.is_graph_output()
        and all(v is not None and v.const_value is not None and len(v.uses()) == 1 for v in producer.inputs[1:3])
    ):
        for value in producer.inputs[1:3]:
            folded = value.const_value.numpy() / scale
            value.const_value = ir.tensor(folded.astype(np.float32), name=value.name)
        return activation
    name = activation.name or "activation"
    inverse = initializer(graph, f"{name}_smooth_inverse", (1.0 / scale).astype(np.float32))
    smooth = ir.node("Mul", [activation, inverse], name=f"{name}_smooth")
    graph.insert_before(group[0].node, smooth)
    smooth.outputs[0].name = f"{name}_smoothed"
    return smooth.outputs[0]


def _remove_unused_initializers(graph: ir.Graph) -> None:
    for name in [n for n, v in graph.initializers.items() if not v.uses() and not v.is_graph_output()]:
        graph.initializers.pop(name)
