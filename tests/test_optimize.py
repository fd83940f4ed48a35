"""`optimize` on the models users bring: nothing changed writes the input's bytes, one
calibration feed is data, -1 dimensions are dynamic, a final check that contradicts a search
sends it further down its ladder."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import helper, numpy_helper

from graphopt.cli import main
from graphopt.passes import GraphoptPass, PassResult
from graphopt.passes.base import PassContext
from graphopt.passes.registry import _PASSES, register
from graphopt.verify.feeds import input_specs
from tests.conftest import linear_model, make_model, run, save, tensor
from tests.passes.quantize.models import sensitive_model


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("GRAPHOPT_CACHE_DIR", str(tmp_path / "cache"))


def test_a_run_that_changes_nothing_writes_the_input_bytes(tmp_path, capsys):
    proto = make_model([helper.make_node("Relu", ["X"], ["Y"], name="relu")], [tensor("X", ["N", 4])],
                       [tensor("Y", ["N", 4])])
    path, out = save(proto, tmp_path / "m.onnx"), tmp_path / "out.onnx"
    before = path.read_bytes()

    assert main(["optimize", str(path), "-o", str(out), "--no-latency", "-q"]) == 0, capsys.readouterr().err

    assert out.read_bytes() == before == path.read_bytes()


def test_a_rewrite_does_not_grow_the_file_by_serialization_alone(tmp_path, rng, capsys):
    """onnx-ir writes the default opset's empty domain; the writer leaves it out again."""
    proto = linear_model(rng)
    proto.graph.node.insert(0, helper.make_node("Identity", ["X"], ["x_copy"], name="copy"))
    proto.graph.node[1].input[0] = "x_copy"
    path, out = save(proto, tmp_path / "m.onnx"), tmp_path / "out.onnx"

    assert main(["optimize", str(path), "-o", str(out), "--no-latency", "-q"]) == 0, capsys.readouterr().err

    assert out.stat().st_size < path.stat().st_size
    assert not onnx.load(out).opset_import[0].HasField("domain")


def _one_test_data_set(folder: Path, proto: onnx.ModelProto, x: np.ndarray) -> Path:
    data = folder / "test_data_set_0"
    data.mkdir(parents=True)
    (data / "input_0.pb").write_bytes(numpy_helper.from_array(x, proto.graph.input[0].name).SerializeToString())
    return folder


def test_one_calibration_feed_is_data_marked_weak(tmp_path, capsys):
    proto = sensitive_model(np.random.default_rng(0))
    path, out, report = save(proto, tmp_path / "m.onnx"), tmp_path / "out.onnx", tmp_path / "r.json"
    data = _one_test_data_set(tmp_path / "data", proto, np.random.default_rng(1).standard_normal((4, 64)).astype(np.float32))

    code = main(["optimize", str(path), "-o", str(out), "--recipe", "int8", "--calib", str(data), "--data", str(data),
                 "--no-latency", "-q", "--report", str(report)])

    assert code == 0, capsys.readouterr().err
    step = next(s for s in json.loads(report.read_text())["steps"] if s["name"] == "quantize-int8")
    assert step["details"]["held_out"]["weak_evidence"] is True
    assert "one calibration feed: it both calibrated and judged the result (weak evidence)" in step["notes"]
    modes = {layer["node"]: layer["mode"] for layer in step["details"]["layers"]}
    assert modes["sensitive"] == "float"


