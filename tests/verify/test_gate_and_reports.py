"""graphopt.verify.gate (thresholds → checks), graphopt.report (JSON, JUnit, Markdown) and the
structure of graphopt.verify.latency's results. No timing is asserted anywhere."""

from __future__ import annotations

import json
import math
import os
import xml.etree.ElementTree as ET
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest

from graphopt.io import to_json, write_text
from graphopt.report.checks import check_markdown, checks_text, junit_xml
from graphopt.verify.feeds import load_feeds
from graphopt.verify.gate import CheckResult, Thresholds, failures, gate_checks
from graphopt.verify.latency import (
    ABLatency,
    LatencyStats,
    compare_interleaved,
    measure,
)
from graphopt.verify.parity import OutputParity, ParityReport
from graphopt.verify.runtime import make_session

from .models import linear_model, specs_of


def _parity(*, max_abs: float = 0.25, cosine_mean: float = 0.995, top1: float | None = 0.75,
            new_nonfinite: int = 0, shape_mismatch: str | None = None) -> ParityReport:
    """A one-output report with chosen numbers, as if measured."""
    out = OutputParity("Y", max_abs=max_abs, mean_abs=max_abs / 2, max_rel=0.1, cosine_mean=cosine_mean,
                       cosine_min=cosine_mean - 0.01, top1=top1, new_nonfinite=new_nonfinite,
                       shape_mismatch=shape_mismatch)
    return ParityReport([out], samples=8)


def _one(results: list[CheckResult], name: str) -> CheckResult:
    (match,) = [r for r in results if r.name == name]
    return match


# -- gate -----------------------------------------------------------------------------------

# (threshold field, value equal to the measured one, a value just on the failing side)
# against cosine_mean 0.995, max_abs 0.25, top1 0.75, latency ratio 1.25, size ratio 0.5.
BOUNDARIES = [
    ("min_cosine", 0.995, 0.996),
    ("max_abs", 0.25, 0.2499),
    ("min_top1", 0.75, 0.76),
    ("max_latency_ratio", 1.25, 1.2),
    ("max_size_ratio", 0.5, 0.49),
]


@pytest.mark.parametrize(("name", "equal", "failing"), BOUNDARIES, ids=[b[0] for b in BOUNDARIES])
def test_each_threshold_passes_at_its_boundary_and_fails_beyond(name: str, equal: float, failing: float) -> None:
    measured = {"latency_ratio": 1.25, "size_ratio": 0.5}

    at_boundary = _one(gate_checks(Thresholds(**{name: equal}), _parity(), **measured), name)
    beyond = _one(gate_checks(Thresholds(**{name: failing}), _parity(), **measured), name)

    assert at_boundary.passed and at_boundary.threshold == equal and at_boundary.measured == equal
    assert not beyond.passed and beyond.measured == equal
    assert f"required {'>=' if name.startswith('min') else '<='} {failing:.6g}" in beyond.message


def test_only_stated_thresholds_are_checked_besides_the_two_that_always_apply() -> None:
    results = gate_checks(Thresholds(max_abs=1.0), _parity())

    assert [r.name for r in results] == ["output_shapes", "no_new_nonfinite", "max_abs"]
    assert all(r.passed for r in results)
    assert failures(results) == []


def test_unmeasured_latency_fails_a_latency_threshold() -> None:
    (check,) = failures(gate_checks(Thresholds(max_latency_ratio=10.0), _parity(), latency_ratio=None))

    assert check.name == "max_latency_ratio"
    assert check.measured is None
    assert check.message == "latency ratio could not be measured"


def test_top1_threshold_fails_where_top1_means_nothing() -> None:
    (check,) = failures(gate_checks(Thresholds(min_top1=0.0), _parity(top1=None)))

    assert check.name == "min_top1"
    assert check.message == "top-1 agreement could not be measured (no output holds class scores or integers: Y other)"


def test_new_nonfinite_values_fail_even_without_thresholds() -> None:
    (check,) = failures(gate_checks(Thresholds(), _parity(new_nonfinite=3)))

    assert check.name == "no_new_nonfinite"
    assert (check.threshold, check.measured) == (0, 3)
    assert check.message == "3 NaN/Inf values appear in the candidate"


def test_shape_mismatch_fails_even_without_thresholds() -> None:
    (check,) = failures(gate_checks(Thresholds(), _parity(shape_mismatch="shape [1, 4] != [1, 3]")))

    assert check.name == "output_shapes"
    assert check.message == "Y: shape [1, 4] != [1, 3]"


def test_thresholds_know_what_they_state() -> None:
    thresholds = Thresholds(min_cosine=0.99, max_latency_ratio=1.1)

    assert thresholds.stated() == {"min_cosine": 0.99, "max_latency_ratio": 1.1}
    assert thresholds.needs_latency()
    assert not Thresholds(min_cosine=0.99).needs_latency()


# -- reports --------------------------------------------------------------------------------

