"""Recurrent layers in int8 (`quantize/recurrent.py`): LSTM → DynamicQuantizeLSTM through
quantize-dynamic and quantize-int8; GRU, RNN and LSTMs that cannot take that form → weight-only
W and R through quantize-weights; what stays float says why.

Tolerances, from the arithmetic. Per-row symmetric int8 weights of these Gaussian layers carry a
relative RMS error near (max|w|/127)/√12/σ ≈ 0.7 %. Dynamic int8 adds per-tensor uint8 X (range
~9σ: step/√12 ≈ 1 % of σ) and h (|h| < 1: ≈ 0.8 % of its RMS), so the gate pre-activations are off
by ≈ 1.5 %; the gates (slopes ≤ 1) and the forget-gated recurrence do not amplify it much, and
the outputs land near 2 % (cosine = 1 - e²/2 ≈ 0.9998). Bounds: cosine > 0.999 for int8 compute
(e < 4.5 %), > 0.9999 for weight-only (weight error alone, e < 1.4 %).
"""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import TensorProto, helper

from graphopt.cpu import target_cpu
from graphopt.passes import get_pass
from graphopt.passes.pipeline import op_histogram
from tests.conftest import make_model, run, tensor
from tests.passes.quantize.models import calibrated, cosine

GATES = {"LSTM": 4, "GRU": 3, "RNN": 1}
STEPS, BATCH, INPUT, HIDDEN = 12, 3, 24, 32


def recurrent_model(rng: np.random.Generator, op: str = "LSTM", *, direction: str = "forward", layout: int = 0,
                    states: bool = False, constant_r: bool = True) -> onnx.ModelProto:
    """X → one ``op`` (W, R, B constant; with ``states``: sequence_lens, initial_h, initial_c
    as graph inputs and LSTM peepholes P) → its outputs Y, Y_h (and Y_c)."""
    d, g = (2 if direction == "bidirectional" else 1), GATES[op]
    w = rng.standard_normal((d, g * HIDDEN, INPUT)).astype(np.float32) * 0.3
    r = rng.standard_normal((d, g * HIDDEN, HIDDEN)).astype(np.float32) * 0.3
    b = rng.standard_normal((d, 2 * g * HIDDEN)).astype(np.float32) * 0.1
    seq = [BATCH, STEPS] if layout else [STEPS, BATCH]
    state = [BATCH, d, HIDDEN] if layout else [d, BATCH, HIDDEN]
    inputs, names, initializers = [tensor("X", [*seq, INPUT])], ["W", "B"], [w, b]
    node_inputs = ["X", "W", "R", "B"]
    if constant_r:
        names, initializers = ["W", "R", "B"], [w, r, b]
    else:
        inputs.append(tensor("R", list(r.shape)))
    if states:
        inputs += [tensor("sequence_lens", [BATCH], TensorProto.INT32), tensor("initial_h", state)]
        node_inputs += ["sequence_lens", "initial_h"]
        if op == "LSTM":
            inputs.append(tensor("initial_c", state))
            names.append("P")
            initializers.append(rng.standard_normal((d, 3 * HIDDEN)).astype(np.float32) * 0.1)
            node_inputs += ["initial_c", "P"]
    outputs = ["Y", "Y_h"] + (["Y_c"] if op == "LSTM" else [])
    y_shape = [BATCH, STEPS, d, HIDDEN] if layout else [STEPS, d, BATCH, HIDDEN]
    attrs = {"hidden_size": HIDDEN, "direction": direction, **({"layout": 1} if layout else {})}
    node = helper.make_node(op, node_inputs, outputs, name=op.lower(), **attrs)
    return make_model([node], inputs, [tensor("Y", y_shape)] + [tensor(n, state) for n in outputs[1:]],
                      initializers, names=names)


