"""Cross-validated evaluation: splits, statistics with known answers, calibration kept out
of the held-out part, the CLI (`evaluate`, `check --cv`) and, marked slow, the digits CNN."""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from graphopt.cli import main
from graphopt.errors import DataError, GateFailed, UsageError
from graphopt.evaluate import EvaluateOptions, evaluate, split_indices
from graphopt.verify.statistics import FoldScores, macro_f1, mcnemar, paired_bootstrap

from .conftest import make_model

CLASSES = 10
SAMPLES = 120


def classifier(weights: np.ndarray, bias: np.ndarray, batch: int | str = "N") -> onnx.ModelProto:
    """X float[batch,64] (a flattened 8x8 image) → MatMul W[64,10] → Add b[10] → Y float[batch,10]."""
    return make_model(
        [helper.make_node("MatMul", ["X", "W"], ["H"]), helper.make_node("Add", ["H", "b"], ["Y"])],
        [helper.make_tensor_value_info("X", TensorProto.FLOAT, [batch, 64])],
        [helper.make_tensor_value_info("Y", TensorProto.FLOAT, [batch, CLASSES])],
        [numpy_helper.from_array(weights, "W"), numpy_helper.from_array(bias, "b")],
    )


@pytest.fixture
def weights() -> tuple[np.ndarray, np.ndarray]:
    w = np.random.default_rng(1).standard_normal((64, CLASSES)).astype(np.float32)
    w[0] = 0  # the first pixel carries the sample's index (see `data`), not a feature
    return w, np.zeros(CLASSES, np.float32)


@pytest.fixture
def base(tmp_path: Path, weights: tuple[np.ndarray, np.ndarray]) -> Path:
    path = tmp_path / "base.onnx"
    onnx.save(classifier(*weights), path)
    return path


@pytest.fixture
def always_zero(tmp_path: Path, weights: tuple[np.ndarray, np.ndarray]) -> Path:
    """The base with a bias of 1000 on class 0: it predicts class 0 for every sample."""
    w, b = weights
    path = tmp_path / "zero.onnx"
    onnx.save(classifier(w, b + np.eye(CLASSES, dtype=np.float32)[0] * 1000), path)
    return path


@pytest.fixture
def data(tmp_path: Path, weights: tuple[np.ndarray, np.ndarray]) -> Path:
    """X whose first column is the sample's index (to trace where a sample went); labels are
    the base model's own predictions, so the base is right on every sample (all 10 classes
    occur, 12 of them class 0)."""
    rng = np.random.default_rng(2)
    x = rng.standard_normal((SAMPLES, 64)).astype(np.float32)
    x[:, 0] = np.arange(SAMPLES)
    labels = np.argmax(x @ weights[0] + weights[1], axis=1).astype(np.int64)
    path = tmp_path / "data.npz"
    np.savez(path, X=x, labels=labels)
    return path


def _labels(data: Path) -> np.ndarray:
    return np.load(data)["labels"]


# -- splits -----------------------------------------------------------------------------------


def _options(**kwargs: Any) -> EvaluateOptions:
    return EvaluateOptions(labels="labels", candidate="unused.onnx", **kwargs)


IMBALANCED = np.repeat([0, 1, 2], [60, 30, 15])  # 105 samples, ratios 4:2:1


def test_stratified_folds_keep_class_ratios() -> None:
    for _, test in split_indices(len(IMBALANCED), IMBALANCED, _options(folds=5, stratified=True)):
        assert np.bincount(IMBALANCED[test]).tolist() == [12, 6, 3]


def test_plain_folds_do_not_keep_class_ratios_here() -> None:
    # The stratification test above can fail: shuffled plain folds miss the exact ratios.
    counts = [np.bincount(IMBALANCED[test], minlength=3).tolist()
              for _, test in split_indices(len(IMBALANCED), IMBALANCED, _options(folds=5))]
    assert any(c != [12, 6, 3] for c in counts)


