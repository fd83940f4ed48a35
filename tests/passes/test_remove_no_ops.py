"""remove-no-ops: what changes nothing goes, exactly; what might change something stays."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
from onnx import TensorProto, helper

from graphopt.passes import get_pass
from graphopt.passes.pipeline import op_histogram
from graphopt.recipe import load_recipe
from tests.conftest import make_model, run, tensor

HEADS, KV_HEADS, HEAD_SIZE = 2, 1, 8  # the CPU kernel wants head sizes in multiples of 8
PACKED = (HEADS + 2 * KV_HEADS) * HEAD_SIZE


def _clean(proto: onnx.ModelProto):
    model = ir.serde.deserialize_model(proto)
    return get_pass("remove-no-ops")()(model), model


def _output(name: str, rank: int, dtype: int = TensorProto.FLOAT) -> onnx.ValueInfoProto:
    """An output of the given rank, every dimension its own name (nothing declared equal)."""
    return tensor(name, [f"{name}_{axis}" for axis in range(rank)], dtype)


def _shape_of(source: str, start: int, end: int, out: str) -> onnx.NodeProto:
    return helper.make_node("Shape", [source], [out], start=start, end=end)


def attention_with_reshape_pair(rng: np.random.Generator) -> onnx.ModelProto:
    """A decoder layer as graphopt export writes it: X[batch, sequence, 16] → packed QKV MatMul →
    GroupQueryAttention (KV cache in and out) → Reshape to heads [0, 0, 2, -1] → Reshape back to
    [batch, sequence, -1] (batch from the cache's shape, sequence from X's) → output projection →
    SkipSimplifiedLayerNormalization, whose three optional outputs nobody reads."""
    seq = ["batch", "sequence_length"]
    cache = ["batch", KV_HEADS, "past_sequence_length", HEAD_SIZE]
    present = ["batch", KV_HEADS, "total_sequence_length", HEAD_SIZE]
    hidden = HEADS * HEAD_SIZE
    nodes = [
        helper.make_node("MatMul", ["X", "W_qkv"], ["qkv"]),
        helper.make_node("GroupQueryAttention", ["qkv", "", "", "past_key", "past_value", "seqlens_k", "total_length"],
                         ["attn", "present_key", "present_value"], domain="com.microsoft", num_heads=HEADS,
                         kv_num_heads=KV_HEADS),
        helper.make_node("Reshape", ["attn", "to_heads"], ["attn_heads"]),
        _shape_of("past_key", 0, 1, "batch_1d"),
        _shape_of("X", 1, 2, "sequence_1d"),
        helper.make_node("Concat", ["batch_1d", "sequence_1d", "minus_one"], ["back_shape"], axis=0),
        helper.make_node("Reshape", ["attn_heads", "back_shape"], ["attn_back"], allowzero=1),
        helper.make_node("MatMul", ["attn_back", "W_o"], ["projected"]),
        helper.make_node("SkipSimplifiedLayerNormalization", ["projected", "X", "gamma"],
                         ["Y", "mean", "inv_std", "sum"], domain="com.microsoft", epsilon=1e-5),
    ]
    initializers = [rng.standard_normal((hidden, PACKED)).astype(np.float32) * 0.5,
                    rng.standard_normal((hidden, hidden)).astype(np.float32) * 0.5,
                    np.ones(hidden, np.float32), np.array([0, 0, HEADS, -1], np.int64), np.array([-1], np.int64)]
    graph = helper.make_graph(
        nodes, "layer",
        [tensor("X", [*seq, hidden]), tensor("past_key", cache), tensor("past_value", cache),
         tensor("seqlens_k", ["batch"], TensorProto.INT32), tensor("total_length", [], TensorProto.INT32)],
        [tensor("Y", [*seq, hidden]), tensor("present_key", present), tensor("present_value", present)],
        [onnx.numpy_helper.from_array(a, n) for a, n in
         zip(initializers, ["W_qkv", "W_o", "gamma", "to_heads", "minus_one"])])
    opsets = [helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)]
    return helper.make_model(graph, opset_imports=opsets, ir_version=8)


def attention_feeds(rng: np.random.Generator, *, past: int, length: int) -> dict[str, np.ndarray]:
    cache = rng.standard_normal((1, KV_HEADS, past, HEAD_SIZE)).astype(np.float32)
    return {"X": rng.standard_normal((1, length, HEADS * HEAD_SIZE)).astype(np.float32),
            "past_key": cache, "past_value": cache.copy(),
            "seqlens_k": np.array([past + length - 1], np.int32), "total_length": np.array(past + length, np.int32)}


def test_decoder_layer_loses_its_reshape_pair_and_unread_outputs(rng):
    proto = attention_with_reshape_pair(rng)
    result, model = _clean(proto)
    assert result.changes == {"identity reshapes": 1, "nodes removed": 5, "initializers removed": 2,
                              "unread outputs dropped": 3}
    assert op_histogram(model) == {"MatMul": 2, "GroupQueryAttention": 1, "SkipSimplifiedLayerNormalization": 1}
    (norm,) = [node for node in ir.serde.serialize_model(model).graph.node if node.op_type.startswith("Skip")]
    assert list(norm.output) == ["Y"]  # the kernel no longer writes mean, deviation and sum
    for past, length in ((0, 5), (5, 1)):  # a prefill and a cached decode step
        feeds = attention_feeds(rng, past=past, length=length)
        for expected, actual in zip(run(proto, feeds), run(model, feeds)):
            np.testing.assert_array_equal(actual, expected)


def test_second_run_changes_nothing(rng):
    _, model = _clean(attention_with_reshape_pair(rng))
    again = get_pass("remove-no-ops")()(model)
    assert not again.modified and again.changes == {}


def reshape_pair(first: list[int], back: str, *, allowzero: int = 0, other: list | None = None) -> onnx.ModelProto:
    """Y = Relu(Reshape(Reshape(X[N, M], first, allowzero=1), back)): ``back`` is "shape_x" (X's
    own shape), "shape_z" (input Z's shape, declared ``other``) or a constant's name."""
    nodes = [helper.make_node("Reshape", ["X", "first"], ["h"], allowzero=1),
             helper.make_node("Shape", ["X"], ["shape_x"]),
             helper.make_node("Reshape", ["h", back], ["r"], allowzero=allowzero),
             helper.make_node("Relu", ["r"], ["Y"])]
    inputs = [tensor("X", ["N", "M"])]
    if other is not None:
        inputs.append(tensor("Z", other))
        nodes.insert(1, helper.make_node("Shape", ["Z"], ["shape_z"]))
    return make_model(nodes, inputs, [_output("Y", 2)], [np.array(first, np.int64), np.array([3, 2], np.int64)],
                      names=["first", "three_two"])


def test_reshape_back_to_the_input_shape_is_removed(rng):
    proto = reshape_pair([-1], "shape_x", allowzero=1)
    result, model = _clean(proto)
    assert result.changes["identity reshapes"] == 1
    assert op_histogram(model) == {"Relu": 1}
    for shape in ((3, 4), (0, 0)):
        x = rng.standard_normal(shape).astype(np.float32)
        np.testing.assert_array_equal(run(model, {"X": x})[0], run(proto, {"X": x})[0])


def test_reshape_pairs_not_proven_identity_are_kept(rng):
    """Left alone: a pair ending in another shape; a target from another input whose dimension
    names differ (nothing says M and K agree); and a target read from X's shape without
    allowzero, which differs where X has zero-sized dimensions — shown below."""
    cases = [reshape_pair([-1], "three_two"), reshape_pair([-1], "shape_z", allowzero=1, other=["N", "K"]),
             reshape_pair([5, 0], "shape_x")]
    for proto in cases:
        result, model = _clean(proto)
        assert "identity reshapes" not in result.changes
        assert op_histogram(model)["Reshape"] == 2
    empty = np.zeros((0, 0), np.float32)
    assert run(cases[2], {"X": empty})[0].shape == (5, 0)  # X's shape was (0, 0): not an identity


def test_reshape_to_a_dimension_name_of_another_input_is_proven_when_the_names_match(rng):
    proto = reshape_pair([-1], "shape_z", allowzero=1, other=["N", "M"])
    result, model = _clean(proto)
    assert result.changes["identity reshapes"] == 1
    x = rng.standard_normal((2, 3)).astype(np.float32)
    np.testing.assert_array_equal(run(model, {"X": x, "Z": x})[0], run(proto, {"X": x, "Z": x})[0])


def _single(op: str, inputs: list[str], x: onnx.ValueInfoProto, initializers=(), names=(), **attributes):
    return make_model([helper.make_node(op, inputs, ["h"], **attributes), helper.make_node("Neg", ["h"], ["Y"])],
                      [x], [_output("Y", 2)], list(initializers), names=list(names))


def test_expand_to_the_shape_it_has_is_removed_and_a_broadcasting_one_kept(rng):
    kept = _single("Expand", ["X", "t"], tensor("X", ["N", 1]), [np.array([1, 4], np.int64)], ["t"])
    removed = _single("Expand", ["X", "t"], tensor("X", ["N", 4]), [np.array([1, 4], np.int64)], ["t"])
    assert "identity expands" not in _clean(kept)[0].changes
    result, model = _clean(removed)
    assert result.changes["identity expands"] == 1 and op_histogram(model) == {"Neg": 1}
    x = rng.standard_normal((3, 4)).astype(np.float32)
    np.testing.assert_array_equal(run(model, {"X": x})[0], run(removed, {"X": x})[0])


def transposes(first: list[int], second: list[int]) -> onnx.ModelProto:
    return make_model([helper.make_node("Transpose", ["X"], ["t"], perm=first),
                       helper.make_node("Transpose", ["t"], ["h"], perm=second),
                       helper.make_node("Neg", ["h"], ["Y"])], [tensor("X", ["A", "B", "C"])], [_output("Y", 3)])


def test_transposes_that_compose_to_the_identity_are_removed(rng):
    proto = transposes([1, 2, 0], [2, 0, 1])
    result, model = _clean(proto)
    assert result.changes["inverse transposes"] == 1 and op_histogram(model) == {"Neg": 1}
    x = rng.standard_normal((2, 3, 4)).astype(np.float32)
    np.testing.assert_array_equal(run(model, {"X": x})[0], run(proto, {"X": x})[0])
    assert not _clean(transposes([0, 2, 1], [1, 0, 2]))[0].modified


def casts(dtype: int, through: int) -> onnx.ModelProto:
    return make_model([helper.make_node("Cast", ["X"], ["wide"], to=through),
                       helper.make_node("Cast", ["wide"], ["h"], to=dtype),
                       helper.make_node("Neg", ["h"], ["Y"])], [tensor("X", ["N"], dtype)], [_output("Y", 1, dtype)])


def test_lossless_cast_round_trips_are_removed_lossy_ones_kept(rng):
    proto = casts(TensorProto.FLOAT16, TensorProto.FLOAT)
    result, model = _clean(proto)
    assert result.changes["cast round trips"] == 1 and op_histogram(model) == {"Neg": 1}
    x = np.array([0.1, -65504, np.inf, 6e-8], np.float16)
    np.testing.assert_array_equal(run(model, {"X": x})[0], run(proto, {"X": x})[0])
    for lossy in (casts(TensorProto.FLOAT, TensorProto.FLOAT16), casts(TensorProto.INT64, TensorProto.FLOAT),
                  casts(TensorProto.INT32, TensorProto.INT16)):
        assert not _clean(lossy)[0].modified  # 0.1 is no float16, 2**24 + 1 no float32, 2**20 no int16


def test_optional_outputs_someone_reads_are_kept(rng):
    """A read output must be computed. LayerNormalization's mean is a graph output: it stays and
    only the trailing inverse deviation goes. SkipSimplifiedLayerNormalization's input + skip sum
    feeds the next residual, as in every decoder layer: it stays at its place, the mean and the
    deviation before it lose their names."""
    layer_norm = make_model([helper.make_node("LayerNormalization", ["X", "gamma"], ["Y", "mean", "inv_std"], axis=-1)],
                            [tensor("X", ["N", 4])], [_output("Y", 2), _output("mean", 2)],
                            [np.ones(4, np.float32)], names=["gamma"])
    residual = helper.make_model(helper.make_graph(
        [helper.make_node("SkipSimplifiedLayerNormalization", ["X", "S", "gamma"], ["normed", "mean", "inv_std", "sum"],
                          domain="com.microsoft", epsilon=1e-5),
         helper.make_node("Add", ["normed", "sum"], ["Y"])],
        "residual", [tensor("X", ["N", 4]), tensor("S", ["N", 4])], [_output("Y", 2)],
        [onnx.numpy_helper.from_array(np.ones(4, np.float32), "gamma")]),
        opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)], ir_version=8)
    for proto, dropped, outputs in ((layer_norm, 1, ["Y", "mean"]), (residual, 2, ["normed", "", "", "sum"])):
        result, model = _clean(proto)
        assert result.changes == {"unread outputs dropped": dropped}
        assert list(ir.serde.serialize_model(model).graph.node[0].output) == outputs
        feeds = {name: rng.standard_normal((3, 4)).astype(np.float32) for name in ("X", "S")[:len(proto.graph.input)]}
        for expected, actual in zip(run(proto, feeds), run(model, feeds)):
            np.testing.assert_array_equal(actual, expected)


def test_an_output_of_the_graph_is_never_bypassed():
    """Bypassing would rename the graph's output: the Reshape stays."""
    proto = make_model([helper.make_node("Reshape", ["X", "t"], ["Y"])], [tensor("X", ["N", 4])],
                       [_output("Y", 2)], [np.array([0, 4], np.int64)], names=["t"])
    assert not _clean(proto)[0].modified


def test_int4_recipe_runs_it_after_cleanup():
    names = [step.name for step in load_recipe("int4").passes]
    assert names.index("remove-no-ops") == names.index("cleanup") + 1
