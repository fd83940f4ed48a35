"""`quantize-static` (`quantize/static.py`): calibrated QDQ pairs. Outputs keep a cosine of at
least 0.99 to float (activations are rounded too)."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import pytest

from graphopt.errors import RecipeError
from graphopt.passes import get_pass
from graphopt.passes.pipeline import op_histogram
from tests.conftest import run
from tests.passes.quantize.models import calibrated, conv_model, cosine


def test_static_requires_opset_13(rng):
    model = ir.serde.deserialize_model(conv_model(rng, opset=12))
    with pytest.raises(RecipeError, match="quantize-static needs default-domain opset >= 13, the model has 12"):
        calibrated(get_pass("quantize-static")(), rng)(model)


def test_static_structure_bias_and_parity(rng):
    proto = conv_model(rng)
    model = ir.serde.deserialize_model(proto)
    result = calibrated(get_pass("quantize-static")(method="minmax"), rng)(model)
    assert result.changes == {"layers quantized": 2}
    ops = op_histogram(model)
    # X and the two conv outputs get a Q/DQ pair each (conv1's output pair feeds Relu, conv2
    # reads Relu's output through its own pair); weights and bias one DequantizeLinear each.
    assert ops["QuantizeLinear"] == 4 and ops["DequantizeLinear"] == 4 + 3
    bias = [v for n, v in model.graph.initializers.items() if n.endswith("_int32")]
    assert len(bias) == 1 and bias[0].const_value.dtype == ir.DataType.INT32
    x = rng.standard_normal((1, 8, 16, 16)).astype(np.float32)
    assert cosine(run(proto, {"X": x})[0], run(model, {"X": x})[0]) > 0.99  # activations rounded to 8 bits


def test_static_skips_unselected_nodes(rng):
    model = ir.serde.deserialize_model(conv_model(rng))
    result = calibrated(get_pass("quantize-static")(nodes=("conv2",)), rng)(model)
    assert result.changes == {"layers quantized": 1}
    assert result.details["skipped"]["conv1"] == "not selected"