def test_stratified_holdout_keeps_class_ratios() -> None:
    ((train, test),) = split_indices(len(IMBALANCED), IMBALANCED, _options(holdout=0.2, stratified=True))
    assert np.bincount(IMBALANCED[test]).tolist() == [12, 6, 3]
    assert np.bincount(IMBALANCED[train]).tolist() == [48, 24, 12]


@pytest.mark.parametrize("kind", [{}, {"stratified": True}, {"cyclic": True}])
def test_folds_are_disjoint_and_cover_the_data(kind: dict[str, bool]) -> None:
    splits = split_indices(len(IMBALANCED), IMBALANCED, _options(folds=4, **kind))
    assert len(splits) == 4
    held_out = np.concatenate([test for _, test in splits])
    assert sorted(held_out.tolist()) == list(range(len(IMBALANCED)))  # each sample held out exactly once
    for train, test in splits:
        assert not set(train) & set(test)
        assert len(train) + len(test) == len(IMBALANCED)


def test_cyclic_folds_are_contiguous_blocks_in_data_order() -> None:
    splits = split_indices(10, None, EvaluateOptions(candidate="c.onnx", metric="cosine", folds=3, cyclic=True))
    assert [test.tolist() for _, test in splits] == [[0, 1, 2, 3], [4, 5, 6], [7, 8, 9]]


def test_splits_follow_the_seed() -> None:
    def tests(seed: int) -> list[list[int]]:
        return [t.tolist() for _, t in split_indices(105, IMBALANCED, _options(folds=5, stratified=True, seed=seed))]

    assert tests(0) == tests(0)
    assert tests(0) != tests(1)


def test_too_rare_class_for_stratified_folds_is_named() -> None:
    labels = np.array([0] * 10 + [1] * 2)
    with pytest.raises(DataError, match=r"1 \(2\)"):
        split_indices(12, labels, _options(folds=3, stratified=True))


# -- statistics with known answers ----------------------------------------------------------


def _fold(base: np.ndarray, candidate: np.ndarray) -> FoldScores:
    return FoldScores(base.astype(float), candidate.astype(float), np.zeros(len(base), np.int64),
                      lambda values, _labels: values.mean(axis=-1))


def test_identical_models_differ_by_exactly_zero() -> None:
    correct = np.random.default_rng(0).random(200) < 0.8
    interval = paired_bootstrap([_fold(correct[:100], correct[:100]), _fold(correct[100:], correct[100:])])
    assert (interval.estimate, interval.low, interval.high) == (0.0, 0.0, 0.0)


def test_candidate_wrong_on_k_of_n_samples() -> None:
    n, k = 200, 6
    base = np.ones(n, bool)
    candidate = base.copy()
    candidate[[3, 50, 90, 120, 160, 199]] = False
    interval = paired_bootstrap([_fold(base[:100], candidate[:100]), _fold(base[100:], candidate[100:])], seed=3)
    assert interval.estimate == pytest.approx(-k / n, abs=1e-12)
    assert interval.low < -k / n < interval.high <= 0
    # the candidate is never better, so no resample shows a gain; 6 errors in 200 make a loss certain
    assert interval.high < 0
    # a binomial-sized interval: ± about 2·sqrt(k)/n
    assert interval.high - interval.low == pytest.approx(4 * math.sqrt(k) / n, rel=0.35)


def test_bootstrap_is_seeded() -> None:
    rng = np.random.default_rng(5)
    fold = _fold(rng.random(80) < 0.7, rng.random(80) < 0.7)
    assert paired_bootstrap([fold], seed=1) == paired_bootstrap([fold], seed=1)
    assert paired_bootstrap([fold], seed=1).low != paired_bootstrap([fold], seed=2).low


def test_mcnemar_exact_binomial_on_a_known_table() -> None:
    base = np.array([True] * 10 + [False] * 2 + [True] * 30)
    candidate = np.array([False] * 10 + [True] * 2 + [True] * 30)
    result = mcnemar(base, candidate)
    assert (result["base_only_correct"], result["candidate_only_correct"]) == (10, 2)
    assert result["test"] == "exact binomial"
    assert result["p_value"] == pytest.approx(2 * (1 + 12 + 66) / 4096)  # 2·P(X ≤ 2), X ~ Bin(12, ½)


