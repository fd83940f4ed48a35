"""int8 quantization: numeric kernels, weight-only, dynamic, static QDQ and the automatic mode.

Tolerances: int8 with per-channel scales has a relative weight error near 2^-8 per element;
on these small random layers the outputs keep a cosine of at least 0.999 to float (0.99
for static, which also rounds the activations), and max abs stays within a few percent of
the output's scale. Each test states its bound next to the assertion."""

from __future__ import annotations

import functools

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import helper

from graphopt.errors import DataError, RecipeError
from graphopt.passes import get_pass
from graphopt.passes.base import PassContext
from graphopt.passes.pipeline import op_histogram
from graphopt.passes.quantize.calibrate import TensorStats, activation_range
from graphopt.passes.quantize.numeric import quantize_bias, quantize_symmetric
from graphopt.verify.feeds import FeedSet
from tests.conftest import linear_model, make_model, run, tensor


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.reshape(-1).astype(np.float64), b.reshape(-1).astype(np.float64)
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


def conv_model(rng: np.random.Generator, *, opset: int = 17) -> onnx.ModelProto:
    """X[1,8,16,16] → Conv(16×8×3×3, bias) → Relu → Conv(16×16×1×1) → Y."""
    w1 = rng.standard_normal((16, 8, 3, 3)).astype(np.float32) * 0.2
    b1 = rng.standard_normal(16).astype(np.float32) * 0.1
    w2 = rng.standard_normal((16, 16, 1, 1)).astype(np.float32) * 0.3
    return make_model(
        [
            helper.make_node("Conv", ["X", "W1", "B1"], ["c1"], pads=[1, 1, 1, 1], name="conv1"),
            helper.make_node("Relu", ["c1"], ["r1"], name="relu"),
            helper.make_node("Conv", ["r1", "W2"], ["Y"], name="conv2"),
        ],
        [tensor("X", [1, 8, 16, 16])], [tensor("Y", [1, 16, 16, 16])],
        [w1, b1, w2], names=["W1", "B1", "W2"], opset=opset,
    )


def calibrated(pass_, rng: np.random.Generator, shape=(1, 8, 16, 16), name="X", count=8):
    feeds = [{name: rng.standard_normal(shape).astype(np.float32)} for _ in range(count)]
    return functools.partial(pass_, context=PassContext(calibration=FeedSet(feeds, "test", False), threads=1))


# -- numeric ----------------------------------------------------------------------------------


def test_values_on_the_grid_round_trip_exactly():
    scale = np.array([0.5, 0.25], np.float32)
    grid = np.array([[-127, 3, 0, 127], [64, -127, 5, 1]], np.float32) * scale[:, None]
    quantized = quantize_symmetric(grid, axis=0)
    np.testing.assert_array_equal(quantized.dequantize(), grid)
    assert quantized.values.dtype == np.int8


def test_zero_channel_gets_a_valid_scale():
    weight = np.zeros((2, 3), np.float32)
    weight[1] = [1.0, -2.0, 0.5]
    quantized = quantize_symmetric(weight, axis=0)
    assert quantized.scale[0] == 1.0 and np.all(quantized.values[0] == 0)


@pytest.mark.parametrize("max_int", [127, 7])
def test_scale_search_is_never_worse_than_plain_max(rng, max_int):
    """At 8 bits clipping rarely pays (rounding error is tiny); at 4 bits it clearly does."""
    weight = rng.standard_normal((32, 256)).astype(np.float32)
    plain = quantize_symmetric(weight, axis=0, search=False, max_int=max_int)
    searched = quantize_symmetric(weight, axis=0, max_int=max_int)
    per_channel = lambda q: np.square(q.dequantize() - weight).sum(axis=1)  # noqa: E731
    assert np.all(per_channel(searched) <= per_channel(plain) + 1e-9)
    if max_int == 7:
        assert per_channel(searched).sum() < 0.9 * per_channel(plain).sum()


def test_activation_aware_search_protects_important_columns(rng):
    """Column 0 multiplies an input 100× louder than the others: weighting the error by the
    input energy must shrink that column's error."""
    weight = rng.standard_normal((16, 64)).astype(np.float32)
    weight[:, 0] *= 0.2
    importance = np.ones(64, np.float32)
    importance[0] = 1e4
    plain = quantize_symmetric(weight, axis=0, max_int=7)
    aware = quantize_symmetric(weight, axis=0, max_int=7, importance=importance)
    column_error = lambda q: np.abs(q.dequantize()[:, 0] - weight[:, 0]).sum()  # noqa: E731
    assert column_error(aware) < column_error(plain)


