"""fuse-decoder's rewrites, each on a graph written here the way torch.onnx.export(dynamo=True)
writes a decoder: structure, numbers in onnxruntime with optimizations off, a second run that
changes nothing, and what each must leave alone."""

from __future__ import annotations

from collections import Counter

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import TensorProto, helper

from graphopt.passes.base import PassContext
from graphopt.passes.decoder_fusions import (fuse_decoder_graph, key_transpose_rules, merge_equal_computations,
                                             pack_sibling_matmuls, rotary_from_angles_rules)
from graphopt.passes.fuse_decoder import FuseDecoderPass
from tests.conftest import make_model, run, tensor

OPSET = 20
HEADS, KV_HEADS, HEAD = 2, 1, 16
HIDDEN = HEADS * HEAD
INT64_MAX, INT64_MIN = np.iinfo(np.int64).max, np.iinfo(np.int64).min


def ops(model: ir.Model) -> Counter:
    return Counter(f"{node.domain}:{node.op_type}" if node.domain else node.op_type for node in model.graph)


def to_ir(model: onnx.ModelProto) -> ir.Model:
    return ir.serde.deserialize_model(model)


def ints(values) -> np.ndarray:
    return np.array(values, np.int64)


# -- key transposes -----------------------------------------------------------------------------------


def key_transpose_model(*, swapped: bool = True) -> onnx.ModelProto:
    """``key.transpose(-2, -1)`` of a key with dynamic batch and length, as torchlib writes it:
    reshaped to ``[-1, length, head_dim]``, transposed, reshaped to the key's sizes with the last
    two swapped (``swapped=False``: not swapped, a different computation)."""
    last_two = ["d", "t"] if swapped else ["t", "d"]
    nodes = [
        helper.make_node("Shape", ["key"], ["sizes"], start=0),
        helper.make_node("Slice", ["sizes", "minus_one", "int_max"], ["d"]),
        helper.make_node("Slice", ["sizes", "minus_two", "minus_one"], ["t"]),
        helper.make_node("Slice", ["sizes", "int_min", "minus_two"], ["leading"]),
        helper.make_node("Concat", ["minus_one", "t", "d"], ["flat_shape"], axis=0),
        helper.make_node("Reshape", ["key", "flat_shape"], ["flat"]),
        helper.make_node("Transpose", ["flat"], ["flat_t"], perm=[0, 2, 1]),
        helper.make_node("Concat", ["leading", *last_two], ["shape"], axis=0),
        helper.make_node("Reshape", ["flat_t", "shape"], ["Y"]),
    ]
    return make_model(nodes, [tensor("key", ["B", HEADS, "T", HEAD])], [tensor("Y", ["B", HEADS, None, None])],
                      [ints([-1]), ints([-2]), ints([INT64_MAX]), ints([INT64_MIN])],
                      names=["minus_one", "minus_two", "int_max", "int_min"], opset=OPSET)


def test_key_transpose_becomes_one_4d_transpose(rng):
    proto = key_transpose_model()
    model = to_ir(proto)
    assert key_transpose_rules().apply_to_model(model) == 1
    ir.passes.common.RemoveUnusedNodesPass()(model)  # the shape arithmetic, read by nothing now
    assert [n.op_type for n in model.graph] == ["Transpose"]
    assert list(next(iter(model.graph)).attributes.get_ints("perm")) == [0, 1, 3, 2]
    key = rng.standard_normal((2, HEADS, 5, HEAD)).astype(np.float32)
    np.testing.assert_array_equal(run(model, {"key": key})[0], run(proto, {"key": key})[0])
    assert key_transpose_rules().apply_to_model(model) == 0


def test_a_reshape_back_to_the_same_order_is_not_a_transpose():
    """Reshaped back to ``[b, h, t, d]`` after the 3D transpose, the data is scrambled, not
    transposed: the rule must refuse it."""
    model = to_ir(key_transpose_model(swapped=False))
    before = ops(model)
    assert key_transpose_rules().apply_to_model(model) == 0
    assert ops(model) == before


# -- rotary embeddings --------------------------------------------------------------------------------


