"""Recurrent layers (LSTM, GRU, RNN) in int8.

LSTM has an int8 compute form in onnxruntime, ``com.microsoft:DynamicQuantizeLSTM``: X and the
hidden state are quantized to uint8 at every step and multiplied by 8-bit W and R. Its weights
are laid out for its GEMMs, transposed from ONNX's: W [directions, input, gates·hidden], R
[directions, hidden, gates·hidden], with a scale and zero point per direction and gate row
([directions, gates·hidden]). It has no ``layout`` attribute, so only sequence-first LSTMs
(layout 0) take it. Its GEMMs are the same MLAS kernels as MatMulInteger's, so the weight form
``graphopt.cpu`` picks applies as is: uint8 around 128 (the exact U8U8 kernel) where uint8 x int8
saturates. The kernel takes uint8 W and R with zero point 128 (onnxruntime 1.32; the u8 parity
test in tests/passes/quantize/test_recurrent.py fails if it ever stops honouring it).

GRU and RNN have no int8 kernel in onnxruntime; they, and LSTMs refused here, get weight-only
int8 (``weight_only.encode_recurrent_weights``).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import onnx_ir as ir

from graphopt.passes.quantize.numeric import quantize_rows, relative_error, stored_weight, weight_max_int
from graphopt.passes.weights import RECURRENT_OPS, WeightUse, initializer

CONTRIB_DOMAIN = "com.microsoft"
# LSTM's optional inputs after W and R: B, sequence_lens, initial_h, initial_c, P.
_LSTM_OPTIONAL_INPUTS = 5


def lstm_refusal(use: WeightUse) -> str | None:
    """Why this recurrent layer cannot become DynamicQuantizeLSTM, or None."""
    if use.kind != "LSTM":
        return f"onnxruntime has no int8 {use.kind} kernel (weight-only int8 is its form)"
    if use.node.attributes.get_int("layout", 0) != 0:
        return "LSTM with layout=1 (batch first): DynamicQuantizeLSTM has no layout attribute"
    activation = use.node.inputs[0]
    if activation is None or activation.dtype not in (None, ir.DataType.FLOAT):
        return "X is not float"
    return None


def encode_lstm(graph: ir.Graph, use: WeightUse, *, form: str) -> dict[str, Any]:
    """Replace one LSTM by DynamicQuantizeLSTM with W and R in ``form`` (``graphopt.cpu``)."""
    node = use.node
    name = node.name or use.weight.name or "lstm"
    weight, weight_error = _gemm_weight(graph, use.weight, form)
    recurrence, recurrence_error = _gemm_weight(graph, use.recurrence, form)
    optional = list(node.inputs[3:]) + [None] * (_LSTM_OPTIONAL_INPUTS - len(node.inputs[3:]))
    lstm = ir.Node(CONTRIB_DOMAIN, "DynamicQuantizeLSTM",
                   [node.inputs[0], weight[0], recurrence[0], *optional, *weight[1:], *recurrence[1:]],
                   attributes=[attr for attr in node.attributes.values() if attr.name != "layout"],
                   num_outputs=len(node.outputs), name=name)
    graph.opset_imports.setdefault(CONTRIB_DOMAIN, 1)
    ir.convenience.replace_nodes_and_values(graph, node, [node], [lstm], list(node.outputs), list(lstm.outputs))
    return {
        "node": name,
        "kind": use.kind,
        "mode": "dynamic",
        "weight_shape": list(use.weight.const_value.shape.numpy()),
        "recurrent_weight_shape": list(use.recurrence.const_value.shape.numpy()),
        "weight_relative_error": weight_error,
        "recurrent_relative_error": recurrence_error,
        "weight_form": form,
    }


def _gemm_weight(graph: ir.Graph, value: ir.Value, form: str) -> tuple[list[ir.Value], float]:
    """W or R as DynamicQuantizeLSTM reads it: [codes (transposed), scale, zero point], and
    the relative error of the codes."""
    array = value.const_value.numpy()
    directions, rows, _ = array.shape
    quantized = quantize_rows(array, max_int=weight_max_int(form))
    codes, zero_points = stored_weight(quantized, form)
    transposed = np.ascontiguousarray(codes.reshape(array.shape).transpose(0, 2, 1))
    name = value.name or "weight"
    stored = [
        initializer(graph, f"{name}_int8", transposed),
        initializer(graph, f"{name}_scale", quantized.scale.reshape(directions, rows)),
        initializer(graph, f"{name}_zero_point", zero_points.reshape(directions, rows)),
    ]
    return stored, relative_error(array.reshape(quantized.values.shape), quantized.dequantize())


def float_recurrent_notes(graph: ir.Graph, skipped: dict[str, str]) -> list[str]:
    """A note naming the recurrent layers a pass left in float, and why: in a sequence model
    they are often most of the bytes, so the user should not have to find them in the report."""
    kept = []
    for node in graph:
        if node.op_type not in RECURRENT_OPS or not _stores_float_weights(node, graph):
            continue
        # Keyed by node name, else op type (weight_uses) or weight name (WeightUse.name).
        weight_name = node.inputs[1].name if len(node.inputs) > 1 and node.inputs[1] is not None else None
        key = next((k for k in (node.name or node.op_type, weight_name) if k and k in skipped), None)
        if key is not None:
            kept.append(f"{key} ({skipped[key]})")
    if not kept:
        return []
    return [f"{len(kept)} recurrent layer(s) left in float: " + "; ".join(kept[:8]) + (" …" if len(kept) > 8 else "")]


def _stores_float_weights(node: ir.Node, graph: ir.Graph) -> bool:
    """Whether W or R is still a float initializer (an encoded one is rebuilt, not stored)."""
    return any(value is not None and value.name in graph.initializers and value.dtype == ir.DataType.FLOAT
               for value in node.inputs[1:3])
