"""`quantize-dynamic` (`quantize/dynamic.py`): int8 weights, activations quantized at run time,
optional smoothing of outlier channels."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import pytest
from onnx import helper

from graphopt.errors import DataError
from graphopt.passes import get_pass
from graphopt.passes.base import PassContext
from graphopt.passes.pipeline import op_histogram
from graphopt.verify.feeds import FeedSet
from tests.conftest import linear_model, make_model, run, tensor
from tests.passes.quantize.models import cosine


def test_dynamic_structure_and_parity(rng):
    proto = linear_model(rng, k=64, n=32)
    model = ir.serde.deserialize_model(proto)
    result = get_pass("quantize-dynamic")()(model)
    assert result.changes == {"layers quantized": 1}
    assert op_histogram(model) == {"DynamicQuantizeLinear": 1, "MatMulInteger": 1, "Cast": 1, "Mul": 2,
                                   "Add": 1, "Relu": 1}
    x = rng.standard_normal((16, 64)).astype(np.float32)
    assert cosine(run(proto, {"X": x})[0], run(model, {"X": x})[0]) > 0.999  # activation rounding too


def test_dynamic_gemm_trans_b_bias_beta_and_graph_output(rng):
    w = rng.standard_normal((32, 64)).astype(np.float32)  # [N, K] with transB
    c = rng.standard_normal(32).astype(np.float32)
    proto = make_model([helper.make_node("Gemm", ["X", "W", "C"], ["Y"], transB=1, beta=0.5, name="gemm")],
                       [tensor("X", [4, 64])], [tensor("Y", [4, 32])], [w, c], names=["W", "C"])
    model = ir.serde.deserialize_model(proto)
    assert get_pass("quantize-dynamic")()(model).modified
    assert [v.name for v in model.graph.outputs] == ["Y"]
    x = rng.standard_normal((4, 64)).astype(np.float32)
    reference = x @ w.T + 0.5 * c
    assert cosine(reference, run(model, {"X": x})[0]) > 0.999


def test_dynamic_gemm_with_a_computed_bias_keeps_its_beta(rng):
    """β scales a bias that is computed (a graph input here), not only a constant one."""
    w = rng.standard_normal((64, 32)).astype(np.float32)
    proto = make_model([helper.make_node("Gemm", ["X", "W", "C"], ["Y"], beta=0.25, name="gemm")],
                       [tensor("X", [4, 64]), tensor("C", [32])], [tensor("Y", [4, 32])], [w], names=["W"])
    model = ir.serde.deserialize_model(proto)
    assert get_pass("quantize-dynamic")()(model).modified
    x, c = rng.standard_normal((4, 64)).astype(np.float32), 100 * rng.standard_normal(32).astype(np.float32)
    assert cosine(x @ w + 0.25 * c, run(model, {"X": x, "C": c})[0]) > 0.999


def test_shared_activation_is_quantized_once(rng):
    w1, w2 = (rng.standard_normal((64, 32)).astype(np.float32) for _ in range(2))
    proto = make_model(
        [helper.make_node("MatMul", ["X", "W1"], ["A"], name="q"), helper.make_node("MatMul", ["X", "W2"], ["B"], name="k")],
        [tensor("X", [4, 64])], [tensor("A", [4, 32]), tensor("B", [4, 32])], [w1, w2], names=["W1", "W2"],
    )
    model = ir.serde.deserialize_model(proto)
    get_pass("quantize-dynamic")()(model)
    assert op_histogram(model)["DynamicQuantizeLinear"] == 1


def test_smoothing_needs_calibration(rng):
    model = ir.serde.deserialize_model(linear_model(rng, k=64, n=32))
    with pytest.raises(DataError, match="needs calibration data"):
        get_pass("quantize-dynamic")(smooth_alpha=0.8)(model)


def test_smoothing_tames_outlier_channels(rng):
    """Two input channels 100× larger than the rest: per-tensor activation quantization loses
    the small channels unless the range is migrated into the weights."""
    proto = linear_model(rng, k=64, n=32)
    gain = np.ones(64, np.float32)
    gain[[3, 40]] = 100.0
    feeds = [{"X": (rng.standard_normal((8, 64)) * gain).astype(np.float32)} for _ in range(8)]
    errors = {}
    for alpha in (0.0, 0.8):
        model = ir.serde.deserialize_model(proto)
        step = get_pass("quantize-dynamic")(smooth_alpha=alpha)
        step(model, PassContext(calibration=FeedSet(feeds, "test", False), threads=1))
        x = feeds[0]["X"]
        reference = run(proto, {"X": x})[0]
        errors[alpha] = float(np.abs(run(model, {"X": x})[0] - reference).mean())
    assert errors[0.8] < 0.5 * errors[0.0]