def rotary_model(*, shared_positions: bool = False, sin_doubled: bool = False) -> onnx.ModelProto:
    """``x·cos + rotate_half(x)·sin`` with cos and sin computed from ``positions × inv_freq``, as
    transformers' Llama rotary embedding exports. ``shared_positions``: one row of positions for
    the whole batch; ``sin_doubled``: sin from other angles than cos."""
    half = HEAD // 2
    nodes = [
        helper.make_node("Unsqueeze", ["positions", "axis_two"], ["positions_3d"]),
        helper.make_node("Cast", ["positions_3d"], ["positions_float"], to=TensorProto.FLOAT),
        helper.make_node("Mul", ["positions_float", "inv_freq"], ["angles"]),
        helper.make_node("Concat", ["angles", "angles"], ["both"], axis=-1),
        helper.make_node("Cos", ["both"], ["cos_3d"]),
        helper.make_node("Unsqueeze", ["cos_3d", "axis_one"], ["cos"]),
        helper.make_node("Mul", ["x", "cos"], ["x_cos"]),
        helper.make_node("Slice", ["x", "zero", "half", "axis_three", "axis_one"], ["x1"]),
        helper.make_node("Slice", ["x", "half", "int_max", "axis_three", "axis_one"], ["x2"]),
        helper.make_node("Neg", ["x2"], ["minus_x2"]),
        helper.make_node("Concat", ["minus_x2", "x1"], ["rotated_half"], axis=-1),
        helper.make_node("Mul", ["rotated_half", "sin"], ["x_sin"]),
        helper.make_node("Add", ["x_cos", "x_sin"], ["Y"]),
    ]
    if sin_doubled:
        nodes[4:4] = [helper.make_node("Add", ["both", "both"], ["doubled"]),
                      helper.make_node("Sin", ["doubled"], ["sin_3d"])]
    else:
        nodes.insert(4, helper.make_node("Sin", ["both"], ["sin_3d"]))
    nodes.insert(6, helper.make_node("Unsqueeze", ["sin_3d", "axis_one"], ["sin"]))
    inv_freq = (1.0 / 10000 ** (np.arange(half, dtype=np.float32) / half)).astype(np.float32)
    constants = {"inv_freq": inv_freq, "axis_one": ints([1]), "axis_two": ints([2]), "axis_three": ints([3]),
                 "zero": ints([0]), "half": ints([half]), "int_max": ints([INT64_MAX])}
    inputs = [tensor("x", ["B", HEADS, "S", HEAD]),
              tensor("positions", [1 if shared_positions else "B", "S"], TensorProto.INT64)]
    return make_model(nodes, inputs, [tensor("Y", ["B", HEADS, "S", HEAD])], list(constants.values()),
                      names=list(constants), opset=OPSET)


def rotate(model: ir.Model) -> int:
    """onnxscript's rotate-half match, then the rule under test."""
    from onnxscript.rewriter.ort_fusions.rotary_embedding import fuse_rotary_embedding

    ir.passes.common.ShapeInferencePass()(model)
    fuse_rotary_embedding(model)
    return rotary_from_angles_rules().apply_to_model(model)


def rotary_feeds(rng, batch: int = 2, length: int = 3) -> dict[str, np.ndarray]:
    start = rng.integers(0, 50, size=(batch, 1))
    return {"x": rng.standard_normal((batch, HEADS, length, HEAD)).astype(np.float32),
            "positions": (start + np.arange(length)).astype(np.int64)}


@pytest.mark.parametrize("length", [4, 1])  # a prefill, a decode step at a later position
def test_rotation_from_angles_becomes_onnxruntimes_rotary_embedding(rng, length):
    proto = rotary_model()
    model = to_ir(proto)
    assert rotate(model) == 1
    assert ops(model)["com.microsoft:RotaryEmbedding"] == 1 and not ops(model)["Neg"]
    feeds = rotary_feeds(rng, length=length)
    np.testing.assert_allclose(run(model, feeds)[0], run(proto, feeds)[0], rtol=0, atol=1e-6)
    assert rotate(model) == 0


@pytest.mark.parametrize("case, why", [
    ("sin_doubled", "cos and sin from different angles: no one cache holds both"),
    ("shared_positions", "angles for one row of positions, states for a batch: the per-token cache would be short"),
])
def test_rotation_the_cache_cannot_hold_is_left_alone(case, why):
    model = to_ir(rotary_model(**{case: True}))
    assert rotate(model) == 0, why
    assert not ops(model)["com.microsoft:RotaryEmbedding"]


# -- packing ------------------------------------------------------------------------------------------


