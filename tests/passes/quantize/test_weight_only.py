"""`quantize-weights` (`quantize/weight_only.py`): int8 weights, float compute.

Tolerance: per-channel int8 keeps a relative weight error near 2^-8 per element; outputs keep
a cosine of at least 0.999 to float on these small random layers."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
from onnx import helper

from graphopt.passes import get_pass
from graphopt.passes.pipeline import op_histogram
from tests.conftest import linear_model, make_model, run, tensor
from tests.passes.quantize.models import cosine


def test_weight_only_structure_parity_and_idempotence(rng):
    proto = linear_model(rng, k=64, n=32)
    model = ir.serde.deserialize_model(proto)
    result = get_pass("quantize-weights")()(model)
    assert result.changes == {"weights encoded": 1}
    assert op_histogram(model) == {"Cast": 1, "Mul": 1, "MatMul": 1, "Add": 1, "Relu": 1}
    assert model.graph.initializers["W_int8"].const_value.dtype == ir.DataType.INT8
    assert "W" not in model.graph.initializers  # the float weight is gone; its name now names Mul's output
    x = rng.standard_normal((16, 64)).astype(np.float32)
    reference, quantized = run(proto, {"X": x})[0], run(model, {"X": x})[0]
    assert cosine(reference, quantized) > 0.9999  # weight error only
    assert not get_pass("quantize-weights")()(model).modified  # int8 weights are not float initializers


def test_weight_only_leaves_small_int_and_runtime_weights_alone(rng):
    w = rng.standard_normal((4, 4)).astype(np.float32)
    proto = make_model(
        [helper.make_node("MatMul", ["X", "W"], ["h"], name="small"),
         helper.make_node("MatMul", ["h", "R"], ["Y"], name="runtime_weight")],
        [tensor("X", [2, 4]), tensor("R", [4, 4])], [tensor("Y", [2, 4])], [w], names=["W"],
    )
    result = get_pass("quantize-weights")()(ir.serde.deserialize_model(proto))
    assert not result.modified
    assert result.details["skipped"] == {
        "small": "weight has 16 elements (< 1024)",
        "runtime_weight": "weight is not a constant float initializer",
    }