def test_mcnemar_chi_square_on_a_known_table() -> None:
    base = np.array([True] * 30 + [False] * 15)
    result = mcnemar(base, ~base)
    assert result["test"] == "chi-square, continuity corrected"
    assert result["statistic"] == pytest.approx(14**2 / 45)
    scipy_stats = pytest.importorskip("scipy.stats")
    assert result["p_value"] == pytest.approx(scipy_stats.chi2.sf(14**2 / 45, 1))
    assert result["p_value"] == pytest.approx(0.03689, abs=1e-4)


def test_mcnemar_without_disagreement() -> None:
    same = np.array([True, False, True])
    assert mcnemar(same, same)["p_value"] == 1.0


def test_macro_f1_matches_scikit_learn() -> None:
    from sklearn.metrics import f1_score

    rng = np.random.default_rng(4)
    labels, predictions = rng.integers(0, 5, 300), rng.integers(0, 5, 300)
    predictions[:150] = labels[:150]
    assert macro_f1(labels, predictions, range(5)) == pytest.approx(f1_score(labels, predictions, average="macro"))


# -- the fold loop --------------------------------------------------------------------------


def test_identical_candidate_end_to_end(base: Path, data: Path) -> None:
    result = evaluate(base, data, EvaluateOptions(labels="labels", folds=4, stratified=False, candidate=base)).to_dict()
    assert len(result["folds"]) == 4
    assert all(f["base"] == f["candidate"] == 1.0 for f in result["folds"])
    assert (result["difference"]["ci_low"], result["difference"]["ci_high"]) == (0.0, 0.0)
    assert result["mcnemar"]["p_value"] == 1.0


def test_known_difference_end_to_end(base: Path, always_zero: Path, data: Path) -> None:
    zeros = float(np.mean(_labels(data) == 0))
    assert zeros == 12 / SAMPLES
    result = evaluate(base, data, EvaluateOptions(labels="labels", folds=3, candidate=always_zero)).to_dict()
    assert result["difference"]["estimate"] == pytest.approx(zeros - 1.0)
    assert result["summary"]["candidate"]["mean"] == pytest.approx(zeros, abs=0.05)
    assert result["difference"]["ci_low"] <= zeros - 1.0 <= result["difference"]["ci_high"] < 0
    assert result["mcnemar"]["base_only_correct"] == SAMPLES - int(np.sum(_labels(data) == 0))


def test_top5_and_cosine(base: Path, always_zero: Path, data: Path) -> None:
    top1 = evaluate(base, data, EvaluateOptions(labels="labels", holdout=0.25, candidate=always_zero)).to_dict()
    top5 = evaluate(base, data, EvaluateOptions(labels="labels", holdout=0.25, candidate=always_zero, metric="top5")).to_dict()
    assert top5["folds"][0]["candidate"] >= top1["folds"][0]["candidate"]
    cosine = evaluate(base, data, EvaluateOptions(labels="labels", holdout=0.25, candidate=base, metric="cosine")).to_dict()
    assert cosine["folds"][0]["candidate"] == pytest.approx(1.0) and cosine["mcnemar"] is None


def test_fixed_batch_model_scores_every_sample(weights: tuple[np.ndarray, np.ndarray], data: Path,
                                              tmp_path: Path) -> None:
    fixed = tmp_path / "fixed7.onnx"
    onnx.save(classifier(*weights, batch=7), fixed)  # 120 samples = 17 batches of 7 + 1
    result = evaluate(fixed, data, EvaluateOptions(labels="labels", folds=3, candidate=fixed)).to_dict()
    assert sum(f["held_out"] for f in result["folds"]) == SAMPLES
    assert all(f["base"] == 1.0 for f in result["folds"])