def sibling_model(rng) -> onnx.ModelProto:
    """X feeds three MatMuls with constant weights (4 → 6, 4 → 2, 4 → 3) and one whose weight is
    an input; Z feeds another with a constant weight."""
    weights = [rng.standard_normal(shape).astype(np.float32) for shape in ((4, 6), (4, 2), (4, 3), (5, 2))]
    nodes = [helper.make_node("MatMul", ["X", f"W{i}"], [f"Y{i}"]) for i in range(3)]
    nodes += [helper.make_node("MatMul", ["X", "W_input"], ["Y3"]), helper.make_node("MatMul", ["Z", "W3"], ["Y4"])]
    inputs = [tensor("X", ["N", 4]), tensor("W_input", [4, 2]), tensor("Z", ["N", 5])]
    outputs = [tensor(f"Y{i}", ["N", None]) for i in range(5)]
    return make_model(nodes, inputs, outputs, weights, names=["W0", "W1", "W2", "W3"], opset=OPSET)


def test_matmuls_sharing_an_input_and_constant_weights_are_packed(rng):
    proto = sibling_model(rng)
    model = to_ir(proto)
    assert pack_sibling_matmuls(model) == 1
    assert ops(model) == Counter({"MatMul": 3, "Split": 1, "Constant": 1})
    packed = next(n for n in model.graph if n.op_type == "Split").inputs[0].producer().inputs[1]
    assert packed.const_value.shape == (4, 11)
    feeds = {"X": rng.standard_normal((3, 4)).astype(np.float32), "W_input": rng.standard_normal((4, 2)).astype(
        np.float32), "Z": rng.standard_normal((3, 5)).astype(np.float32)}
    for got, expected in zip(run(model, feeds), run(proto, feeds)):
        np.testing.assert_allclose(got, expected, rtol=0, atol=1e-6)
    # The MatMul reading a weight that is an input, and the one alone on Z, stay as they were.
    assert pack_sibling_matmuls(model) == 0


def test_shapes_of_the_same_named_sizes_are_read_once():
    """Two Shape nodes reading ``batch`` off different values, and one reading an unnamed size."""
    nodes = [helper.make_node("Shape", ["A"], ["a"], start=0, end=1),
             helper.make_node("Shape", ["B"], ["b"], start=0, end=1),
             helper.make_node("Shape", ["C"], ["c"], start=0, end=1),
             helper.make_node("Concat", ["a", "b", "c"], ["Y"], axis=0)]
    proto = make_model(nodes, [tensor("A", ["batch", 2]), tensor("B", ["batch", 3]), tensor("C", [None, 3])],
                       [tensor("Y", [3], TensorProto.INT64)], opset=OPSET)
    model = to_ir(proto)
    merge_equal_computations(model)
    assert ops(model)["Shape"] == 2  # C's first size has no name: nothing says it is the batch
    feeds = {"A": np.zeros((2, 2), np.float32), "B": np.zeros((2, 3), np.float32), "C": np.zeros((4, 3), np.float32)}
    np.testing.assert_array_equal(run(model, feeds)[0], run(proto, feeds)[0])
    merge_equal_computations(model)
    assert ops(model)["Shape"] == 2


# -- attention over a KV cache: the whole pipeline ----------------------------------------------------


def _rotated(prefix: str, states: str) -> list[onnx.NodeProto]:
    return [helper.make_node("Mul", [states, "cos"], [f"{prefix}_cos"]),
            helper.make_node("Slice", [states, "zero", "half", "axis_three", "axis_one"], [f"{prefix}_1"]),
            helper.make_node("Slice", [states, "half", "int_max", "axis_three", "axis_one"], [f"{prefix}_2"]),
            helper.make_node("Neg", [f"{prefix}_2"], [f"{prefix}_minus_2"]),
            helper.make_node("Concat", [f"{prefix}_minus_2", f"{prefix}_1"], [f"{prefix}_half"], axis=-1),
            helper.make_node("Mul", [f"{prefix}_half", "sin"], [f"{prefix}_sin"]),
            helper.make_node("Add", [f"{prefix}_cos", f"{prefix}_sin"], [f"{prefix}_rot"])]


