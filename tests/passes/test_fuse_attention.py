"""fuse-attention: torch's sdpa export spelling → com.microsoft.MultiHeadAttention, exact on every row."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
from onnx import TensorProto, helper

from graphopt.passes import get_pass
from graphopt.passes.pipeline import op_histogram
from tests.conftest import make_model, run, tensor

HEADS, HEAD_SIZE = 2, 4
HIDDEN = HEADS * HEAD_SIZE


def _heads_shape(prefix: str, source: str) -> list[onnx.NodeProto]:
    """[B, S, -1, head_size] computed at run time from ``source``'s shape, as the TorchScript
    exporter writes it."""
    return [
        helper.make_node("Shape", [source], [f"{prefix}_shape"]),
        helper.make_node("Gather", [f"{prefix}_shape", "zero"], [f"{prefix}_b"], axis=0),
        helper.make_node("Gather", [f"{prefix}_shape", "one"], [f"{prefix}_s"], axis=0),
        helper.make_node("Unsqueeze", [f"{prefix}_b", "axis0"], [f"{prefix}_b1"]),
        helper.make_node("Unsqueeze", [f"{prefix}_s", "axis0"], [f"{prefix}_s1"]),
        helper.make_node("Concat", [f"{prefix}_b1", f"{prefix}_s1", "minus_one", "head_size"],
                         [f"{prefix}_target"], axis=0),
    ]


def sdpa_block(rng: np.random.Generator, *, guard: bool = True) -> onnx.ModelProto:
    """One self-attention block: X[B,S,8] and a 0/1 key mask[B,S] → projections → 2 heads →
    scaled scores + mask (0 / -inf) → Softmax (→ NaN guard) → values → output projection."""
    nodes: list[onnx.NodeProto] = []
    weights, names = [], []
    for name in ("q", "k", "v", "o"):
        weights += [rng.standard_normal((HIDDEN, HIDDEN)).astype(np.float32) * 0.5,
                    rng.standard_normal(HIDDEN).astype(np.float32) * 0.1]
        names += [f"W{name}", f"b{name}"]
    for name in ("q", "k", "v"):
        nodes += [helper.make_node("MatMul", ["X", f"W{name}"], [f"{name}_mm"]),
                  helper.make_node("Add", [f"b{name}", f"{name}_mm"], [f"{name}_lin"])]
    nodes += _heads_shape("h", "q_lin")
    for name in ("q", "k", "v"):
        nodes.append(helper.make_node("Reshape", [f"{name}_lin", "h_target"], [f"{name}_bshd"]))
    scale = np.float32(HEAD_SIZE ** -0.25)
    nodes += [
        helper.make_node("Transpose", ["q_bshd"], ["q_bhsd"], perm=[0, 2, 1, 3]),
        helper.make_node("Transpose", ["k_bshd"], ["k_bhds"], perm=[0, 2, 3, 1]),
        helper.make_node("Transpose", ["v_bshd"], ["v_bhsd"], perm=[0, 2, 1, 3]),
        helper.make_node("Mul", ["q_bhsd", "sqrt_scale"], ["q_scaled"]),
        helper.make_node("Mul", ["k_bhds", "sqrt_scale"], ["k_scaled"]),
        helper.make_node("MatMul", ["q_scaled", "k_scaled"], ["scores"]),
        helper.make_node("Cast", ["mask"], ["mask_bool"], to=TensorProto.BOOL),
        helper.make_node("Unsqueeze", ["mask_bool", "axes12"], ["mask_b11s"]),
        helper.make_node("Where", ["mask_b11s", "fill_zero", "fill_neg_inf"], ["mask_bias"]),
        helper.make_node("Add", ["scores", "mask_bias"], ["masked"]),
        helper.make_node("Softmax", ["masked"], ["probs"], axis=-1),
    ]
    if guard:
        nodes += [helper.make_node("IsNaN", ["probs"], ["probs_nan"]),
                  helper.make_node("Where", ["probs_nan", "fill_zero", "probs"], ["probs_safe"])]
    nodes += [
        helper.make_node("MatMul", ["probs_safe" if guard else "probs", "v_bhsd"], ["context"]),
        # The exporter's reshape back to the shape the MatMul already has.
        helper.make_node("Shape", ["context"], ["c_shape"]),
        helper.make_node("Reshape", ["context", "c_shape"], ["context_again"]),
        helper.make_node("Transpose", ["context_again"], ["context_bshd"], perm=[0, 2, 1, 3]),
        helper.make_node("Reshape", ["context_bshd", "to_3d"], ["context_bsd"]),
        helper.make_node("MatMul", ["context_bsd", "Wo"], ["o_mm"]),
        helper.make_node("Add", ["o_mm", "bo"], ["Y"]),
    ]
    constants = {
        "zero": np.array(0, np.int64), "one": np.array(1, np.int64), "axis0": np.array([0], np.int64),
        "minus_one": np.array([-1], np.int64), "head_size": np.array([HEAD_SIZE], np.int64),
        "sqrt_scale": np.array(scale, np.float32), "axes12": np.array([1, 2], np.int64),
        "fill_zero": np.array([0.0], np.float32), "fill_neg_inf": np.array([-np.inf], np.float32),
        "to_3d": np.array([0, 0, -1], np.int64),
    }
    return make_model(
        nodes,
        [tensor("X", ["batch", "sequence", HIDDEN]), tensor("mask", ["batch", "sequence"], TensorProto.INT64)],
        [tensor("Y", ["batch", "sequence", HIDDEN])],
        weights + list(constants.values()),
        names=names + list(constants),
    )


def eager_block(rng: np.random.Generator) -> onnx.ModelProto:
    """The eager (non-sdpa) spelling: keys transposed twice, scores divided by √d, a finite
    mask bias ``(1 − mask) · float32.min``, no NaN guard."""
    model = sdpa_block(rng, guard=False)
    nodes = [n for n in model.graph.node]
    keep = [n for n in nodes if n.output[0] not in
            ("k_bhds", "q_scaled", "k_scaled", "scores", "mask_bool", "mask_b11s", "mask_bias")]
    at = next(i for i, n in enumerate(keep) if n.output[0] == "masked")
    keep[at:at] = [
        helper.make_node("Transpose", ["k_bshd"], ["k_bhsd"], perm=[0, 2, 1, 3]),
        helper.make_node("Transpose", ["k_bhsd"], ["k_bhds"], perm=[0, 1, 3, 2]),
        helper.make_node("MatMul", ["q_bhsd", "k_bhds"], ["raw_scores"]),
        helper.make_node("Div", ["raw_scores", "sqrt_head"], ["scores"]),
        helper.make_node("Cast", ["mask"], ["mask_f"], to=TensorProto.FLOAT),
        helper.make_node("Unsqueeze", ["mask_f", "axes12"], ["mask_b11s"]),
        helper.make_node("Sub", ["one_f", "mask_b11s"], ["inverted"]),
        helper.make_node("Mul", ["inverted", "float_min"], ["mask_bias"]),
    ]
    del model.graph.node[:]
    model.graph.node.extend(keep)
    model.graph.initializer.extend([
        onnx.numpy_helper.from_array(np.array(np.sqrt(HEAD_SIZE), np.float32), "sqrt_head"),
        onnx.numpy_helper.from_array(np.array(1.0, np.float32), "one_f"),
        onnx.numpy_helper.from_array(np.array(np.finfo(np.float32).min, np.float32), "float_min"),
    ])
    onnx.checker.check_model(model)
    return model


def _feeds(rng: np.random.Generator, batch: int = 3, seq: int = 5) -> dict[str, np.ndarray]:
    mask = np.ones((batch, seq), np.int64)
    mask[1, 3:] = 0  # padding
    mask[2, :] = 0  # every key masked: the guard's case
    return {"X": rng.standard_normal((batch, seq, HIDDEN)).astype(np.float32), "mask": mask}


def _fuse(proto: onnx.ModelProto):
    return get_pass("fuse-attention")()(ir.serde.deserialize_model(proto))


def test_fuses_sdpa_spelling_into_one_kernel(rng):
    result = _fuse(sdpa_block(rng))
    assert result.modified, result.notes
    ops = op_histogram(result.model)
    assert ops.get("MultiHeadAttention") == 1
    assert "Softmax" not in ops and "Transpose" not in ops
    assert ops["MatMul"] == 4  # the projections stay MatMuls, so quantize-int8 still finds them
    assert result.changes["attention fused"] == 1
    heads = next(n for n in result.model.graph if n.op_type == "MultiHeadAttention")
    assert heads.attributes["num_heads"].value == HEADS


def test_fused_block_matches_on_every_row_including_fully_masked(rng):
    proto = sdpa_block(rng)
    result = _fuse(proto)
    feeds = _feeds(rng)
    expected, got = run(proto, feeds)[0], run(result.model, feeds)[0]
    assert not np.isnan(got).any()
    np.testing.assert_allclose(got, expected, atol=1e-5)
    assert result.changes["masked-row guards"] == 1


def test_without_guard_no_guard_is_added(rng):
    proto = sdpa_block(rng, guard=False)
    result = _fuse(proto)
    assert result.modified
    assert result.changes["masked-row guards"] == 0
    assert "IsNaN" not in op_histogram(result.model)
    feeds = _feeds(rng)
    feeds["mask"][2, 0] = 1  # without a guard, fully masked rows are NaN in both; compare the rest
    np.testing.assert_allclose(run(result.model, feeds)[0], run(proto, feeds)[0], atol=1e-5)


def test_fuses_the_eager_spelling(rng):
    proto = eager_block(rng)
    result = _fuse(proto)
    assert result.modified, result.notes
    assert op_histogram(result.model).get("MultiHeadAttention") == 1
    assert "Softmax" not in op_histogram(result.model)
    feeds = _feeds(rng)  # a finite mask bias: fully masked rows are a uniform average in both
    np.testing.assert_allclose(run(result.model, feeds)[0], run(proto, feeds)[0], atol=1e-5)


def test_second_run_changes_nothing(rng):
    once = _fuse(sdpa_block(rng)).model
    again = get_pass("fuse-attention")()(once)
    assert not again.modified


def test_leaves_a_plain_softmax_classifier_alone(rng):
    proto = make_model(
        [helper.make_node("MatMul", ["X", "W"], ["z"]), helper.make_node("Softmax", ["z"], ["Y"], axis=-1)],
        [tensor("X", ["N", 4])], [tensor("Y", ["N", 3])],
        [rng.standard_normal((4, 3)).astype(np.float32)], names=["W"],
    )
    result = get_pass("fuse-attention")()(ir.serde.deserialize_model(proto))
    assert not result.modified
    assert op_histogram(result.model) == {"MatMul": 1, "Softmax": 1}


def test_input_model_is_not_modified(rng):
    model = ir.serde.deserialize_model(sdpa_block(rng))
    before = op_histogram(model)
    get_pass("fuse-attention")()(model)
    assert op_histogram(model) == before


def test_refuses_a_fusion_the_check_catches(rng, monkeypatch):
    """Without the masked-row guard the fused kernel writes NaN where the exporter wrote 0;
    the check on calibration feeds must catch it and hand back the model unchanged."""
    from graphopt.passes import fuse_attention
    from graphopt.passes.base import PassContext
    from graphopt.verify.feeds import FeedSet

    monkeypatch.setattr(fuse_attention, "_guard_masked_rows", lambda model: 0)
    fuse = get_pass("fuse-attention")()
    result = fuse(ir.serde.deserialize_model(sdpa_block(rng)),
                  PassContext(calibration=FeedSet([_feeds(rng)], source="test", synthetic=False)))
    assert not result.modified
    assert result.notes and "changed the outputs" in result.notes[0]
    assert op_histogram(result.model).get("Softmax") == 1