CHECKS = [
    CheckResult("output_shapes", None, None, True, "all outputs have the reference's shapes"),
    CheckResult("no_new_nonfinite", 0, 0, True, "0 NaN/Inf values appear in the candidate"),
    CheckResult("max_abs", 0.2, 0.3125, False, "max abs difference 0.3125 (required <= 0.2) & <more>"),
    CheckResult("min_cosine", 0.999, 0.987654, False, "cosine (mean per sample) 0.987654 (required >= 0.999)"),
]


def test_junit_xml_has_one_testcase_per_check_and_failures_with_measured_values() -> None:
    root = ET.fromstring(junit_xml(CHECKS, suite="graphopt.check", seconds=1.5))

    assert root.tag == "testsuites" and root.get("tests") == "4" and root.get("failures") == "2"
    (suite,) = root.findall("testsuite")
    assert suite.get("name") == "graphopt.check" and suite.get("time") == "1.500"
    cases = suite.findall("testcase")
    assert [c.get("name") for c in cases] == [c.name for c in CHECKS]
    failed = {c.get("name"): c.find("failure") for c in cases}
    assert failed["output_shapes"] is None and failed["no_new_nonfinite"] is None
    assert "measured=0.3125 threshold=0.2" in failed["max_abs"].text
    assert failed["max_abs"].get("message") == CHECKS[2].message  # '&' and '<' survive escaping
    assert "measured=0.987654 threshold=0.999" in failed["min_cosine"].text


def test_junit_xml_for_all_passing_checks_has_no_failure() -> None:
    root = ET.fromstring(junit_xml(CHECKS[:2], suite="s"))

    assert root.get("failures") == "0"
    assert root.findall(".//failure") == []


def _comparison(checks: list[CheckResult], *, latency: dict[str, Any] | None = None) -> dict[str, Any]:
    """The shape of Comparison.to_dict(), filled by hand."""
    return {
        "base": "/models/base.onnx",
        "candidate": "/models/cand.onnx",
        "passed": all(c.passed for c in checks),
        "data": {"source": "random (seed 0; X=[1, 4])", "synthetic": True, "feeds": 8, "samples": 8},
        "base_bytes": 2000,
        "candidate_bytes": 1000,
        "size_ratio": 0.5,
        "parity": _parity().to_dict(),
        "latency": latency,
        "checks": [c.to_dict() for c in checks],
        "peak_rss_mib": None,
    }


def test_check_markdown_has_a_row_per_check_and_the_verdict() -> None:
    text = check_markdown(_comparison(CHECKS))

    lines = text.splitlines()
    assert lines[0] == "### graphopt check: ❌ failed"
    assert "`cand.onnx` against `base.onnx` on 8 samples" in text
    assert "random inputs, weaker evidence" in text
    for check in CHECKS:
        (row,) = [line for line in lines if line.startswith(f"| {check.name} |")]
        assert row.endswith("| **FAIL** |" if not check.passed else "| pass |")
    assert "| max_abs | 0.3125 | 0.2 | **FAIL** |" in lines
    assert "| output_shapes | — | — | pass |" in lines
    (output_row,) = [line for line in lines if line.startswith("| Y |")]
    assert output_row == "| Y | — | top-1 agreement | 0.75 | 0.25 | 0.995 | 0.75 |"
    assert "Size: 1,000 / 2,000 bytes (ratio 0.500)." in lines
    assert not any(line.startswith("Latency") for line in lines)


def test_check_markdown_passed_with_latency() -> None:
    latency = ABLatency(LatencyStats(2.0, 2.5, 2.1, 10), LatencyStats(1.0, 1.5, 1.1, 10), threads=4).to_dict()

    text = check_markdown(_comparison(CHECKS[:2], latency=latency))

    assert text.startswith("### graphopt check: ✅ passed")
    assert "Latency (median, interleaved, 4 threads): 1.00 ms vs 2.00 ms (ratio 0.500)." in text


def _strict_json(text: str) -> Any:
    def refuse(constant: str) -> None:
        raise ValueError(f"not JSON: {constant}")

    return json.loads(text, parse_constant=refuse)


def test_to_json_turns_non_finite_numbers_into_strings() -> None:
    data = {"inf": float("inf"), "list": [float("nan"), -math.inf, 1.5], "np": np.float32("inf"),
            "count": np.int64(3), "nested": {1: (np.float64(0.25),)}}

    loaded = _strict_json(to_json(data))

    assert loaded == {"inf": "inf", "list": ["nan", "-inf", 1.5], "np": "inf", "count": 3,
                      "nested": {"1": [0.25]}}


def test_to_json_of_a_failing_parity_report_is_valid_json() -> None:
    loaded = _strict_json(to_json(_parity(max_abs=float("inf"), new_nonfinite=2).to_dict()))

    assert loaded["max_abs"] == "inf" and loaded["new_nonfinite"] == 2


def test_checks_text_lists_pass_and_fail() -> None:
    lines = checks_text([c.to_dict() for c in CHECKS]).splitlines()

    assert lines[0] == "  PASS  output_shapes     all outputs have the reference's shapes"
    assert lines[2].startswith("  FAIL  max_abs           max abs difference 0.3125")