def feeds(proto: onnx.ModelProto, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Random float inputs; sequence lengths from the full length down to 1."""
    out = {}
    for value in proto.graph.input:
        shape = [d.dim_value for d in value.type.tensor_type.shape.dim]
        if value.name == "sequence_lens":
            out[value.name] = np.linspace(STEPS, 1, BATCH).astype(np.int32)
        else:
            out[value.name] = rng.standard_normal(shape).astype(np.float32)
    return out


def assert_parity(proto: onnx.ModelProto, model: ir.Model, rng: np.random.Generator, bound: float) -> None:
    for _ in range(3):
        x = feeds(proto, rng)
        for name, reference, quantized in zip([o.name for o in proto.graph.output], run(proto, x), run(model, x)):
            assert cosine(reference, quantized) > bound, name


def initializer_array(model: ir.Model, name: str) -> np.ndarray:
    return model.graph.initializers[name].const_value.numpy()


@pytest.mark.parametrize("form", ["s8", "u8", "s7"])
def test_lstm_becomes_dynamic_quantize_lstm_with_transposed_weights(rng, form):
    proto = recurrent_model(rng, direction="bidirectional")
    model = ir.serde.deserialize_model(proto)
    result = get_pass("quantize-dynamic")(weight_form=form)(model)
    assert result.changes == {"layers quantized": 1} and result.notes == []
    assert op_histogram(model) == {"DynamicQuantizeLSTM": 1}
    node = next(iter(model.graph))
    assert node.domain == "com.microsoft" and model.opset_imports["com.microsoft"] == 1
    assert [v.name if v is not None else "" for v in node.inputs] == [
        "X", "W_int8", "R_int8", "B", "", "", "", "", "W_scale", "W_zero_point", "R_scale", "R_zero_point"]
    assert [v.name for v in node.outputs] == ["Y", "Y_h", "Y_c"]
    codes_type, zero = (np.uint8, 128) if form == "u8" else (np.int8, 0)
    for name, rows in (("W", INPUT), ("R", HIDDEN)):
        codes, scale = initializer_array(model, f"{name}_int8"), initializer_array(model, f"{name}_scale")
        assert codes.dtype == codes_type and codes.shape == (2, rows, 4 * HIDDEN)  # [dir, in, 4·hidden]
        assert scale.dtype == np.float32 and scale.shape == (2, 4 * HIDDEN)
        assert (initializer_array(model, f"{name}_zero_point") == zero).all()
        centred = codes.astype(np.int16) - zero
        assert np.abs(centred).max() == (63 if form == "s7" else 127)
        # Transposed back, the codes rebuild ONNX's [dir, 4·hidden, in] weight: a few % off at
        # 7 bits (MSE-clipped scales), where a wrong layout would be ~140 % off.
        original = onnx.numpy_helper.to_array(next(t for t in proto.graph.initializer if t.name == name))
        rebuilt = centred.transpose(0, 2, 1) * scale[..., None]
        assert np.linalg.norm(rebuilt - original) / np.linalg.norm(original) < 0.03
    assert "W" not in model.graph.initializers and "R" not in model.graph.initializers


@pytest.mark.parametrize("form", ["auto", "u8", "s7"])
def test_dynamic_lstm_parity(rng, form):
    # auto: what graphopt writes for this CPU (GRAPHOPT_CPU=avx2: u8). u8 is exact on every CPU
    # (U8U8 kernels): its parity shows the kernel takes uint8 W/R around zero point 128 — read
    # without it, every code would be off by 128 and the outputs noise.
    proto = recurrent_model(rng)
    model = ir.serde.deserialize_model(proto)
    result = get_pass("quantize-dynamic")(weight_form=form)(model)
    expected = target_cpu().int8_weight_form if form == "auto" else form
    assert result.details["layers"][0]["weight_form"] == expected
    assert_parity(proto, model, rng, 0.999)


def test_bidirectional_lstm_parity_on_every_output(rng):
    proto = recurrent_model(rng, direction="bidirectional")
    model = ir.serde.deserialize_model(proto)
    get_pass("quantize-dynamic")()(model)
    assert_parity(proto, model, rng, 0.999)


def test_lstm_with_states_sequence_lens_and_peepholes_keeps_them_in_place(rng):
    proto = recurrent_model(rng, direction="bidirectional", states=True)
    model = ir.serde.deserialize_model(proto)
    get_pass("quantize-dynamic")()(model)
    node = next(iter(model.graph))
    assert [v.name for v in node.inputs[3:8]] == ["B", "sequence_lens", "initial_h", "initial_c", "P"]
    assert_parity(proto, model, rng, 0.999)


def test_second_dynamic_run_changes_nothing(rng):
    model = ir.serde.deserialize_model(recurrent_model(rng, states=True))
    get_pass("quantize-dynamic")()(model)
    before = ir.serde.serialize_model(model).SerializeToString()
    again = get_pass("quantize-dynamic")()(model)
    assert not again.modified and again.notes == []
    assert ir.serde.serialize_model(model).SerializeToString() == before


def test_batch_first_lstm_stays_float_in_dynamic_and_is_weight_only_in_quantize_weights(rng):
    proto = recurrent_model(rng, layout=1, states=True)
    model = ir.serde.deserialize_model(proto)
    result = get_pass("quantize-dynamic")()(model)
    reason = "LSTM with layout=1 (batch first): DynamicQuantizeLSTM has no layout attribute"
    assert not result.modified and result.details["skipped"] == {"lstm": reason}
    assert result.notes == [f"1 recurrent layer(s) left in float: lstm ({reason})"]
    assert op_histogram(model) == {"LSTM": 1}
    # onnxruntime runs no batch-first LSTM at all, so there is no parity to check here.
    weights = get_pass("quantize-weights")()(model)
    assert weights.changes == {"weights encoded": 2} and weights.notes == []
    assert {name: initializer_array(model, name).dtype for name in ("W_int8", "R_int8")} == \
        {"W_int8": np.int8, "R_int8": np.int8}


@pytest.mark.parametrize("op", ["GRU", "RNN"])
def test_gru_and_rnn_store_w_and_r_in_int8(rng, op):
    proto = recurrent_model(rng, op, direction="bidirectional", states=True)
    model = ir.serde.deserialize_model(proto)
    result = get_pass("quantize-weights")()(model)
    assert result.changes == {"weights encoded": 2}
    assert op_histogram(model) == {op: 1, "Cast": 2, "Mul": 2}
    rows = GATES[op] * HIDDEN
    for name, width in (("W", INPUT), ("R", HIDDEN)):
        assert name not in model.graph.initializers  # now the name of the rebuilt value
        assert initializer_array(model, f"{name}_int8").dtype == np.int8
        assert initializer_array(model, f"{name}_int8").shape == (2, rows, width)
        assert initializer_array(model, f"{name}_scale").shape == (2, rows, 1)  # per direction and gate row
    # int8 codes and a float scale per row: (56 + 4) / (56 · 4) of W's and R's float bytes.
    encoded = sum(initializer_array(model, f"{n}_{part}").nbytes for n in ("W", "R") for part in ("int8", "scale"))
    assert encoded < 0.3 * sum(len(t.raw_data) for t in proto.graph.initializer if t.name in ("W", "R"))
    assert_parity(proto, model, rng, 0.9999)
    assert not get_pass("quantize-weights")()(model).modified


def test_gru_has_no_dynamic_form_and_says_so(rng):
    model = ir.serde.deserialize_model(recurrent_model(rng, "GRU"))
    result = get_pass("quantize-dynamic")(ops=("GRU",))(model)
    reason = "onnxruntime has no int8 GRU kernel (weight-only int8 is its form)"
    assert not result.modified and result.details["skipped"] == {"gru": reason}
    assert result.notes == [f"1 recurrent layer(s) left in float: gru ({reason})"]


def test_a_recurrent_layer_with_a_runtime_r_stays_float_with_a_reason(rng):
    # Encoding W alone would leave R float while the report says the layer is int8.
    model = ir.serde.deserialize_model(recurrent_model(rng, "GRU", constant_r=False))
    result = get_pass("quantize-weights")()(model)
    assert not result.modified
    assert result.details["skipped"] == {"gru": "W or R is not a constant float initializer"}
    assert result.notes == ["1 recurrent layer(s) left in float: gru (W or R is not a constant float initializer)"]


# -- the automatic mode ---------------------------------------------------------------------

def sequence_model(rng: np.random.Generator, output: str = "logits") -> onnx.ModelProto:
    """A tiny recogniser: X[T,N,16] → MatMul → LSTM → Squeeze → GRU → Squeeze → MatMul →
    ``output`` [T,N,8] ("logits": judged as a CTC score sequence; "features": by cosine)."""
    def gaussian(*shape, scale=0.3):
        return rng.standard_normal(shape).astype(np.float32) * scale

    nodes = [
        helper.make_node("MatMul", ["X", "W_in"], ["projected"], name="project"),
        helper.make_node("LSTM", ["projected", "W_lstm", "R_lstm", "B_lstm"], ["lstm_y"], hidden_size=HIDDEN,
                         name="lstm"),
        helper.make_node("Squeeze", ["lstm_y", "axis_1"], ["lstm_seq"], name="squeeze_lstm"),
        helper.make_node("GRU", ["lstm_seq", "W_gru", "R_gru"], ["gru_y"], hidden_size=HIDDEN, name="gru"),
        helper.make_node("Squeeze", ["gru_y", "axis_1"], ["gru_seq"], name="squeeze_gru"),
        helper.make_node("MatMul", ["gru_seq", "W_out"], [output], name="classify"),
    ]
    initializers = [gaussian(16, INPUT), gaussian(1, 4 * HIDDEN, INPUT), gaussian(1, 4 * HIDDEN, HIDDEN),
                    gaussian(1, 8 * HIDDEN, scale=0.1), gaussian(1, 3 * HIDDEN, HIDDEN),
                    gaussian(1, 3 * HIDDEN, HIDDEN), gaussian(HIDDEN, 8), np.array([1], np.int64)]
    names = ["W_in", "W_lstm", "R_lstm", "B_lstm", "W_gru", "R_gru", "W_out", "axis_1"]
    return make_model(nodes, [tensor("X", [STEPS, BATCH, 16])], [tensor(output, [STEPS, BATCH, 8])],
                      initializers, names=names)


@pytest.fixture
def injected_profile(monkeypatch, tmp_path):
    """Speed profile answers from a table instead of the clock: {kind: (float_ms, int8_ms)}."""
    from graphopt.passes.quantize import profile

    table = {}
    monkeypatch.setattr(profile.SpeedProfile, "timings",
                        lambda self, use, shape, mode: dict(zip(("float_ms", "int8_ms"), table[use.kind])))
    monkeypatch.setenv("GRAPHOPT_CACHE_DIR", str(tmp_path))
    return table


def test_auto_gives_lstm_its_int8_form_and_gru_weight_only(rng, injected_profile):
    injected_profile.update(MatMul=(1.0, 2.0), LSTM=(2.0, 1.0))
    proto = sequence_model(rng)
    model = ir.serde.deserialize_model(proto)
    quantize = calibrated(get_pass("quantize-int8")(min_elements=16, min_cosine=0.99, min_top1=0.9), rng,
                          shape=(STEPS, BATCH, 16), count=12)
    result = quantize(model)
    layers = {layer["node"]: layer for layer in result.details["layers"]}
    assert {name: layer["mode"] for name, layer in layers.items()} == \
        {"project": "weight-only", "lstm": "dynamic", "gru": "weight-only", "classify": "weight-only"}
    assert layers["gru"]["reason"] == "onnxruntime has no int8 GRU kernel (weight-only int8 is its form)"
    assert layers["lstm"]["weight_bytes"] == 4 * (4 * HIDDEN * (INPUT + HIDDEN))  # W and R
    assert layers["lstm"]["recurrent_relative_error"] < 0.02
    assert result.details["held_out"]["meets_target"]
    histogram = op_histogram(model)
    assert histogram["DynamicQuantizeLSTM"] == 1 and histogram["GRU"] == 1 and "LSTM" not in histogram
    matrices = ("W_in", "W_lstm", "R_lstm", "W_gru", "R_gru", "W_out")
    assert not [name for name in matrices if name in model.graph.initializers]  # all 8-bit now
    x = {"X": rng.standard_normal((STEPS, BATCH, 16)).astype(np.float32)}
    assert cosine(run(proto, x)[0], run(model, x)[0]) > 0.999


def test_auto_ladder_takes_lstm_down_to_float_for_an_unreachable_budget(rng, injected_profile):
    injected_profile.update(MatMul=(1.0, 2.0), LSTM=(2.0, 1.0))
    model = ir.serde.deserialize_model(sequence_model(rng, "features"))
    quantize = calibrated(get_pass("quantize-int8")(min_elements=16, min_cosine=0.99999999),
                          rng, shape=(STEPS, BATCH, 16), count=12)
    result = quantize(model)
    lstm = next(layer for layer in result.details["layers"] if layer["node"] == "lstm")
    assert lstm["mode"] == "float" and lstm["reason"].startswith("kept in float for accuracy")
    assert lstm["compute_alone"] is not None and lstm["weight_only_alone"] is not None  # both rungs measured
    assert op_histogram(model)["LSTM"] == 1


def test_speed_profile_times_the_one_node_lstm_forms(rng, tmp_path):
    from graphopt.passes.quantize.profile import SpeedProfile
    from graphopt.passes.weights import weight_use

    graph = ir.serde.deserialize_model(recurrent_model(rng)).graph
    use, _ = weight_use(next(iter(graph)), graph)
    form = target_cpu().int8_weight_form
    first = SpeedProfile(tmp_path, 1, form)
    timings = first.timings(use, (STEPS, BATCH, INPUT), "dynamic")
    first.save()
    assert timings["float_ms"] > 0 and timings["int8_ms"] > 0 and first.measured == 1
    again = SpeedProfile(tmp_path, 1, form)
    assert again.timings(use, (STEPS, BATCH, INPUT), "dynamic") == timings and again.reused == 1