def test_minus_one_and_zero_dimensions_are_dynamic(tmp_path, rng, capsys):
    """Paddle writes a dynamic batch as -1: a stacked .npz of 32 samples is 32 feeds, not none."""
    proto = linear_model(rng, k=64, n=64)
    proto.graph.input[0].type.tensor_type.shape.dim[0].dim_value = -1
    proto.graph.output[0].type.tensor_type.shape.dim[0].dim_value = 0
    path, out = save(proto, tmp_path / "m.onnx"), tmp_path / "out.onnx"
    assert [s.shape for s in input_specs(ir.serde.deserialize_model(proto))] == [(None, 64)]
    np.savez(tmp_path / "calib.npz", X=rng.standard_normal((32, 64)).astype(np.float32))

    code = main(["optimize", str(path), "-o", str(out), "--recipe", "int8", "--calib", str(tmp_path / "calib.npz"),
                 "--no-latency", "-q"])

    assert code == 0, capsys.readouterr().err
    x = rng.standard_normal((3, 64)).astype(np.float32)
    assert run(out, {"X": x})[0].shape == (3, 64)


class _NoisyUntilRetreatPass(GraphoptPass):
    """A searching pass whose held-out judgement is fooled: it adds noise that only the final
    check sees, unless the run has retreated once."""

    name = "test-noisy-until-retreat"
    summary = "test only"

    def searches(self) -> bool:
        return True

    def apply(self, model: ir.Model, context: PassContext) -> PassResult:
        weight = model.graph.initializers["W"]
        noise = 0.5 if context.retreat == 0 else 1e-7
        array = weight.const_value.numpy() + noise
        weight.const_value = ir.tensor(array.astype(np.float32), name="W")
        return PassResult(model, modified=True, details={"retreat": context.retreat})


@pytest.fixture
def noisy_pass():
    register(_NoisyUntilRetreatPass)
    yield
    _PASSES.pop(_NoisyUntilRetreatPass.name)


@pytest.mark.usefixtures("noisy_pass")
def test_a_final_check_that_contradicts_a_search_sends_it_further_down(tmp_path, rng, capsys):
    path, out, report = save(linear_model(rng), tmp_path / "m.onnx"), tmp_path / "out.onnx", tmp_path / "r.json"
    recipe = tmp_path / "r.toml"
    recipe.write_text('min_cosine = 0.999\n[[steps]]\npass = "test-noisy-until-retreat"\n')

    code = main(["optimize", str(path), "-o", str(out), "--recipe", str(recipe), "--no-latency", "--report", str(report)])

    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert "verification missed the budget (min_cosine); searching again one step further down (retreat 1" in captured.err
    data = json.loads(report.read_text())
    assert data["retreats"] == 1 and data["steps"][0]["details"] == {"retreat": 1}




def _two_layer_model(rng: np.random.Generator) -> onnx.ModelProto:
    w1 = rng.standard_normal((64, 64)).astype(np.float32) * 0.2
    w2 = rng.standard_normal((64, 64)).astype(np.float32) * 0.2
    return make_model(
        [helper.make_node("MatMul", ["X", "W1"], ["h"], name="first"),
         helper.make_node("Relu", ["h"], ["r"], name="relu"),
         helper.make_node("MatMul", ["r", "W2"], ["features"], name="second")],
        [tensor("X", ["N", 64])], [tensor("features", ["N", 64])], [w1, w2], names=["W1", "W2"],
    )


@pytest.mark.parametrize(("recipe", "pattern"), [("int8", "second"), ("int8", "W2"), ("codebook4", "sec*")])
def test_excluded_nodes_stay_float_in_every_lossy_recipe(recipe, pattern, tmp_path, rng, capsys):
    proto = _two_layer_model(rng)
    path, out = save(proto, tmp_path / "m.onnx"), tmp_path / "out.onnx"
    np.savez(tmp_path / "c.npz", X=rng.standard_normal((16, 64)).astype(np.float32))

    code = main(["optimize", str(path), "-o", str(out), "--recipe", recipe, "--calib", str(tmp_path / "c.npz"),
                 "--exclude", pattern, "--no-latency", "-q", "--min-cosine", "0.9"])

    assert code == 0, capsys.readouterr().err
    written = onnx.load(out)
    second = next(n for n in written.graph.node if n.name == "second")
    weights = {t.name: t for t in written.graph.initializer}
    assert second.input[1] == "W2" and weights["W2"].data_type == onnx.TensorProto.FLOAT
    np.testing.assert_array_equal(numpy_helper.to_array(weights["W2"]), numpy_helper.to_array(proto.graph.initializer[1]))
    assert "W1" not in weights or weights["W1"].data_type != onnx.TensorProto.FLOAT  # the other layer was encoded