def _mask(causal: bool) -> list[onnx.NodeProto]:
    """``allowed`` ``[batch, 1, length, total]``: the padding mask and (``causal``) query s, at
    position past + s, seeing keys 0 … past + s."""
    nodes = [helper.make_node("Cast", ["attention_mask"], ["mask_bool"], to=TensorProto.BOOL),
             helper.make_node("Unsqueeze", ["mask_bool", "axes_one_two"], ["padding" if causal else "allowed"])]
    if causal:
        nodes += [helper.make_node("Shape", ["past_key_values.0.key"], ["past_1d"], start=2, end=3),
                  helper.make_node("Shape", ["input_ids"], ["length_1d"], start=1, end=2),
                  helper.make_node("Shape", ["attention_mask"], ["total_1d"], start=1, end=2),
                  *(helper.make_node("Squeeze", [f"{name}_1d"], [name]) for name in ("past", "length", "total")),
                  helper.make_node("Add", ["past", "length"], ["end"]),
                  helper.make_node("Range", ["past", "end", "one"], ["rows"]),
                  helper.make_node("Unsqueeze", ["rows", "axis_one"], ["rows_column"]),
                  helper.make_node("Range", ["zero_scalar", "total", "one"], ["columns"]),
                  helper.make_node("LessOrEqual", ["columns", "rows_column"], ["causal"]),
                  helper.make_node("And", ["causal", "padding"], ["allowed"])]
    return nodes


def _attention(heads: int, softcap: float | None = None) -> list[onnx.NodeProto]:
    """Append to the cache, repeat the key and value heads for the query's, attend (scores
    scaled on both sides, ``softcap``: soft-capped as Gemma 2 exports, ``tanh(scores / cap) * cap``,
    the mask as a bias, the NaN guard), merge the heads back."""
    capped = [helper.make_node("Div", ["scores", "cap"], ["scores_over_cap"]),
              helper.make_node("Tanh", ["scores_over_cap"], ["scores_tanh"]),
              helper.make_node("Mul", ["scores_tanh", "cap"], ["scores_capped"])] if softcap else []
    nodes = [helper.make_node("Concat", ["past_key_values.0.key", "k_rot"], ["present.0.key"], axis=-2),
             helper.make_node("Concat", ["past_key_values.0.value", "v_bhsd"], ["present.0.value"], axis=-2)]
    for name in ("key", "value"):
        nodes += [helper.make_node("Unsqueeze", [f"present.0.{name}", "axis_two"], [f"{name}_5d"]),
                  helper.make_node("Expand", [f"{name}_5d", "groups"], [f"{name}_repeated"]),
                  helper.make_node("Reshape", [f"{name}_repeated", "all_heads"], [f"{name}_heads"])]
    return nodes + [
        helper.make_node("Mul", ["q_rot", "sqrt_scale"], ["q_scaled"]),
        helper.make_node("Transpose", ["key_heads"], ["key_t"], perm=[0, 1, 3, 2]),
        helper.make_node("Mul", ["key_t", "sqrt_scale"], ["k_scaled"]),
        helper.make_node("MatMul", ["q_scaled", "k_scaled"], ["scores"]),
        helper.make_node("Where", ["allowed", "fill_zero", "fill_min"], ["bias"]),
        *capped,
        helper.make_node("Add", ["scores_capped" if softcap else "scores", "bias"], ["masked"]),
        helper.make_node("Softmax", ["masked"], ["probs"], axis=-1),
        helper.make_node("IsNaN", ["probs"], ["probs_nan"]),
        helper.make_node("Where", ["probs_nan", "fill_zero", "probs"], ["probs_safe"]),
        helper.make_node("MatMul", ["probs_safe", "value_heads"], ["context"]),
        helper.make_node("Transpose", ["context"], ["context_bshd"], perm=[0, 2, 1, 3]),
        helper.make_node("Reshape", ["context_bshd", "merge"], ["context_bsd"]),
        helper.make_node("MatMul", ["context_bsd", "Wo"], ["logits"])]


