"""Tiny models for the verification tests, built with onnx.helper; each builder's docstring
is its graph, so a test that calls ``linear_model(scale=1.5)`` shows what it runs."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import onnx
import onnx_ir as ir
from onnx import TensorProto, helper, numpy_helper

from graphopt.verify.feeds import InputSpec, input_specs
from tests.conftest import make_model as shared_make_model

# Exactly representable in float32, so numpy and onnxruntime agree to the last bit.
LINEAR_W = np.arange(12, dtype=np.float32).reshape(4, 3) / 8
LINEAR_B = np.array([0.5, -0.25, 0.125], dtype=np.float32)

Dim = int | str | None


def make_model(nodes: Sequence[onnx.NodeProto], inputs: Sequence[onnx.ValueInfoProto],
               outputs: Sequence[onnx.ValueInfoProto], initializers: Sequence[onnx.TensorProto] = ()) -> onnx.ModelProto:
    """``tests.conftest.make_model`` at opset 17, IR 9, fully checked."""
    return shared_make_model(nodes, inputs, outputs, initializers, ir_version=9, full_check=True)


def linear_model(scale: float = 1.0, *, batch: Dim = "N", input_name: str = "X", output_name: str = "Y") -> onnx.ModelProto:
    """X float[batch,4] → MatMul W[4,3] (W = LINEAR_W * scale) → Add b[3] → Y float[batch,3]."""
    return make_model(
        [helper.make_node("MatMul", [input_name, "W"], ["H"]), helper.make_node("Add", ["H", "b"], [output_name])],
        [helper.make_tensor_value_info(input_name, TensorProto.FLOAT, [batch, 4])],
        [helper.make_tensor_value_info(output_name, TensorProto.FLOAT, [batch, 3])],
        [numpy_helper.from_array(LINEAR_W * np.float32(scale), "W"), numpy_helper.from_array(LINEAR_B, "b")],
    )


def two_input_model() -> onnx.ModelProto:
    """X float[N,4], ids int64[N,4] → Cast(ids, float) → Add X → Y float[N,4]."""
    return make_model(
        [
            helper.make_node("Cast", ["ids"], ["ids_f"], to=TensorProto.FLOAT),
            helper.make_node("Add", ["X", "ids_f"], ["Y"]),
        ],
        [
            helper.make_tensor_value_info("X", TensorProto.FLOAT, ["N", 4]),
            helper.make_tensor_value_info("ids", TensorProto.INT64, ["N", 4]),
        ],
        [helper.make_tensor_value_info("Y", TensorProto.FLOAT, ["N", 4])],
    )


def classifier_model(weights: np.ndarray) -> onnx.ModelProto:
    """X float[N,4] → MatMul W[4,C] → logits float[N,C]: the last axis is the class axis."""
    classes = weights.shape[1]
    return make_model(
        [helper.make_node("MatMul", ["X", "W"], ["logits"])],
        [helper.make_tensor_value_info("X", TensorProto.FLOAT, ["N", 4])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", classes])],
        [numpy_helper.from_array(weights.astype(np.float32), "W")],
    )


def identity_model(shape: Sequence[Dim], dtype: int = TensorProto.FLOAT) -> onnx.ModelProto:
    """X dtype[shape] → Identity → Y: a model whose only interest is its input signature."""
    return make_model(
        [helper.make_node("Identity", ["X"], ["Y"])],
        [helper.make_tensor_value_info("X", dtype, list(shape))],
        [helper.make_tensor_value_info("Y", dtype, list(shape))],
    )


def specs_of(model: onnx.ModelProto) -> list[InputSpec]:
    return input_specs(ir.from_proto(model))
