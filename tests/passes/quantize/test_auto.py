"""`quantize-int8` (`quantize/auto.py`): the speed profile picks each layer's form, the ladder
gives accuracy back within the budget, layer reports explain the choices."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import pytest

from graphopt.errors import DataError, RecipeError
from graphopt.passes import get_pass
from graphopt.passes.pipeline import op_histogram
from tests.conftest import run
from tests.passes.quantize.models import calibrated, conv_model, sensitive_model


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
    report = {"output": "m.onnx", "steps": [{"name": "quantize-int8", "details": result.details}]}
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
