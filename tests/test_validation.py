"""`validation`: onnxruntime kernels registered in the default ONNX domain (decoder norms as
onnxruntime and its model builders emit them) pass, and the rest of the check still applies."""

from __future__ import annotations

import numpy as np
import pytest
from onnx import helper

from graphopt.errors import InvalidModelError
from graphopt.io import load_model
from graphopt.verify.runtime import check_loadable
from tests.conftest import run, save, tensor


def rms_norm_model(*, dangling: bool = False):
    """X[N,8] → SimplifiedLayerNormalization (default domain, as onnxruntime registers it) → Y."""
    node = helper.make_node("SimplifiedLayerNormalization", ["X", "scale"], ["Y"], axis=-1, epsilon=1e-6)
    extra = [helper.make_node("Relu", ["missing"], ["Z"])] if dangling else []
    proto = helper.make_model(helper.make_graph(
        [node, *extra], "g", [tensor("X", ["N", 8])], [tensor("Y", ["N", 8])],
        [helper.make_tensor("scale", 1, [8], np.ones(8, np.float32))]), opset_imports=[helper.make_opsetid("", 17)],
        ir_version=8)
    return proto


def test_a_default_domain_runtime_norm_loads_checks_and_runs(tmp_path):
    path = save(rms_norm_model(), tmp_path / "m.onnx")
    loaded = load_model(path)
    check_loadable(loaded.model)
    x = np.arange(16, dtype=np.float32).reshape(2, 8)
    expected = x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + 1e-6)
    np.testing.assert_allclose(run(path, {"X": x})[0], expected, rtol=1e-5)


def test_the_rest_of_the_check_still_applies(tmp_path):
    path = tmp_path / "bad.onnx"
    path.write_bytes(rms_norm_model(dangling=True).SerializeToString())
    with pytest.raises(InvalidModelError):
        load_model(path)