def decoder_layer(rng, *, head: int = HEAD, causal: bool = True, softcap: float | None = None) -> onnx.ModelProto:
    """One decoder attention layer as the exporter writes it, onnxruntime-genai's inputs and
    outputs: embedding → Q/K/V projections → heads → rotary (cos/sin from positions × inv_freq)
    → cache append → grouped-query attention (2 query heads, 1 KV head; ``softcap``: its scores
    soft-capped) → output projection."""
    hidden, half = HEADS * head, head // 2
    nodes = [helper.make_node("Gather", ["embed", "input_ids"], ["X"], axis=0), *_mask(causal)]
    for name, heads in (("q", HEADS), ("k", KV_HEADS), ("v", KV_HEADS)):
        nodes += [helper.make_node("MatMul", ["X", f"W{name}"], [f"{name}_lin"]),
                  helper.make_node("Reshape", [f"{name}_lin", f"{name}_split"], [f"{name}_bshd"]),
                  helper.make_node("Transpose", [f"{name}_bshd"], [f"{name}_bhsd"], perm=[0, 2, 1, 3])]
    nodes += [helper.make_node("Unsqueeze", ["position_ids", "axis_two"], ["positions_3d"]),
              helper.make_node("Cast", ["positions_3d"], ["positions_float"], to=TensorProto.FLOAT),
              helper.make_node("Mul", ["positions_float", "inv_freq"], ["angles"]),
              helper.make_node("Concat", ["angles", "angles"], ["both"], axis=-1),
              helper.make_node("Cos", ["both"], ["cos_3d"]), helper.make_node("Sin", ["both"], ["sin_3d"]),
              helper.make_node("Unsqueeze", ["cos_3d", "axis_one"], ["cos"]),
              helper.make_node("Unsqueeze", ["sin_3d", "axis_one"], ["sin"]),
              *_rotated("q", "q_bhsd"), *_rotated("k", "k_bhsd"), *_attention(HEADS, softcap)]
    weight = lambda *shape: (rng.standard_normal(shape) * 0.3).astype(np.float32)  # noqa: E731
    constants = {
        "embed": weight(96, HIDDEN), "Wq": weight(HIDDEN, hidden), "Wk": weight(HIDDEN, KV_HEADS * head),
        "Wv": weight(HIDDEN, KV_HEADS * head), "Wo": weight(hidden, 96),
        "q_split": ints([0, 0, HEADS, head]), "k_split": ints([0, 0, KV_HEADS, head]),
        "v_split": ints([0, 0, KV_HEADS, head]),
        "inv_freq": (1.0 / 10000 ** (np.arange(half, dtype=np.float32) / half)).astype(np.float32),
        "axis_one": ints([1]), "axis_two": ints([2]), "axis_three": ints([3]), "axes_one_two": ints([1, 2]),
        "zero": ints([0]), "half": ints([half]), "int_max": ints([INT64_MAX]), "one": np.array(1, np.int64),
        "zero_scalar": np.array(0, np.int64), "groups": ints([1, 1, HEADS // KV_HEADS, 1, 1]),
        "all_heads": ints([0, HEADS, -1, head]), "merge": ints([0, 0, hidden]),
        "sqrt_scale": np.array(head ** -0.25, np.float32), "fill_zero": np.array(0.0, np.float32),
        "fill_min": np.array(np.finfo(np.float32).min, np.float32)}
    if softcap:
        constants["cap"] = np.array(softcap, np.float32)
    cache = ["batch", KV_HEADS, "past_sequence_length", head]
    inputs = [tensor("input_ids", ["batch", "sequence_length"], TensorProto.INT64),
              tensor("attention_mask", ["batch", "total_sequence_length"], TensorProto.INT64),
              tensor("position_ids", ["batch", "sequence_length"], TensorProto.INT64),
              tensor("past_key_values.0.key", cache), tensor("past_key_values.0.value", cache)]
    present = ["batch", KV_HEADS, "total_sequence_length", head]
    outputs = [tensor("logits", ["batch", "sequence_length", 96]), tensor("present.0.key", present),
               tensor("present.0.value", present)]
    proto = make_model(nodes, inputs, outputs, list(constants.values()), names=list(constants), opset=OPSET)
    # The exporter records every value's shape, the total length by its name.
    proto.graph.value_info.extend(tensor(f"{name}_heads", ["batch", HEADS, "total_sequence_length", head])
                                  for name in ("key", "value"))
    return onnx.shape_inference.infer_shapes(proto)


def decoder_feeds(rng, *, batch: int, past: int, length: int, head: int = HEAD) -> dict[str, np.ndarray]:
    mask = np.ones((batch, past + length), np.int64)
    if past:
        mask[0, :2] = 0  # a left-padded sequence (no query sees padding only)
    cache = lambda: rng.standard_normal((batch, KV_HEADS, past, head)).astype(np.float32)  # noqa: E731
    return {"input_ids": rng.integers(0, 96, (batch, length)).astype(np.int64), "attention_mask": mask,
            "position_ids": np.tile(np.arange(past, past + length), (batch, 1)).astype(np.int64),
            "past_key_values.0.key": cache(), "past_key_values.0.value": cache()}


# A prefill (empty cache), a decode step, and several new tokens after a past for one sequence.
STEPS = [dict(batch=2, past=0, length=5), dict(batch=2, past=5, length=1), dict(batch=1, past=4, length=3)]


def test_attention_over_the_cache_becomes_group_query_attention(rng):
    proto = decoder_layer(rng)
    model = to_ir(proto)
    counts = fuse_decoder_graph(model)
    assert counts["group query attentions"] == 1 and counts["packed attention inputs"] == 1
    assert not any(op in ops(model) for op in ("Softmax", "com.microsoft:MultiHeadAttention", "Neg"))
    attention = next(n for n in model.graph if n.op_type == "GroupQueryAttention")
    assert attention.attributes.get_int("do_rotary") == 1  # the rotation folded in
    assert attention.inputs[1] is None and attention.inputs[2] is None  # QKV packed: one MatMul
    assert attention.inputs[10] is not None  # the mask kept, as the attention bias
    for step in STEPS:
        feeds = decoder_feeds(rng, **step)
        for got, expected in zip(run(model, feeds), run(proto, feeds)):
            np.testing.assert_allclose(got, expected, rtol=0, atol=1e-5)
    fused = {op: n for op, n in ops(model).items() if op.startswith("com.microsoft")}
    assert not any(fuse_decoder_graph(model).values())  # a second run fuses nothing more
    assert {op: n for op, n in ops(model).items() if op.startswith("com.microsoft")} == fused


def test_several_new_tokens_after_a_past_need_a_batch_of_one(rng):
    """The case the kernel serves for one sequence only (the module docstring's contract): refused
    loudly by onnxruntime, never a wrong answer."""
    model = to_ir(decoder_layer(rng))
    fuse_decoder_graph(model)
    with pytest.raises(Exception, match="batch_size must be 1"):
        run(model, decoder_feeds(rng, batch=2, past=3, length=2))


def test_attention_the_kernel_cannot_take_stays_multi_head_attention(rng):
    """A head size of 12: GroupQueryAttention takes multiples of 8 (and rotates multiples of 16)."""
    proto = decoder_layer(rng, head=12)
    model = to_ir(proto)
    assert fuse_decoder_graph(model)["group query attentions"] == 0
    assert ops(model)["com.microsoft:MultiHeadAttention"] == 1
    feeds = decoder_feeds(rng, batch=2, past=5, length=1, head=12)
    for got, expected in zip(run(model, feeds), run(proto, feeds)):
        np.testing.assert_allclose(got, expected, rtol=0, atol=1e-5)


# -- soft-capped attention (Gemma 2) -------------------------------------------------------------------

CAP = 0.5  # small enough to bite: the scores of this layer's weights reach several units


def test_soft_capped_attention_becomes_group_query_attention_with_its_cap(rng):
    """``tanh(scores / cap) * cap`` between the scaled scores and the mask: taken out for
    onnxscript's attention fusion, put back as GroupQueryAttention's ``softcap`` (onnxruntime caps
    the scaled scores, then adds the bias: the model's order), exact on every step."""
    proto = decoder_layer(rng, softcap=CAP)
    model = to_ir(proto)
    counts = fuse_decoder_graph(model)
    assert counts["soft-capped attentions"] == 1 and counts["group query attentions"] == 1
    assert counts["soft-caps restored"] == 0
    assert not any(op in ops(model) for op in ("Softmax", "Tanh", "com.microsoft:MultiHeadAttention"))
    attention = next(n for n in model.graph if n.op_type == "GroupQueryAttention")
    assert attention.attributes.get_float("softcap") == CAP
    assert attention.inputs[10] is not None  # the mask still the bias, added after the cap
    for step in STEPS:
        feeds = decoder_feeds(rng, **step)
        for got, expected in zip(run(model, feeds), run(proto, feeds)):
            np.testing.assert_allclose(got, expected, rtol=0, atol=1e-5)
    # the cap matters here: the same kernel without it is far off
    feeds = decoder_feeds(rng, batch=2, past=0, length=5)
    attention.attributes.pop("softcap")
    assert np.abs(run(model, feeds)[0] - run(proto, feeds)[0]).max() > 1e-2


def test_a_cap_no_attention_fusion_took_is_written_back(rng, monkeypatch):
    """Should onnxscript's attention fusion not match the uncapped attention, the cap goes back
    where it was: the graph computes what it did."""
    import onnxscript.rewriter.ort_fusions as ort_fusions

    monkeypatch.setattr(ort_fusions, "optimize_for_ort", lambda model: None)
    proto = decoder_layer(rng, softcap=CAP)
    model = to_ir(proto)
    counts = fuse_decoder_graph(model)
    assert counts["soft-capped attentions"] == 1 and counts["soft-caps restored"] == 1
    assert counts["group query attentions"] == 0 and ops(model)["Tanh"] == 1
    feeds = decoder_feeds(rng, batch=2, past=5, length=1)
    for got, expected in zip(run(model, feeds), run(proto, feeds)):
        np.testing.assert_allclose(got, expected, rtol=0, atol=1e-6)


def test_soft_capped_attention_the_kernel_cannot_take_stays_unfused(rng):
    """Head size 12: the attention fuses into MultiHeadAttention, which has no cap, and not on into
    GroupQueryAttention; fuse_decoder_graph says so, and the pass fuses again, the cap left alone."""
    from graphopt.passes.decoder_attention import SoftCapNotFusedError

    with pytest.raises(SoftCapNotFusedError):
        fuse_decoder_graph(to_ir(decoder_layer(rng, head=12, softcap=CAP)))
    assert not fuse_decoder_graph(to_ir(decoder_layer(rng, head=12, softcap=CAP)), soft_caps=False)[
        "soft-capped attentions"]
    result = FuseDecoderPass()(to_ir(decoder_layer(rng, head=12, softcap=CAP)), PassContext(threads=1))
    assert result.modified and result.changes == {"RotaryEmbedding nodes": 2}
    assert ops(result.model)["Tanh"] == 1 and not ops(result.model)["com.microsoft:MultiHeadAttention"]
    assert result.notes[0].startswith("soft-capped attention left unfused")


def test_without_group_query_attention_soft_capped_attention_stays_unfused(rng):
    model = to_ir(decoder_layer(rng, softcap=CAP))
    counts = fuse_decoder_graph(model, group_query_attention=False)
    assert counts["soft-capped attentions"] == 0
    assert ops(model)["Tanh"] == 1 and not ops(model)["com.microsoft:MultiHeadAttention"]


# -- the pass -----------------------------------------------------------------------------------------


def test_the_pass_fuses_a_copy_verified_and_a_second_run_changes_nothing(rng):
    model = to_ir(decoder_layer(rng))
    before = ops(model)
    result = FuseDecoderPass()(model, PassContext(threads=1))
    assert result.modified and result.changes == {"GroupQueryAttention nodes": 1}
    assert result.details["relative_max_abs"] <= 1e-4
    assert result.model is not model and ops(model) == before  # in_place = False: the input untouched
    again = FuseDecoderPass()(result.model, PassContext(threads=1))
    assert not again.modified and again.model is not result.model and ops(again.model) == ops(result.model)


def test_the_pass_refuses_a_fusion_that_changes_the_outputs(rng):
    """GroupQueryAttention masks causally by itself: on attention that is not causal the fused
    graph differs, and the verification leaves the model unfused."""
    model = to_ir(decoder_layer(rng, causal=False))
    result = FuseDecoderPass()(model, PassContext(threads=1))
    assert not result.modified and result.model is not model
    assert "fusion changed the outputs" in result.notes[0]


def test_the_pass_leaves_a_model_without_a_cache_alone(rng):
    model = to_ir(sibling_model(rng))
    result = FuseDecoderPass()(model)
    assert not result.modified and result.model is not model
    assert result.notes == ["not a decoder with a KV cache: nothing to fuse"]


def test_onnxscripts_own_group_query_attention_is_refused(rng, monkeypatch):
    """Should onnxscript's GroupQueryAttention fusion ever match (it drops the mask and reads the
    lengths off the rotary positions), the model is left unfused rather than fused on those terms."""
    import onnxscript.rewriter.ort_fusions as ort_fusions

    def fuses_its_own(model):
        model.graph.append(ir.node("GroupQueryAttention", [], domain="com.microsoft", num_outputs=3))

    monkeypatch.setattr(ort_fusions, "optimize_for_ort", fuses_its_own)
    model = to_ir(decoder_layer(rng))
    result = FuseDecoderPass()(model)
    assert not result.modified and result.notes[0].startswith("not fused: onnxscript's own GroupQueryAttention")
