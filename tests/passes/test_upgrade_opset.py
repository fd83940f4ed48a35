"""upgrade-opset: onnx's version converter, never lowering the opset."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
from onnx import helper

from graphopt.passes import get_pass
from tests.conftest import make_model, run, tensor


def clip_model_opset10():
    """Clip with min/max attributes: an input-form op from opset 11 on."""
    return make_model(
        [helper.make_node("Clip", ["X"], ["Y"], min=-0.5, max=0.5)],
        [tensor("X", [3])], [tensor("Y", [3])], opset=10,
    )


def test_upgrades_and_keeps_outputs():
    proto = clip_model_opset10()
    result = get_pass("upgrade-opset")(target=13)(ir.serde.deserialize_model(proto))
    assert result.modified
    assert result.model.opset_imports[""] == 13
    clip = next(n for n in result.model.graph if n.op_type == "Clip")
    assert clip.op_type == "Clip" and len(clip.inputs) == 3 and not clip.attributes
    x = np.array([-2.0, 0.25, 3.0], dtype=np.float32)
    np.testing.assert_array_equal(run(result.model, {"X": x})[0], run(proto, {"X": x})[0])


def test_model_at_target_is_left_alone():
    upgraded = get_pass("upgrade-opset")(target=13)(ir.serde.deserialize_model(clip_model_opset10())).model
    assert not get_pass("upgrade-opset")(target=13)(upgraded).modified


def test_never_lowers_the_opset():
    proto = make_model([helper.make_node("Relu", ["X"], ["Y"])], [tensor("X", [3])], [tensor("Y", [3])], opset=17)
    result = get_pass("upgrade-opset")(target=13)(ir.serde.deserialize_model(proto))
    assert not result.modified
    assert result.model.opset_imports[""] == 17


def test_a_model_importing_com_microsoft_is_upgraded():
    """Every model onnxruntime optimized or quantized imports com.microsoft: onnx's IR-version
    table does not know that domain, and must not be asked about it."""
    nodes = [helper.make_node("Relu", ["X"], ["c"]), helper.make_node("Gelu", ["c"], ["Y"], domain="com.microsoft")]
    graph = helper.make_graph(nodes, "ms", [tensor("X", [3])], [tensor("Y", [3])])
    proto = helper.make_model(graph, ir_version=6, opset_imports=[helper.make_opsetid("", 11),
                                                                  helper.make_opsetid("com.microsoft", 1)])
    result = get_pass("upgrade-opset")(target=13)(ir.serde.deserialize_model(proto))
    assert result.model.opset_imports == {"": 13, "com.microsoft": 1} and result.model.ir_version == 7
    x = np.array([-2.0, 0.25, 3.0], dtype=np.float32)
    np.testing.assert_allclose(run(result.model, {"X": x})[0], run(proto, {"X": x})[0], rtol=1e-6)
