"""lift-constants: Constant-node weights become initializers, subgraphs included."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
from onnx import helper, numpy_helper

from graphopt.passes import get_pass
from graphopt.passes.pipeline import op_histogram
from tests.conftest import make_model, run, tensor


def constant_weight_model(rng: np.random.Generator) -> onnx.ModelProto:
    """Y = X @ W with W in a Constant node (how Paddle and TF exports store weights), plus a
    Constant with ``value_ints`` that is not a weight."""
    w = rng.standard_normal((4, 3)).astype(np.float32)
    return make_model(
        [
            helper.make_node("Constant", [], ["W"], value=numpy_helper.from_array(w, "W"), name="w_const"),
            helper.make_node("MatMul", ["X", "W"], ["h"], name="matmul"),
            helper.make_node("Constant", [], ["shape"], value_ints=[-1], name="shape_const"),
            helper.make_node("Reshape", ["h", "shape"], ["Y"], name="flatten"),
        ],
        [tensor("X", [2, 4])],
        [tensor("Y", [6])],
    )


def test_lifts_tensor_constants_only(rng):
    proto = constant_weight_model(rng)
    result = get_pass("lift-constants")()(ir.serde.deserialize_model(proto))
    assert result.modified
    assert result.changes == {"constants lifted": 1}
    assert "W" in result.model.graph.initializers
    assert op_histogram(result.model) == {"MatMul": 1, "Constant": 1, "Reshape": 1}
    x = rng.standard_normal((2, 4)).astype(np.float32)
    np.testing.assert_array_equal(run(result.model, {"X": x})[0], run(proto, {"X": x})[0])


def test_second_run_reports_no_change(rng):
    model = ir.serde.deserialize_model(constant_weight_model(rng))
    get_pass("lift-constants")()(model)
    again = get_pass("lift-constants")()(model)
    assert not again.modified and again.changes == {"constants lifted": 0}


def test_small_constants_stay_below_min_elements(rng):
    model = ir.serde.deserialize_model(constant_weight_model(rng))
    result = get_pass("lift-constants")(min_elements=100)(model)
    assert not result.modified
    assert op_histogram(model)["Constant"] == 2


def test_lifts_constants_inside_if_branches(rng):
    bias = numpy_helper.from_array(np.array([1.0, 2.0], dtype=np.float32), "bias")
    then_graph = helper.make_graph(
        [helper.make_node("Constant", [], ["c"], value=bias), helper.make_node("Add", ["X", "c"], ["t"])],
        "then", [], [tensor("t", [2])],
    )
    else_graph = helper.make_graph([helper.make_node("Neg", ["X"], ["e"])], "else", [], [tensor("e", [2])])
    proto = make_model(
        [helper.make_node("If", ["cond"], ["Y"], then_branch=then_graph, else_branch=else_graph)],
        [tensor("cond", [], onnx.TensorProto.BOOL), tensor("X", [2])],
        [tensor("Y", [2])],
    )
    result = get_pass("lift-constants")()(ir.serde.deserialize_model(proto))
    assert result.changes == {"constants lifted": 1}
    x = np.array([3.0, 4.0], dtype=np.float32)
    for cond in (True, False):
        feeds = {"cond": np.array(cond), "X": x}
        np.testing.assert_array_equal(run(result.model, feeds)[0], run(proto, feeds)[0])