def test_calibration_and_verification_never_see_held_out_samples(
    base: Path, data: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    seen: list[dict[str, set[int]]] = []

    def recording_optimize(model: Path, output: Path, options: Any) -> SimpleNamespace:
        seen.append({"calib": set(np.load(options.calib)["X"][:, 0].astype(int).tolist()),
                     "data": set(np.load(options.data)["X"][:, 0].astype(int).tolist())})
        shutil.copyfile(model, output)
        return SimpleNamespace(input_bytes=1, output_bytes=1,
                               verification={"parity": {"cosine_mean": 1.0, "max_abs": 0.0}})

    monkeypatch.setattr("graphopt.evaluate.optimize", recording_optimize)
    result = evaluate(base, data, EvaluateOptions(labels="labels", folds=4, stratified=True, recipe="int8")).to_dict()
    assert len(seen) == 4
    for fold, used in zip(result["folds"], seen):
        held_out = set(fold["test_indices"])
        assert used["calib"] and not used["calib"] & held_out
        assert not used["data"] & held_out
        assert used["calib"] | held_out == set(range(SAMPLES))


def test_a_fold_missing_its_budget_is_named(base: Path, data: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def refusing_optimize(model: Path, output: Path, options: Any) -> SimpleNamespace:
        raise GateFailed("fold.onnx not written: cosine 0.9 (required >= 0.995)", ["min_cosine"])

    monkeypatch.setattr("graphopt.evaluate.optimize", refusing_optimize)
    with pytest.raises(GateFailed, match=r"^fold 1: fold.onnx not written") as caught:
        evaluate(base, data, EvaluateOptions(labels="labels", folds=2, recipe="int8"))
    assert caught.value.failures == ["min_cosine"]


def test_labels_outside_the_classes_are_refused_before_compressing(
    base: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("graphopt.evaluate.optimize", lambda *a: pytest.fail("compressed despite bad labels"))
    bad = tmp_path / "bad.npz"
    np.savez(bad, X=np.zeros((20, 64), np.float32), labels=np.full(20, CLASSES, np.int64))
    with pytest.raises(DataError, match="label 10 is outside output 'Y' with 10 classes"):
        evaluate(base, bad, EvaluateOptions(labels="labels", folds=2, recipe="int8"))


def test_lossless_recipe_costs_nothing(base: Path, data: Path) -> None:
    result = evaluate(base, data, EvaluateOptions(labels="labels", folds=2, recipe="lossless")).to_dict()
    assert [f["difference"] for f in result["folds"]] == [0.0, 0.0]
    assert all(f["optimize"]["calibration_samples"] == f["train"] for f in result["folds"])


def test_contradictory_options_are_refused(base: Path, data: Path) -> None:
    with pytest.raises(UsageError, match="exactly one of --holdout"):
        evaluate(base, data, EvaluateOptions(labels="labels", candidate=base))
    with pytest.raises(UsageError, match="needs --labels"):
        evaluate(base, data, EvaluateOptions(folds=2, candidate=base))


# -- command line ---------------------------------------------------------------------------


def test_cli_writes_documented_json(base: Path, always_zero: Path, data: Path, tmp_path: Path,
                                    capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "r.json"
    code = main(["evaluate", str(base), "--data", str(data), "--labels", "labels", "--folds", "3", "--stratified",
                 "--candidate", str(always_zero), "--json", str(out), "-q"])
    assert code == 0 and capsys.readouterr().out == ""
    result = json.loads(out.read_text())
    assert {"folds", "summary", "difference", "mcnemar", "split"} <= set(result)
    assert {"fold", "base", "candidate", "difference", "held_out", "test_indices"} <= set(result["folds"][0])
    assert {"estimate", "ci_low", "ci_high", "confidence"} <= set(result["difference"])


def test_cli_summary_names_every_fold(base: Path, always_zero: Path, data: Path,
                                      capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["evaluate", str(base), "--data", str(data), "--labels", "labels", "--folds", "3", "--cyclic",
                 "--candidate", str(always_zero)]) == 0
    out = capsys.readouterr().out
    assert out.startswith("cyclic k-fold")
    assert all(f"fold {n}: held out    40  base 1.0000" in out for n in (1, 2, 3))
    assert "paired difference -0.9000" in out and "McNemar: base-only correct" in out


@pytest.mark.parametrize(
    ("extra", "expected"),
    [
        (["--labels", "nope", "--folds", "3"], "no array 'nope' for --labels"),
        (["--labels", "labels", "--folds", "3", "--holdout", "0.2"], "not allowed with argument"),
        (["--labels", "labels", "--folds", "3", "--stratified", "--cyclic"], "not allowed with argument"),
        (["--labels", "labels", "--holdout", "1.5"], "--holdout must be a fraction"),
        (["--folds", "3"], "needs --labels"),
    ],
)
def test_cli_errors_exit_2_with_one_line(base: Path, data: Path, tmp_path: Path, extra: list[str], expected: str,
                                         capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "r.json"
    code = main(["evaluate", str(base), "--data", str(data), "--candidate", str(base), "--json", str(out), *extra])
    captured = capsys.readouterr()
    assert code == 2
    assert expected in captured.err and captured.err.count("\n") == 1 and "Traceback" not in captured.err
    assert not out.exists()


def test_check_cv_gate_passes_within_budget(base: Path, data: Path, tmp_path: Path,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "c.json"
    code = main(["check", str(base), str(base), "--data", str(data), "--labels", "labels", "--cv", "3",
                 "--max-drop", "0", "--json", str(out)])
    assert code == 0
    assert "PASS  cv_max_drop" in capsys.readouterr().out
    report = json.loads(out.read_text())
    assert len(report["cross_validation"]["folds"]) == 3


def test_check_cv_gate_fails_on_a_confident_drop(base: Path, always_zero: Path, data: Path,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["check", str(base), str(always_zero), "--data", str(data), "--labels", "labels", "--cv", "3",
                 "--max-drop", "0.05"])
    captured = capsys.readouterr()
    assert code == 1
    assert "FAIL  cv_max_drop" in captured.out and "cv_max_drop" in captured.err


def test_check_cv_gate_tolerates_a_drop_within_a_wide_budget(base: Path, always_zero: Path, data: Path) -> None:
    assert main(["check", str(base), str(always_zero), "--data", str(data), "--labels", "labels", "--cv", "3",
                 "--max-drop", "1.0", "-q"]) == 0


def test_check_max_drop_needs_cv(base: Path, data: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["check", str(base), str(base), "--data", str(data), "--max-drop", "0.01"]) == 2
    assert "--max-drop goes with --cv" in capsys.readouterr().err


# -- the real digits CNN ----------------------------------------------------------------------


@pytest.mark.slow
def test_digits_cnn_int8_five_stratified_folds(tmp_path: Path) -> None:
    pytest.importorskip("torch")
    script = Path(__file__).parents[1] / "examples" / "digits" / "make_digits_model.py"
    subprocess.run([sys.executable, str(script), "--out", str(tmp_path)], check=True, capture_output=True)
    out = tmp_path / "r.json"
    code = main(["evaluate", str(tmp_path / "digits.onnx"), "--data", str(tmp_path / "digits.npz"),
                 "--labels", "labels", "--folds", "5", "--stratified", "--recipe", "int8", "--json", str(out), "-q"])
    assert code == 0
    result = json.loads(out.read_text())
    assert [f["fold"] for f in result["folds"]] == [1, 2, 3, 4, 5]
    assert sum(f["held_out"] for f in result["folds"]) == result["data"]["samples"] == 1079
    for fold in result["folds"]:
        assert fold["base"] > 0.9 and fold["candidate"] > 0.9
        assert fold["optimize"]["output_bytes"] < 0.5 * fold["optimize"]["input_bytes"]
    diff = result["difference"]
    assert diff["ci_low"] <= diff["estimate"] <= diff["ci_high"]
    assert diff["ci_low"] > -0.02  # int8 costs this CNN well under 2 points of accuracy