def test_prune_channels_leaves_excluded_layers_whole(tmp_path, rng, capsys):
    from graphopt.passes import get_pass
    from graphopt.passes.base import PassContext

    model = ir.serde.deserialize_model(_two_layer_model(rng))
    pass_ = get_pass("prune-channels")(amount=0.5)
    result = pass_(model, PassContext(exclude=("first",)))
    assert not result.modified and model.graph.initializers["W1"].const_value.shape == (64, 64)


def test_fix_shape_writes_static_input_shapes_and_verifies_them(tmp_path, rng, capsys):
    path, out = save(linear_model(rng), tmp_path / "m.onnx"), tmp_path / "out.onnx"

    assert main(["optimize", str(path), "-o", str(out), "--fix-shape", "X=3,8", "--no-latency", "-q"]) == 0

    dims = [d.dim_value for d in onnx.load(out).graph.input[0].type.tensor_type.shape.dim]
    assert dims == [3, 8]
    assert run(out, {"X": np.ones((3, 8), np.float32)})[0].shape == (3, 4)
    assert main(["optimize", str(path), "-o", str(tmp_path / "bad.onnx"), "--fix-shape", "X=3,9", "-q"]) == 2
    assert "--fix-shape X: axis 1 is fixed at 8 in the model, not 9" in capsys.readouterr().err
    assert not (tmp_path / "bad.onnx").exists()


class _GrowPass(GraphoptPass):
    """A compressing step gone wrong: the output gets 64 KiB of zeros added to it."""

    name = "test-grow"
    summary = "test only"
    role = "compress"

    def apply(self, model: ir.Model, context: PassContext) -> PassResult:
        graph = model.graph
        zeros = ir.Value(name="zeros", const_value=ir.tensor(np.zeros(16384, np.float32), name="zeros"))
        graph.register_initializer(zeros)
        total = ir.node("ReduceSum", [zeros], {"keepdims": 0}, name="total")
        output = graph.outputs[0]
        add = ir.node("Add", [output, total.outputs[0]], name="plus_zero")
        graph.append(total)
        graph.append(add)
        add.outputs[0].name, output.name = output.name, f"{output.name}_before"
        add.outputs[0].dtype, add.outputs[0].shape = output.dtype, output.shape
        graph.outputs[0] = add.outputs[0]
        return PassResult(model, modified=True)


@pytest.fixture
def grow_pass():
    register(_GrowPass)
    yield
    _PASSES.pop(_GrowPass.name)


@pytest.mark.usefixtures("grow_pass")
def test_a_recipe_is_never_worse_than_its_fallback(tmp_path, rng):
    path, out, report = save(linear_model(rng), tmp_path / "m.onnx"), tmp_path / "out.onnx", tmp_path / "r.json"
    lower = tmp_path / "lower.toml"
    lower.write_text('max_abs = 1e-4\n[[steps]]\npass = "cleanup"\n')
    upper = tmp_path / "upper.toml"
    upper.write_text(f'max_abs = 1e-4\nfallback = "{lower}"\n[[steps]]\npass = "cleanup"\n[[steps]]\npass = "test-grow"\n')

    code = main(["optimize", str(path), "-o", str(out), "--recipe", str(upper), "--no-latency", "--report",
                 str(report)])

    assert code == 0
    data = json.loads(report.read_text())
    assert data["recipe"]["name"] == str(lower) and data["output"] == str(out)
    assert f"more than recipe '{lower}' alone" in data["notes"][-1]
    assert out.stat().st_size < 16384 and [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []
