"""graphopt.verify.judge and verify.kinds: one budget for searches and the gate, worked by hand."""

from __future__ import annotations

import math

import numpy as np
import onnx_ir as ir
import pytest
from onnx import TensorProto, helper

from graphopt.verify.gate import Thresholds, gate_checks, failures
from graphopt.verify.judge import Bound, Budget, Judge, hold_out
from graphopt.verify.kinds import output_kinds
from graphopt.verify.parity import OutputParity, ParityReport, compare_outputs
from tests.conftest import make_model, tensor

KINDS = {"probs": "class scores", "emb": "embeddings", "mask": "dense map"}


def _out(name: str, *, cosine: float = 1.0, top1: float | None = None, max_abs: float = 0.0,
         positions: int = 0, std: float = 0.0) -> OutputParity:
    return OutputParity(name, max_abs, max_abs / 2, 0.0, cosine, cosine, top1, 0, kind=KINDS.get(name),
                        cosine_std=std, top1_positions=positions)


# -- budget ---------------------------------------------------------------------------------


def test_recipe_defaults_follow_output_kinds():
    budget = Budget.resolve(Thresholds(), KINDS, defaults=Thresholds(min_cosine=0.995, min_top1=0.99))

    assert budget.bounds == (Bound("cosine", 0.995, ("emb", "mask")), Bound("top1", 0.99, ("probs",)))


def test_a_stated_budget_replaces_every_recipe_default():
    budget = Budget.resolve(Thresholds(min_top1=0.97), KINDS,
                            defaults=Thresholds(min_cosine=0.995, min_top1=0.99, max_abs=1e-4))

    assert budget.bounds == (Bound("top1", 0.97, ("probs",)),)


def test_a_stated_cosine_applies_to_every_output():
    budget = Budget.resolve(Thresholds(min_cosine=0.9, max_abs=0.5), KINDS, defaults=Thresholds(min_top1=0.99))

    assert budget.bounds == (Bound("cosine", 0.9, ("probs", "emb", "mask")), Bound("max_abs", 0.5, ("probs", "emb", "mask")))


def test_a_recipe_without_min_top1_judges_class_scores_by_cosine_too():
    budget = Budget.resolve(Thresholds(), KINDS, defaults=Thresholds(min_cosine=0.98))

    assert budget.bounds == (Bound("cosine", 0.98, ("probs", "emb", "mask")),)


def test_error_is_the_share_of_the_worst_bound_used():
    budget = Budget.resolve(Thresholds(), KINDS, defaults=Thresholds(min_cosine=0.99, min_top1=0.9))
    # emb loses 0.004 of cosine (40% of 0.01), mask 0.002; probs loses 0.06 of agreement (60% of 0.1).
    parity = ParityReport([_out("probs", cosine=0.5, top1=0.94), _out("emb", cosine=0.996), _out("mask", cosine=0.998)], 8)

    error, bound = budget.error(parity)

    assert error == pytest.approx(0.6) and bound.metric == "top1"


def test_max_abs_error_is_the_ratio_to_its_bound():
    bound = Bound("max_abs", 0.5, ("emb",))
    assert bound.error(0.25) == 0.5 and bound.error(None) == math.inf
    assert Bound("cosine", 1.0, ("emb",)).error(1.0) == 0.0
    assert Bound("cosine", 1.0, ("emb",)).error(0.999) == math.inf


def test_gate_checks_name_the_worst_output():
    budget = Budget.resolve(Thresholds(min_cosine=0.99), KINDS)
    parity = ParityReport([_out("probs", cosine=0.999), _out("emb", cosine=0.98), _out("mask", cosine=0.995)], 8)

    (failed,) = failures(gate_checks(Thresholds(min_cosine=0.99), parity, budget=budget))

    assert failed.measured == 0.98
    assert failed.message == "cosine (mean per sample) 0.98 on 'emb' (required >= 0.99)"


# -- held-out split and verdicts ------------------------------------------------------------


def test_hold_out_keeps_the_last_part_and_never_all():
    feeds = [{"i": np.array(i)} for i in range(8)]
    split = hold_out(feeds, 0.25)
    assert [int(f["i"]) for f in split.judge] == [6, 7] and len(split.tune) == 6 and not split.weak
    assert len(hold_out(feeds[:2], 0.9).tune) == 1


def test_one_feed_both_tunes_and_judges_as_weak_evidence():
    split = hold_out([{"x": np.zeros(1)}], 0.25)
    assert split.tune == split.judge and split.weak


def _scale_model(factor: float) -> ir.Model:
    """X[N,4] → Mul(factor) → features (cosine-judged) and Mul → logits[N,4] (agreement-judged)."""
    proto = make_model(
        [helper.make_node("Mul", ["X", "f"], ["features"]), helper.make_node("Mul", ["X", "g"], ["logits"])],
        [tensor("X", ["N", 4])], [tensor("features", ["N", 4]), tensor("logits", ["N", 4])],
        [np.array(factor, np.float32), np.array([1, 1, 1, factor], np.float32)], names=["f", "g"],
    )
    return ir.serde.deserialize_model(proto)


def test_judge_measures_each_output_by_its_kind_and_applies_the_reserve(rng):
    model = _scale_model(1.0)
    assert output_kinds(model) == {"features": "embeddings", "logits": "class scores"}
    feeds = [{"X": rng.standard_normal((16, 4)).astype(np.float32)} for _ in range(4)]
    budget = Budget.resolve(Thresholds(), output_kinds(model), defaults=Thresholds(min_cosine=0.99, min_top1=0.5))
    judge = Judge(model, feeds, budget, reserve=0.4)

    same = judge.verdict(_scale_model(1.0))
    assert same.error == 0.0 and same.meets_target and same.meets_budget

    # Scaling keeps the cosine at 1; it moves the argmax wherever column 3 overtakes the rest.
    scaled = judge.verdict(_scale_model(3.0))
    logits = [f["X"] for f in feeds]
    agree = np.mean(np.concatenate([np.argmax(x, 1) == np.argmax(x * [1, 1, 1, 3], 1) for x in logits]))
    assert scaled.parity.outputs[1].top1 == pytest.approx(agree)
    assert scaled.error == pytest.approx((1 - agree) / 0.5)
    assert scaled.bound.metric == "top1"
    assert scaled.meets_target == (scaled.error <= 0.6 and scaled.error + 2 * scaled.noise <= 1)


def test_noise_of_an_agreement_is_its_binomial_standard_error():
    bound = Bound("top1", 0.9, ("probs",))
    assert bound.noise(_out("probs", top1=0.96, positions=100), 10) == pytest.approx(math.sqrt(0.96 * 0.04 / 100) / 0.1)
    assert Bound("cosine", 0.99, ("emb",)).noise(_out("emb", std=0.01), 25) == pytest.approx(0.01 / 5 / 0.01)


# -- kinds ----------------------------------------------------------------------------------


def test_kinds_from_ops_shapes_and_names():
    nodes = [
        helper.make_node("Gemm", ["X", "W"], ["g"]),
        helper.make_node("Softmax", ["g"], ["p"], axis=-1),
        helper.make_node("Reshape", ["p", "s"], ["scores"]),
        helper.make_node("Identity", ["g"], ["sentence_embedding"]),
        helper.make_node("Unsqueeze", ["g", "a"], ["seq"]),
        helper.make_node("Softmax", ["seq"], ["ctc"], axis=2),
        helper.make_node("Unsqueeze", ["seq", "a"], ["map"]),
        helper.make_node("ArgMax", ["g"], ["label"], axis=1),
    ]
    proto = make_model(
        nodes, [tensor("X", ["N", 8])],
        [tensor("scores", ["N", 8]), tensor("sentence_embedding", ["N", 8]), tensor("ctc", ["N", 1, 8]),
         tensor("map", ["N", 1, 1, 8]), tensor("label", ["N", 1], TensorProto.INT64), tensor("g", ["N", 8])],
        [np.zeros((8, 8), np.float32), np.array([-1, 8], np.int64), np.array([1], np.int64)], names=["W", "s", "a"],
    )

    assert output_kinds(ir.serde.deserialize_model(proto)) == {
        "scores": "class scores", "sentence_embedding": "embeddings", "ctc": "class score sequence",
        "map": "dense map", "label": "integers", "g": "class scores",
    }


# -- parity over feeds of different sizes ---------------------------------------------------


def test_outputs_whose_size_varies_between_feeds_compare_feed_by_feed():
    small, large = np.ones((1, 2, 3), np.float32), np.ones((1, 4, 5), np.float32)
    report = compare_outputs([{"Y": small}, {"Y": large}], [{"Y": small}, {"Y": large * 1.5}])

    (out,) = report.outputs
    assert out.max_abs == pytest.approx(0.5) and out.cosine_mean == pytest.approx(1.0)
    assert out.mean_abs == pytest.approx(0.5 * 20 / 26)


def test_integer_outputs_are_judged_by_equality():
    ref = np.array([[1, 2, 3, 4]], np.int64)
    report = compare_outputs([{"L": ref}], [{"L": np.array([[1, 2, 0, 4]], np.int64)}], {"L": "integers"})
    assert report.outputs[0].top1 == 0.75 and report.outputs[0].top1_positions == 4


def _sequence(*rows: list[float]) -> np.ndarray:
    return np.array([rows], np.float32)


def test_a_near_tie_flipped_without_changing_the_decoded_sequence_still_agrees():
    # Class 0 is the blank (the reference's most frequent pick). Position 0: the reference's
    # top two are class 1 at 0.500 and the blank at 0.496, a near-tie; the candidate picks the
    # blank there, but position 1 still reads class 1: both decode to "1".
    ref = _sequence([0.496, 0.500, 0.004], [0.1, 0.8, 0.1], [0.9, 0.05, 0.05], [0.9, 0.05, 0.05])
    cand = _sequence([0.500, 0.496, 0.004], [0.1, 0.8, 0.1], [0.9, 0.05, 0.05], [0.9, 0.05, 0.05])

    out = compare_outputs([{"P": ref}], [{"P": cand}], {"P": "class score sequence"}).outputs[0]

    assert out.top1 == 1.0 and out.top1_ties == 1
    assert out.sequences_same == 1.0 and out.sequences == 1 and out.blank == 0


def test_a_near_tie_that_changes_the_decoded_sequence_is_not_forgiven():
    # Position 0: class 2 at 0.500 against class 1 at 0.496 in the reference; the candidate
    # reads class 1, so the decoded sequence changes from "2" to "1": the user sees it.
    ref = _sequence([0.004, 0.496, 0.500], [0.9, 0.05, 0.05], [0.9, 0.05, 0.05], [0.9, 0.05, 0.05])
    cand = _sequence([0.004, 0.500, 0.496], [0.9, 0.05, 0.05], [0.9, 0.05, 0.05], [0.9, 0.05, 0.05])

    out = compare_outputs([{"P": ref}], [{"P": cand}], {"P": "class score sequence"}).outputs[0]

    assert out.top1 == 0.75 and out.top1_positions == 4 and out.top1_ties == 0
    assert out.sequences_same == 0.0


def test_a_classifier_that_kept_its_pooled_axes_is_judged_on_axis_1():
    proto = make_model([helper.make_node("Softmax", ["X"], ["prob"], axis=1)], [tensor("X", ["N", 5, 1, 1])],
                       [tensor("prob", ["N", 5, 1, 1])])
    assert output_kinds(ir.serde.deserialize_model(proto)) == {"prob": "class scores"}
    ref = np.array([[[[0.1]], [[0.7]], [[0.2]], [[0.0]], [[0.0]]]], np.float32)
    cand = np.array([[[[0.1]], [[0.2]], [[0.7]], [[0.0]], [[0.0]]]], np.float32)
    assert compare_outputs([{"prob": ref}], [{"prob": cand}], {"prob": "class scores"}).outputs[0].top1 == 0.0
