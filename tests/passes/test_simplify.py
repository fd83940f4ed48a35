"""simplify: onnxsim folding, verified in onnxruntime; skipped (never fatal) when onnxsim misbehaves."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import helper

from graphopt.passes import get_pass
from graphopt.passes.pipeline import op_histogram
from tests.conftest import make_model, run, tensor


def foldable_model(rng: np.random.Generator) -> onnx.ModelProto:
    """Y = Relu(X + (A * B)), where A * B only depends on initializers."""
    a = rng.standard_normal((4,)).astype(np.float32)
    b = rng.standard_normal((4,)).astype(np.float32)
    return make_model(
        [
            helper.make_node("Mul", ["A", "B"], ["ab"], name="fold_me"),
            helper.make_node("Add", ["X", "ab"], ["s"], name="add"),
            helper.make_node("Relu", ["s"], ["Y"], name="relu"),
        ],
        [tensor("X", ["N", 4])],
        [tensor("Y", ["N", 4])],
        [a, b],
        names=["A", "B"],
    )


def test_folds_constant_subexpressions_with_parity(rng):
    proto = foldable_model(rng)
    result = get_pass("simplify")()(ir.serde.deserialize_model(proto))
    assert result.modified
    assert op_histogram(result.model) == {"Add": 1, "Relu": 1}
    x = rng.standard_normal((3, 4)).astype(np.float32)
    np.testing.assert_allclose(run(result.model, {"X": x})[0], run(proto, {"X": x})[0], atol=1e-6)


def test_second_run_reports_no_change(rng):
    first = get_pass("simplify")()(ir.serde.deserialize_model(foldable_model(rng)))
    second = get_pass("simplify")()(first.model)
    assert not second.modified
    assert second.notes == []


def test_onnxsim_failure_skips_the_step_with_a_note(rng, monkeypatch):
    import onnxsim

    def broken(*args, **kwargs):
        raise RuntimeError("simulated onnxsim crash\nwith a second line")

    monkeypatch.setattr(onnxsim, "simplify", broken)
    model = ir.serde.deserialize_model(foldable_model(rng))
    result = get_pass("simplify")()(model)
    assert not result.modified
    assert result.notes == ["onnxsim failed (simulated onnxsim crash); step skipped"]
    assert op_histogram(result.model) == {"Mul": 1, "Add": 1, "Relu": 1}


def test_onnxsim_result_that_changes_outputs_is_refused(rng, monkeypatch):
    import onnxsim

    real = onnxsim.simplify

    def miscompiling(proto, **kwargs):
        simplified, ok = real(proto, **kwargs)
        for init in simplified.graph.initializer:  # corrupt the folded constant
            array = onnx.numpy_helper.to_array(init) + 1.0
            init.CopyFrom(onnx.numpy_helper.from_array(array.astype(np.float32), init.name))
        return simplified, ok

    monkeypatch.setattr(onnxsim, "simplify", miscompiling)
    result = get_pass("simplify")()(ir.serde.deserialize_model(foldable_model(rng)))
    assert not result.modified
    assert len(result.notes) == 1 and "changed the outputs" in result.notes[0]


def test_unknown_option_names_the_valid_ones():
    with pytest.raises(TypeError, match="valid options: check_n, fuse_bn, max_growth, tolerance"):
        get_pass("simplify")(check=3)


def test_what_onnxsim_prints_below_python_goes_to_the_debug_log(capfd, caplog):
    """onnxsim's C++ core writes warnings straight to file descriptor 2: `-q` must silence them."""
    import logging
    import os

    from graphopt.passes.simplify import _quiet

    with caplog.at_level(logging.DEBUG, logger="graphopt.passes.simplify"), _quiet():
        os.write(2, b"[W] onnxsim: raw warning from C++\n")
        print("progress on stdout")
    out, err = capfd.readouterr()
    assert out == "" and err == ""
    assert [r.getMessage() for r in caplog.records] == ["onnxsim: progress on stdout",
                                                        "onnxsim: [W] onnxsim: raw warning from C++"]