def test_bias_overflow_raises_the_weight_scale():
    bias, weight_scale = quantize_bias(np.array([1e6, 0.1]), input_scale=1e-6, weight_scale=np.array([1e-6, 1e-3]))
    assert np.all(np.abs(bias.astype(np.int64)) <= np.iinfo(np.int32).max // 2)
    assert weight_scale[0] > 1e-6 and weight_scale[1] == np.float32(1e-3)


@pytest.mark.parametrize("method", ["minmax", "percentile", "entropy", "mse"])
def test_activation_ranges_contain_zero_and_clip_outliers(method, rng):
    values = np.concatenate([rng.standard_normal(100_000), [400.0]]).astype(np.float32)
    from graphopt.passes.activations import AbsHistogram, ChannelRange
    from graphopt.passes.quantize.calibrate import BINS

    seen = ChannelRange()
    seen.update(values[None])
    stats = TensorStats(seen.minimum, seen.maximum)
    histogram = AbsHistogram(stats.absmax, BINS)
    histogram.update(values[None])
    stats.histogram = histogram.counts
    low, high = activation_range(stats, method)
    assert low <= 0.0 <= high
    if method == "minmax":
        assert high == pytest.approx(400.0)
    else:
        assert high < 400.0  # the single outlier is clipped


# -- weight-only ------------------------------------------------------------------------------


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


# -- dynamic ----------------------------------------------------------------------------------


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


# -- static -----------------------------------------------------------------------------------


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


# -- automatic --------------------------------------------------------------------------------


@pytest.fixture
def injected_profile(monkeypatch, tmp_path):
    """Speed profile answers from a table instead of the clock: {kind: (float_ms, int8_ms)}."""
    from graphopt.passes.quantize import profile

    table = {}

    def timings(self, use, shape, mode):
        float_ms, int8_ms = table[use.kind]
        return {"float_ms": float_ms, "int8_ms": int8_ms}

    monkeypatch.setattr(profile.SpeedProfile, "timings", timings)
    monkeypatch.setenv("GRAPHOPT_CACHE_DIR", str(tmp_path))
    return table


def test_auto_never_picks_a_slower_int8_form(rng, injected_profile):
    injected_profile["Conv"] = (1.0, 1.5)  # int8 QDQ slower here → weight-only
    model = ir.serde.deserialize_model(conv_model(rng))
    result = calibrated(get_pass("quantize-int8")(min_elements=16), rng)(model)
    modes = {layer["node"]: layer["mode"] for layer in result.details["layers"]}
    assert modes == {"conv1": "weight-only", "conv2": "weight-only"}
    assert "QuantizeLinear" not in op_histogram(model)


def test_auto_uses_faster_int8_forms_within_the_budget(rng, injected_profile):
    injected_profile["Conv"] = (2.0, 1.0)
    model = ir.serde.deserialize_model(conv_model(rng))
    result = calibrated(get_pass("quantize-int8")(min_elements=16, min_cosine=0.9), rng, count=12)(model)
    assert {layer["mode"] for layer in result.details["layers"]} == {"static"}
    assert result.details["held_out"]["meets_target"]
    assert result.changes["rungs taken for accuracy"] == 0


def test_auto_falls_back_the_most_sensitive_layers_for_accuracy(rng, injected_profile):
    injected_profile["Conv"] = (2.0, 1.0)
    model = ir.serde.deserialize_model(conv_model(rng))
    # A tight budget: static int8 (which also rounds activations) cannot keep every layer.
    result = calibrated(get_pass("quantize-int8")(min_elements=16, min_cosine=0.9998), rng, count=12)(model)
    layers = result.details["layers"]
    assert all(layer["compute_alone"] is not None for layer in layers)
    assert result.changes["rungs taken for accuracy"] >= 1
    assert result.details["held_out"]["meets_target"]
    # Equal speed gains: the most sensitive layer is the first to fall back.
    worst = max(layers, key=lambda layer: layer["compute_alone"])
    assert worst["mode"] in ("weight-only", "float") and "for accuracy" in worst["reason"]


def test_an_unreachable_int8_budget_leaves_every_layer_in_float_and_says_so(rng, injected_profile):
    injected_profile["Conv"] = (2.0, 1.0)
    proto = conv_model(rng)
    model = ir.serde.deserialize_model(proto)
    result = calibrated(get_pass("quantize-int8")(min_elements=16, min_cosine=0.99999999), rng, count=12)(model)
    assert {layer["mode"] for layer in result.details["layers"]} == {"float"}
    assert all(layer["reason"].startswith("kept in float for accuracy") for layer in result.details["layers"])
    assert result.notes[-1] == "2 layer(s) left in float for accuracy: conv2, conv1" or \
        result.notes[-1] == "2 layer(s) left in float for accuracy: conv1, conv2"
    assert not result.modified
    assert ir.serde.serialize_model(model).SerializeToString() == \
        ir.serde.serialize_model(ir.serde.deserialize_model(proto)).SerializeToString()


def sensitive_model(rng: np.random.Generator) -> onnx.ModelProto:
    """X[N,64] → MatMul W1 → h → MatMul W2 → features[N,64].

    W1 is an ordinary layer, except that its columns 0 and 1 are equal, so h0 == h1. W2 reads
    them with +100 and -100, which cancel exactly, and carries the signal in weights of
    ~0.01: any per-channel int8 scale wide enough for ±100 rounds those to zero, in int8
    compute and weight-only alike. So W2 must stay float; W1 need not."""
    w1 = rng.standard_normal((64, 64)).astype(np.float32) * 0.2
    w1[:, 1] = w1[:, 0]
    w2 = rng.standard_normal((64, 64)).astype(np.float32) * 0.01
    w2[0], w2[1] = 100.0, -100.0
    return make_model(
        [helper.make_node("MatMul", ["X", "W1"], ["h"], name="ordinary"),
         helper.make_node("MatMul", ["h", "W2"], ["features"], name="sensitive")],
        [tensor("X", ["N", 64])], [tensor("features", ["N", 64])], [w1, w2], names=["W1", "W2"],
    )


def test_a_layer_whose_int8_and_weight_only_forms_both_break_the_budget_ends_in_float(rng, injected_profile):
    injected_profile["MatMul"] = (2.0, 1.0)
    model = ir.serde.deserialize_model(sensitive_model(rng))
    result = calibrated(get_pass("quantize-int8")(min_cosine=0.99), rng, shape=(4, 64), count=12)(model)

    modes = {layer["node"]: layer for layer in result.details["layers"]}
    assert modes["sensitive"]["mode"] == "float"
    assert modes["sensitive"]["reason"].startswith("kept in float for accuracy (alone in weight-only:")
    assert modes["sensitive"]["compute_alone"] > 1 and modes["sensitive"]["weight_only_alone"] > 1
    assert modes["ordinary"]["mode"] == "dynamic"
    assert "1 layer(s) left in float for accuracy: sensitive" in result.notes
    assert result.details["held_out"]["meets_target"]
    x = rng.standard_normal((4, 64)).astype(np.float32)
    reference = run(sensitive_model(np.random.default_rng(0)), {"X": x})[0]
    assert reference.shape == (4, 64)


def test_layer_reports_name_the_most_sensitive_layers(rng, injected_profile):
    from graphopt.report.layers import layers_html, layers_markdown

    injected_profile["Conv"] = (2.0, 1.0)
    model = ir.serde.deserialize_model(conv_model(rng))
    result = calibrated(get_pass("quantize-int8")(min_elements=16, min_cosine=0.9, sensitivity=True), rng, count=12)(model)
    report = {"output": "m.onnx", "steps": [{"details": result.details}]}
    worst = max(result.details["layers"], key=lambda layer: layer["compute_alone"])["node"]
    page = layers_html(report)
    assert page.startswith("<!DOCTYPE html>") and "<svg" in page and worst in page
    assert f"Most sensitive layers (share of the budget used with only that layer quantized): `{worst}`" \
        in layers_markdown(report)


def test_auto_is_deterministic(rng, injected_profile):
    injected_profile["Conv"] = (2.0, 1.0)
    proto = conv_model(rng)
    outputs = []
    for _ in range(2):
        model = ir.serde.deserialize_model(proto)
        calibrated(get_pass("quantize-int8")(min_elements=16, min_cosine=0.9), np.random.default_rng(5), count=12)(model)
        outputs.append(ir.serde.serialize_model(model).SerializeToString())
    assert outputs[0] == outputs[1]


def test_auto_requires_opset_13(rng, injected_profile):
    model = ir.serde.deserialize_model(conv_model(rng, opset=12))
    with pytest.raises(RecipeError, match="quantize-int8 needs default-domain opset >= 13, the model has 12"):
        calibrated(get_pass("quantize-int8")(), rng)(model)


def test_auto_without_calibration_names_the_flag(rng, injected_profile):
    model = ir.serde.deserialize_model(conv_model(rng))
    with pytest.raises(DataError, match="--calib"):
        get_pass("quantize-int8")()(model)
