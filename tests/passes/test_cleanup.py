"""cleanup: dead nodes, Identity, unused and duplicate initializers, inferred shapes."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
from onnx import helper

from graphopt.passes import get_pass
from graphopt.passes.pipeline import op_histogram
from tests.conftest import make_model, run, tensor


def messy_model(rng: np.random.Generator) -> onnx.ModelProto:
    """Y = (Identity(X) + B1) * B2 where B2 duplicates B1; plus a dead Sigmoid branch and an
    initializer nobody reads."""
    b = rng.standard_normal(4).astype(np.float32)
    return make_model(
        [
            helper.make_node("Identity", ["X"], ["x_copy"], name="identity"),
            helper.make_node("Add", ["x_copy", "B1"], ["s"], name="add"),
            helper.make_node("Mul", ["s", "B2"], ["Y"], name="mul"),
            helper.make_node("Sigmoid", ["s"], ["dead"], name="dead_sigmoid"),
        ],
        [tensor("X", ["N", 4])],
        [tensor("Y", ["N", 4])],
        [b, b.copy(), np.zeros(7, np.float32)],
        names=["B1", "B2", "unused"],
    )


def test_removes_dead_identity_duplicates_and_unused(rng):
    proto = messy_model(rng)
    result = get_pass("cleanup")()(ir.serde.deserialize_model(proto))
    assert result.modified
    assert op_histogram(result.model) == {"Add": 1, "Mul": 1}
    assert len(result.model.graph.initializers) == 1
    assert result.changes["nodes removed"] == 2
    assert result.changes["initializers removed"] == 2
    x = rng.standard_normal((5, 4)).astype(np.float32)
    np.testing.assert_array_equal(run(result.model, {"X": x})[0], run(proto, {"X": x})[0])


def test_second_run_reports_no_change(rng):
    model = ir.serde.deserialize_model(messy_model(rng))
    get_pass("cleanup")()(model)
    assert not get_pass("cleanup")()(model).modified


def test_identity_between_graph_input_and_output_is_kept():
    """Removing it would rename an output or merge an input into an output."""
    proto = make_model([helper.make_node("Identity", ["X"], ["Y"])], [tensor("X", [2])], [tensor("Y", [2])])
    result = get_pass("cleanup")()(ir.serde.deserialize_model(proto))
    assert not result.modified
    assert [v.name for v in result.model.graph.outputs] == ["Y"]
    assert [v.name for v in result.model.graph.inputs] == ["X"]


def test_drops_inferred_shapes_unless_asked_to_keep_them(rng):
    proto = onnx.shape_inference.infer_shapes(messy_model(rng))
    assert len(proto.graph.value_info) > 0
    kept = get_pass("cleanup")(keep_value_info=True)(ir.serde.deserialize_model(proto))
    assert kept.changes["value infos dropped"] == 0
    dropped = get_pass("cleanup")()(ir.serde.deserialize_model(proto))
    assert dropped.changes["value infos dropped"] > 0
    assert [v.shape for v in dropped.model.graph.outputs] == [ir.Shape(["N", 4])]
