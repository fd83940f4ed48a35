"""graphopt.verify.parity: the distance between a reference's and a candidate's outputs,
checked against numbers worked out by hand."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
import pytest

from graphopt.errors import DataError
from graphopt.verify.compare import compare_files
from graphopt.verify.feeds import FeedSet, load_feeds
from graphopt.verify.gate import Thresholds
from graphopt.verify.parity import compare_outputs, run_outputs
from graphopt.verify.runtime import make_session

from .models import LINEAR_B, LINEAR_W, linear_model, specs_of

REF = np.array([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]], dtype=np.float32)


def test_identical_outputs_are_a_perfect_match() -> None:
    report = compare_outputs([{"Y": REF}], [{"Y": REF.copy()}])

    (out,) = report.outputs
    assert (out.max_abs, out.mean_abs, out.max_rel) == (0.0, 0.0, 0.0)
    assert (out.cosine_mean, out.cosine_min) == (1.0, 1.0)
    assert out.top1 == 1.0
    assert out.new_nonfinite == 0 and out.shape_mismatch is None
    assert report.samples == 2
    assert report.shape_mismatches == []


def test_known_perturbation_gives_the_hand_computed_errors() -> None:
    # +0.5 on Y[0,0] (ref 1) and -0.25 on Y[1,2] (ref 6); six values in all.
    cand = REF + np.array([[0.5, 0, 0], [0, 0, -0.25]], dtype=np.float32)

    out = compare_outputs([{"Y": REF}], [{"Y": cand}]).outputs[0]

    assert out.max_abs == 0.5
    assert out.mean_abs == pytest.approx((0.5 + 0.25) / 6, rel=1e-12)
    assert out.max_rel == pytest.approx(0.5 / 1.0, rel=1e-12)  # |ref| = 1 is above the floor 6e-3
    # sample 0: (1.5,2,3)·(1,2,3) / (|..|·|..|); sample 1 likewise with (4,5,5.75)
    expected = [
        np.dot(r, c) / (np.linalg.norm(r) * np.linalg.norm(c))
        for r, c in zip(REF.astype(np.float64), cand.astype(np.float64))
    ]
    assert out.cosine_min == pytest.approx(min(expected), rel=1e-12)
    assert out.cosine_mean == pytest.approx(np.mean(expected), rel=1e-12)
    assert out.top1 == 1.0


def test_relative_error_near_zero_uses_the_output_scale_as_floor() -> None:
    # ref (0, 1000): the 1e-3 × 1000 = 1 floor turns a 0.5 error at ref 0 into 0.5, not infinity.
    ref = np.array([[0.0, 1000.0]], dtype=np.float32)
    cand = np.array([[0.5, 1000.0]], dtype=np.float32)

    out = compare_outputs([{"Y": ref}], [{"Y": cand}]).outputs[0]

    assert out.max_rel == pytest.approx(0.5, rel=1e-12)


def test_samples_split_over_feeds_are_compared_as_one_set() -> None:
    cand = REF + np.array([[0.5, 0, 0], [0, 0, -0.25]], dtype=np.float32)

    whole = compare_outputs([{"Y": REF}], [{"Y": cand}])
    split = compare_outputs([{"Y": REF[:1]}, {"Y": REF[1:]}], [{"Y": cand[:1]}, {"Y": cand[1:]}])

    assert split.samples == 2
    assert split.to_dict()["outputs"] == whole.to_dict()["outputs"]


def test_sign_flipped_sample_has_cosine_minus_one() -> None:
    # three samples; the second one comes out negated: cosines 1, -1, 1.
    ref = np.array([[1.0, 2.0], [3.0, 4.0], [5.0, 6.0]], dtype=np.float32)
    cand = ref * np.array([[1.0], [-1.0], [1.0]], dtype=np.float32)

    report = compare_outputs([{"Y": ref}], [{"Y": cand}])

    out = report.outputs[0]
    assert out.cosine_min == pytest.approx(-1.0, abs=1e-12)
    assert out.cosine_mean == pytest.approx((1 - 1 + 1) / 3, abs=1e-12)
    assert out.max_abs == 8.0  # |4 - (-4)|
    assert out.top1 == pytest.approx(2 / 3)  # argmax of (-3,-4) is 0, of (3,4) is 1
    assert report.cosine_min == out.cosine_min


def test_nan_appearing_in_the_candidate_is_counted() -> None:
    # ref has NaN at [1,0] (the candidate too: not new); the candidate adds NaN at [0,1] and Inf at [0,2].
    ref = REF.copy()
    ref[1, 0] = np.nan
    cand = ref.copy()
    cand[0, 1] = np.nan
    cand[0, 2] = np.inf

    report = compare_outputs([{"Y": ref}], [{"Y": cand}])

    assert report.outputs[0].new_nonfinite == 2
    assert report.new_nonfinite == 2
    assert report.max_abs == float("inf")
    assert report.outputs[0].mean_abs == 0.0  # the finite positions agree


def test_nonfinite_in_the_reference_only_is_not_new() -> None:
    ref = REF.copy()
    ref[0, 0] = np.nan
    cand = REF.copy()

    out = compare_outputs([{"Y": ref}], [{"Y": cand}]).outputs[0]

    assert out.new_nonfinite == 0
    assert out.max_abs == 0.0


def test_shape_mismatch_is_reported_per_output() -> None:
    report = compare_outputs([{"Y": REF}], [{"Y": np.zeros((2, 4), np.float32)}])

    out = report.outputs[0]
    assert out.shape_mismatch == "shape [2, 4] != [2, 3]"
    assert report.shape_mismatches == ["Y: shape [2, 4] != [2, 3]"]
    assert out.max_abs == float("inf") and out.cosine_mean == -1.0


def test_zero_vectors_on_both_sides_count_as_cosine_one() -> None:
    # sample 0: both zero → 1; sample 1: orthogonal → 0; sample 2: zero vs non-zero → 0.
    ref = np.array([[0.0, 0.0], [1.0, 0.0], [0.0, 0.0]], dtype=np.float32)
    cand = np.array([[0.0, 0.0], [0.0, 1.0], [2.0, 0.0]], dtype=np.float32)

    out = compare_outputs([{"Y": ref}], [{"Y": cand}]).outputs[0]

    assert out.cosine_min == 0.0
    assert out.cosine_mean == pytest.approx(1 / 3, abs=1e-12)


@pytest.mark.parametrize(
    "output",
    [
        pytest.param(np.array([[0.1], [0.9]], dtype=np.float32), id="last-dim-1"),
        pytest.param(np.array([[1, 2, 3], [3, 2, 1]], dtype=np.int64), id="integer"),
        pytest.param(np.array(3.0, dtype=np.float32), id="scalar"),
    ],
)
def test_top1_is_none_where_argmax_means_nothing(output: np.ndarray) -> None:
    report = compare_outputs([{"Y": output}], [{"Y": output.copy()}])

    assert report.outputs[0].top1 is None
    assert report.top1 is None


def test_report_takes_the_worst_output() -> None:
    # two outputs: "scores" is perturbed, "probs" (a class axis) is exact but flips nothing.
    probs = np.array([[0.1, 0.9], [0.8, 0.2]], dtype=np.float32)
    reference = [{"scores": REF, "probs": probs}]
    candidate = [{"scores": REF + 1, "probs": probs}]

    report = compare_outputs(reference, candidate)

    assert [o.name for o in report.outputs] == ["scores", "probs"]
    assert report.max_abs == 1.0
    assert report.cosine_mean == report.outputs[0].cosine_mean < 1.0
    assert report.top1 == 1.0
    data = report.to_dict()
    assert data["max_abs"] == 1.0 and data["samples"] == 2 and len(data["outputs"]) == 2


def test_different_output_names_are_refused() -> None:
    with pytest.raises(DataError, match=r"different outputs: \['Y'\] vs \['Z'\]"):
        compare_outputs([{"Y": REF}], [{"Z": REF}])


def test_no_feeds_are_refused() -> None:
    with pytest.raises(DataError, match="no feeds"):
        compare_outputs([], [])


def test_empty_outputs_compare_as_equal() -> None:
    boxes = np.zeros((0, 4), dtype=np.float32)  # a detector that found nothing, on both sides

    out = compare_outputs([{"boxes": boxes}], [{"boxes": boxes.copy()}]).outputs[0]

    assert out.max_abs == 0.0 and out.shape_mismatch is None


# -- in onnxruntime -------------------------------------------------------------------------


def test_run_outputs_turns_runtime_errors_into_data_errors(save: Callable[[onnx.ModelProto, str], Path]) -> None:
    # X float[N,4] → MatMul → Add → Y, fed a float32[1,5] that slipped past the checks.
    session = make_session(save(linear_model(), "linear.onnx"), optimize=False, threads=1)

    with pytest.raises(DataError, match="onnxruntime could not run the model on the given data"):
        run_outputs(session, [{"X": np.zeros((1, 5), np.float32)}])


def test_compare_files_measures_the_perturbation_on_the_same_feeds(
    tmp_path: Path, save: Callable[[onnx.ModelProto, str], Path]
) -> None:
    # base: X → MatMul W → Add b → Y; candidate: the same with 1.5 W.
    # Y_cand - Y_base = 0.5 · X W, computed here in numpy on the same data.
    base, cand = save(linear_model(), "base.onnx"), save(linear_model(1.5), "cand.onnx")
    x = np.linspace(-2, 2, 24, dtype=np.float32).reshape(6, 4)
    np.savez(tmp_path / "data.npz", X=x)
    feeds: FeedSet = load_feeds(tmp_path / "data.npz", specs_of(linear_model()), batch_size=4)

    comparison = compare_files(base, cand, feeds, thresholds=Thresholds(), base_bytes=100, candidate_bytes=50,
                               measure_latency=False, threads=1)

    x64 = x.astype(np.float64)
    y_base = x64 @ LINEAR_W + LINEAR_B
    y_cand = x64 @ (1.5 * LINEAR_W) + LINEAR_B
    assert comparison.parity.samples == 6
    assert comparison.parity.max_abs == pytest.approx(np.abs(y_cand - y_base).max(), rel=1e-5)
    assert comparison.parity.outputs[0].mean_abs == pytest.approx(np.abs(y_cand - y_base).mean(), rel=1e-5)
    assert comparison.size_ratio == 0.5
    assert comparison.latency is None
    assert [c.name for c in comparison.checks] == ["output_shapes", "no_new_nonfinite"]
    assert comparison.passed
