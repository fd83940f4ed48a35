"""Weight-only int8: weights stored as int8 with a per-channel scale, rebuilt in the graph as
``Cast(int8 → float) * scale``.

Why Cast+Mul and not DequantizeLinear: onnxruntime keeps DequantizeLinear nodes unfolded (to
preserve QDQ units), which costs a dequantization per run and blocks its NCHWc convolution
layout. Cast and Mul of constants are folded when the session is created, so the model runs
exactly the float kernels at float speed while the file is ~4× smaller. Folded, W and R of a
recurrent layer are constant again, which LSTM/GRU/RNN need to pre-pack them.

A recurrent layer (LSTM, GRU, RNN) has two weights, W and R; both are encoded, with one scale
per direction and gate row.
"""

from __future__ import annotations


import numpy as np
import onnx_ir as ir

from graphopt.passes.base import GraphoptPass, PassContext, PassResult
from graphopt.passes.quantize.numeric import quantize_rows, quantize_symmetric, relative_error
from graphopt.passes.quantize.recurrent import float_recurrent_notes
from graphopt.passes.weights import (
    WEIGHT_OPS,
    WeightUse,
    column_importance,
    first_consumer,
    initializer,
    weight_uses,
)
from graphopt.passes.registry import register


def encode_weight_only(graph: ir.Graph, weight: ir.Value, axis: int,
                       importance: np.ndarray | None = None) -> dict[str, object]:
    """Replace initializer ``weight`` by int8 values rebuilt with Cast * scale; keep its name."""
    name = weight.name or "weight"
    array = weight.const_value.numpy()
    quantized = quantize_symmetric(array, axis, importance=importance)
    _rebuild_in_float(graph, weight, quantized.values, quantized.broadcast_scale())
    return {
        "weight": name,
        "shape": list(array.shape),
        "axis": axis,
        "scale_min": float(quantized.scale.min()),
        "scale_max": float(quantized.scale.max()),
        "relative_error": relative_error(array, quantized.dequantize()),
        "activation_aware": importance is not None,
    }


def encode_recurrent_weights(graph: ir.Graph, use: WeightUse) -> dict[str, object]:
    """W and R of a recurrent layer, one scale per direction and gate row; keep their names."""
    names, shape = [value.name for value in use.weights], list(use.weight.const_value.shape.numpy())
    originals, rebuilt, scales = [], [], []
    for weight in use.weights:
        array = weight.const_value.numpy()
        rows = quantize_rows(array)
        _rebuild_in_float(graph, weight, rows.values.reshape(array.shape),
                          rows.scale.reshape(*array.shape[:-1], 1))
        originals.append(array.reshape(-1))
        rebuilt.append(rows.dequantize().reshape(-1))
        scales.append(rows.scale)
    scale = np.concatenate(scales)
    return {
        "weight": names[0],
        "recurrent_weight": names[1],
        "shape": shape,
        "axis": use.channel_axis,
        "scale_min": float(scale.min()),
        "scale_max": float(scale.max()),
        "relative_error": relative_error(np.concatenate(originals), np.concatenate(rebuilt)),
        "activation_aware": False,
    }


def _rebuild_in_float(graph: ir.Graph, weight: ir.Value, codes: np.ndarray, scale: np.ndarray) -> None:
    """Replace initializer ``weight`` by ``codes`` (int8) rebuilt as Cast * ``scale``, under its name."""
    name = weight.name or "weight"
    shape = weight.const_value.shape
    q_value = initializer(graph, f"{name}_int8", codes)
    s_value = initializer(graph, f"{name}_scale", scale)
    cast = ir.node("Cast", [q_value], {"to": ir.DataType.FLOAT}, name=f"{name}_cast")
    mul = ir.node("Mul", [cast.outputs[0], s_value], name=f"{name}_rescale")
    graph.insert_before(first_consumer(weight, graph), [cast, mul])
    weight.replace_all_uses_with(mul.outputs[0])
    graph.initializers.pop(name)
    mul.outputs[0].name = name
    mul.outputs[0].dtype = ir.DataType.FLOAT
    mul.outputs[0].shape = ir.Shape(shape)


def group_by_weight(uses: list[WeightUse]) -> dict[str, list[WeightUse]]:
    """A weight read by several nodes is encoded once (with the first use's channel axis)."""
    groups: dict[str, list[WeightUse]] = {}
    for use in uses:
        groups.setdefault(use.weight.name or "", []).append(use)
    return groups


@register
class QuantizeWeightsPass(GraphoptPass, name="quantize-weights",
                          summary="weight-only int8 (per-channel, rebuilt by Cast*scale): ~4x smaller, float speed"):
    role = "compress"

    class Options:
        ops: tuple[str, ...] = WEIGHT_OPS
        """Op types whose weights are encoded."""
        min_elements: int = 1024
        """Smaller weights stay float (their scales would cost more than they save)."""
        activation_aware: bool = True
        """With --calib, choose each channel's scale to minimise the error weighted by the
        energy of the input channel each weight multiplies; without --calib, plain MSE."""
        nodes: tuple[str, ...] = ()
        """When given, only the weights of these node names are encoded."""

    def apply(self, model: ir.Model, context: PassContext) -> PassResult:
        uses, skipped = weight_uses(model.graph, self.options.ops, self.options.min_elements,
                                      context.exclude)
        if self.options.nodes:
            uses = [u for u in uses if u.node.name in self.options.nodes]
        meansq = self._input_energy(model, uses, context)
        details, encoded = [], 0
        for uses_of_weight in group_by_weight(uses).values():
            first = uses_of_weight[0]
            if first.recurrence is not None:
                entry = encode_recurrent_weights(model.graph, first)
            else:
                importance = column_importance(first, meansq.get(first.node.inputs[0].name)) \
                    if len(uses_of_weight) == 1 and first.kind != "Gather" else None
                entry = encode_weight_only(model.graph, first.weight, first.channel_axis, importance)
            entry.update(mode="weight-only", nodes=[u.name for u in uses_of_weight], kind=first.kind)
            details.append(entry)
            encoded += len(first.weights)
        return PassResult(
            model,
            modified=bool(details),
            changes={"weights encoded": encoded},
            notes=float_recurrent_notes(model.graph, skipped),
            details={"layers": details, "skipped": skipped},
        )

    def _input_energy(self, model: ir.Model, uses: list[WeightUse], context: PassContext) -> dict[str, np.ndarray]:
        if not self.options.activation_aware or context.calibration is None:
            return {}
        names = sorted({u.node.inputs[0].name for u in uses
                        if u.kind != "Gather" and u.recurrence is None and u.node.inputs[0].name})
        stats = context.statistics(self.name, model, names)
        return {name: s.channel_meansq for name, s in stats.items() if s.channel_meansq is not None}
