"""keep-logits: the LM head limited to the last positions on request, every position by default."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import pytest
from onnx import TensorProto, helper

from graphopt.passes.base import PassContext
from graphopt.passes.keep_logits import KeepLogitsPass
from graphopt.passes.weights import lm_head
from tests.conftest import make_model, run, tensor

VOCAB, HIDDEN = 11, 8


def decoder_like(rng: np.random.Generator, *, softcap: bool = False, flat: bool = False) -> ir.Model:
    """input_ids → embedding Gather → Tanh (a stand-in for the layers) → head MatMul (→ soft-capping
    Div/Tanh/Mul) → logits [batch, sequence, vocab] (``flat``: [tokens, vocab], no sequence axis)."""
    table = rng.standard_normal((VOCAB, HIDDEN)).astype(np.float32)
    head = rng.standard_normal((HIDDEN, VOCAB)).astype(np.float32)
    nodes = [helper.make_node("Gather", ["table", "input_ids"], ["embedded"]),
             helper.make_node("Tanh", ["embedded"], ["hidden"]),
             helper.make_node("MatMul", ["hidden", "head"], ["raw" if softcap else "logits"])]
    initializers, names = [table, head], ["table", "head"]
    if softcap:
        nodes += [helper.make_node("Div", ["raw", "cap"], ["scaled"]), helper.make_node("Tanh", ["scaled"], ["capped"]),
                  helper.make_node("Mul", ["capped", "cap"], ["logits"])]
        initializers.append(np.array(3.0, np.float32))
        names.append("cap")
    ids = tensor("input_ids", ["tokens"] if flat else ["batch", "sequence"], TensorProto.INT64)
    logits = tensor("logits", ["tokens", VOCAB] if flat else ["batch", "sequence", VOCAB])
    model = make_model(nodes, [ids], [logits], initializers, names=names, opset=18)
    return ir.serde.deserialize_model(model)


@pytest.mark.parametrize("softcap", [False, True])
def test_every_position_by_default_and_the_last_ones_on_request(softcap):
    rng = np.random.default_rng(0)
    original = decoder_like(rng, softcap=softcap)
    ids = rng.integers(0, VOCAB, (2, 5))
    expected = run(original, {"input_ids": ids})[0]
    result = KeepLogitsPass()(original, PassContext())
    assert result.modified and result.changes == {"LM heads limited": 1}
    model = result.model
    assert [v.name for v in model.graph.inputs] == ["input_ids", "logits_to_keep"]
    np.testing.assert_array_equal(run(model, {"input_ids": ids})[0], expected)
    for keep in (1, 3):
        kept = run(model, {"input_ids": ids, "logits_to_keep": np.asarray(keep, np.int64)})[0]
        assert kept.shape == (2, keep, VOCAB)
        np.testing.assert_array_equal(kept, expected[:, -keep:])
    np.testing.assert_array_equal(run(model, {"input_ids": ids, "logits_to_keep": np.asarray(0, np.int64)})[0],
                                  expected)


def test_a_second_run_and_graphs_without_a_sequence_axis_change_nothing():
    rng = np.random.default_rng(1)
    once = KeepLogitsPass()(decoder_like(rng), PassContext()).model
    again = KeepLogitsPass()(once, PassContext())
    assert not again.modified and "already" in again.notes[0]
    flat = KeepLogitsPass()(decoder_like(rng, flat=True), PassContext())
    assert not flat.modified and "not declared [batch, sequence, vocab]" in flat.notes[0]


def test_a_model_whose_logits_come_from_no_head_is_left_alone():
    model = make_model([helper.make_node("Softmax", ["x"], ["logits"])], [tensor("x", ["b", "s", 4])],
                       [tensor("logits", ["b", "s", 4])], opset=18)
    model = ir.serde.deserialize_model(model)
    assert lm_head(model.graph) is None
    result = KeepLogitsPass()(model, PassContext())
    assert not result.modified and "no LM head" in result.notes[0]


def test_the_input_survives_simplify_which_folds_the_other_initializers():
    """onnxsim folds initializers as constants; a default the caller may override is not one."""
    from graphopt.passes.simplify import SimplifyPass

    rng = np.random.default_rng(2)
    model = KeepLogitsPass()(decoder_like(rng, softcap=True), PassContext()).model
    ids = rng.integers(0, VOCAB, (1, 4))
    expected = run(model, {"input_ids": ids, "logits_to_keep": np.asarray(2, np.int64)})[0]
    result = SimplifyPass()(model, PassContext())
    assert "logits_to_keep" in [v.name for v in result.model.graph.inputs]
    assert "logits_to_keep" in result.model.graph.initializers
    np.testing.assert_array_equal(run(result.model, {"input_ids": ids, "logits_to_keep": np.asarray(2, np.int64)})[0],
                                  expected)
    assert run(result.model, {"input_ids": ids})[0].shape == (1, 4, VOCAB)