def test_write_text_replaces_the_file_and_leaves_no_temporary(tmp_path: Path) -> None:
    target = tmp_path / "report.json"
    target.write_text("old")

    write_text(target, "new\n")

    assert target.read_text() == "new\n"
    assert os.listdir(tmp_path) == ["report.json"]
    umask = os.umask(0)
    os.umask(umask)
    assert target.stat().st_mode & 0o777 == 0o666 & ~umask


# -- latency: structure only ----------------------------------------------------------------


def test_latency_stats_from_seconds() -> None:
    stats = LatencyStats.from_seconds([0.001, 0.002, 0.003, 0.010])

    assert stats.runs == 4
    assert stats.median_ms == pytest.approx(2.5)
    assert stats.mean_ms == pytest.approx(4.0)
    assert stats.p90_ms == pytest.approx(3 + 0.7 * 7)  # linear interpolation between 3 and 10


def test_ab_ratio_with_a_zero_median_base_is_infinite() -> None:
    ab = ABLatency(LatencyStats(0.0, 0.0, 0.0, 5), LatencyStats(1.0, 1.0, 1.0, 5), threads=1)

    assert ab.ratio == float("inf")


@pytest.fixture
def linear_session(save: Callable[[onnx.ModelProto, str], Path]) -> Any:
    # X float[N,4] → MatMul W → Add b → Y
    return make_session(save(linear_model(), "linear.onnx"), optimize=True, threads=1)


def test_measure_returns_ordered_statistics(linear_session: Any) -> None:
    feeds = load_feeds(None, specs_of(linear_model()), random_samples=3).feeds

    stats = measure(linear_session, feeds, warmup=1, runs=7)

    assert stats.runs == 7
    assert 0 < stats.median_ms <= stats.p90_ms
    assert math.isfinite(stats.mean_ms) and stats.mean_ms > 0


def test_interleaved_comparison_times_both_sessions_alike(
    linear_session: Any, save: Callable[[onnx.ModelProto, str], Path]
) -> None:
    other = make_session(save(linear_model(1.5), "other.onnx"), optimize=True, threads=1)
    feeds = load_feeds(None, specs_of(linear_model()), random_samples=2).feeds

    ab = compare_interleaved(linear_session, other, feeds, threads=1, warmup=1, rounds=6)

    assert ab.a.runs == ab.b.runs == 6
    assert ab.a.median_ms <= ab.a.p90_ms and ab.b.median_ms <= ab.b.p90_ms
    assert math.isfinite(ab.ratio) and ab.ratio > 0
    assert len(ab.pair_ratios) == 2  # 6 runs per side in blocks of 3
    assert ab.ratio == pytest.approx(float(np.median(ab.pair_ratios)))
    assert ab.to_dict()["mode"] == "interleaved blocks, median of paired ratios" and ab.to_dict()["threads"] == 1


def test_the_latency_ratio_pairs_adjacent_blocks() -> None:
    """A machine twice as slow during the second pair slows both of its blocks: the paired ratio
    stays 1.25, where the ratio of overall medians would not."""
    a = LatencyStats(1.0, 1.0, 1.0, 6)
    ab = ABLatency(a, a, 1, pair_ratios=[1.25, 1.25, 1.2, 1.3])
    assert ab.ratio == pytest.approx(1.25)
    assert ABLatency(LatencyStats(2.0, 2.0, 2.0, 6), LatencyStats(3.0, 3.0, 3.0, 6), 1).ratio == 1.5


@pytest.mark.parametrize(("readings", "passes", "measured"), [
    ([[1.6] * 4, [1.0] * 5], True, 2),  # a noisy first reading is measured again, judged on both
    ([[1.6] * 4, [1.5] * 4], False, 2),  # a real regression reads over the bound again and fails
    ([[1.0] * 4], True, 1),  # within the bound: measured once
])
def test_a_latency_miss_is_measured_again_before_it_fails(tmp_path, monkeypatch, readings, passes, measured) -> None:
    from graphopt.verify import compare
    from graphopt.verify.feeds import FeedSet

    path = tmp_path / "m.onnx"
    onnx.save(linear_model(), path)
    calls = []

    def fake(a, b, feeds, *, threads, **_):
        calls.append(1)
        stats = LatencyStats(1.0, 1.0, 1.0, 6)
        return ABLatency(stats, stats, threads, pair_ratios=list(readings[len(calls) - 1]))

    monkeypatch.setattr(compare.latency_mod, "compare_interleaved", fake)
    feeds = FeedSet([{"X": np.ones((2, 4), np.float32)}], "test", False)
    result = compare.compare_files(path, path, feeds, thresholds=Thresholds(max_latency_ratio=1.3), base_bytes=1,
                                   candidate_bytes=1, threads=1)
    (check,) = [c for c in result.checks if c.name == "max_latency_ratio"]
    assert check.passed is passes and len(calls) == measured
