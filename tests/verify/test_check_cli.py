"""`graphopt check` and `graphopt bench` end to end: exit codes, one-line errors, reports."""

from __future__ import annotations

import json
import subprocess
import sys
import xml.etree.ElementTree as ET
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest

from graphopt.cli import main

from .models import LINEAR_B, LINEAR_W, classifier_model, linear_model, two_input_model

Save = Callable[[onnx.ModelProto, str], Path]


def _strict_json(path: Path) -> Any:
    def refuse(constant: str) -> None:
        raise ValueError(f"not JSON: {constant}")

    return json.loads(path.read_text(), parse_constant=refuse)


def _cosine_mean(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.mean(np.sum(a * b, axis=1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))))


@pytest.fixture
def data(tmp_path: Path) -> Path:
    """Eight samples for X float[N,4], spread over both signs."""
    path = tmp_path / "data.npz"
    np.savez(path, X=np.linspace(-3, 2, 32, dtype=np.float32).reshape(8, 4))
    return path


@pytest.fixture
def base(save: Save) -> Path:
    # X float[N,4] → MatMul W → Add b → Y float[N,3]
    return save(linear_model(), "base.onnx")


@pytest.fixture
def perturbed(save: Save) -> Path:
    # the same graph with 1.5 W
    return save(linear_model(1.5), "perturbed.onnx")


def test_model_against_itself_passes(base: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["check", str(base), str(base), "--min-cosine", "0.999", "--max-abs", "0", "--threads", "1"])

    out, err = capsys.readouterr()
    assert code == 0
    assert "PASS  min_cosine" in out and "PASS  max_abs" in out
    assert out.splitlines()[-1] == "check passed (4 checks, 8 samples, random inputs)"
    assert "Traceback" not in err


def test_check_without_thresholds_shows_the_numbers(base: Path, perturbed: Path, data: Path,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["check", str(base), str(perturbed), "--data", str(data), "--threads", "1"])

    out, _ = capsys.readouterr()
    assert code == 0
    (line,) = [line for line in out.splitlines() if line.startswith("  Y")]
    assert line.startswith("  Y (class scores): top-1 agreement ") and "; max abs " in line
    assert out.splitlines()[-1] == "check passed (2 checks, 8 samples)"


def test_perturbed_candidate_fails_with_one_line_and_writes_every_report(
    tmp_path: Path, base: Path, perturbed: Path, data: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    reports = {"json": tmp_path / "r.json", "junit": tmp_path / "r.xml", "markdown": tmp_path / "r.md"}

    code = main(["check", str(base), str(perturbed), "--data", str(data), "--batch-size", "3",
                 "--min-cosine", "0.9999", "--max-abs", "100", "-q", "--threads", "1",
                 "--json", str(reports["json"]), "--junit", str(reports["junit"]),
                 "--markdown", str(reports["markdown"])])

    out, err = capsys.readouterr()
    assert code == 1
    assert out == ""  # -q
    # the measured cosine, worked out in numpy on the same data
    x = np.load(data)["X"].astype(np.float64)
    expected = _cosine_mean(x @ LINEAR_W + LINEAR_B, x @ (1.5 * LINEAR_W) + LINEAR_B)
    report = _strict_json(reports["json"])
    assert report["passed"] is False
    assert report["data"] == {"source": str(data), "synthetic": False, "feeds": 3, "samples": 8,
                              "evidence": "data"}
    assert report["parity"]["cosine_mean"] == pytest.approx(expected, rel=1e-6)
    assert expected < 0.9999
    measured = f"{report['parity']['cosine_mean']:.6g}"
    assert err == f"graphopt: check failed: min_cosine: cosine (mean per sample) {measured} (required >= 0.9999)\n"

    junit = ET.parse(reports["junit"]).getroot()
    assert [c.get("name") for c in junit.iter("testcase")] == ["output_shapes", "no_new_nonfinite",
                                                               "min_cosine", "max_abs"]
    (failure,) = junit.iter("failure")
    assert f"measured={measured} threshold=0.9999" in failure.text
    assert f"| min_cosine | {measured} | 0.9999 | **FAIL** |" in reports["markdown"].read_text()
    assert "| max_abs |" in reports["markdown"].read_text()


def test_failure_without_quiet_still_ends_with_one_error_line(
    base: Path, perturbed: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code = main(["check", str(base), str(perturbed), "--min-cosine", "0.9999", "--threads", "1"])

    out, err = capsys.readouterr()
    assert code == 1
    assert "FAIL  min_cosine" in out
    assert [line for line in err.splitlines() if "check failed" in line] == [err.splitlines()[-1]]
    assert err.splitlines()[-1].startswith("graphopt: check failed: min_cosine: cosine (mean per sample) 0.9")
    assert "Traceback" not in err


@pytest.fixture
def one_hot_data(tmp_path: Path) -> Path:
    """Four samples, the k-th largest in column k: through W = I their argmax is 0, 1, 2, 3."""
    path = tmp_path / "one_hot.npz"
    np.savez(path, X=(np.eye(4) * 2 + 0.5).astype(np.float32))
    return path


@pytest.mark.parametrize(("min_top1", "exit_code"), [("0.75", 1), ("0.5", 0)])
def test_min_top1_on_a_classifier_whose_candidate_swaps_two_classes(
    tmp_path: Path, save: Save, one_hot_data: Path, capsys: pytest.CaptureFixture[str], min_top1: str, exit_code: int
) -> None:
    # base: X float[N,4] → MatMul I → logits[N,4]; candidate: columns 0 and 1 of I swapped,
    # so samples 0 and 1 change class: top-1 agreement is exactly 2/4.
    base = save(classifier_model(np.eye(4)), "clf.onnx")
    swapped = save(classifier_model(np.eye(4)[:, [1, 0, 2, 3]]), "clf_swapped.onnx")
    report = tmp_path / "r.json"

    code = main(["check", str(base), str(swapped), "--data", str(one_hot_data), "--batch-size", "4",
                 "--min-top1", min_top1, "-q", "--threads", "1", "--json", str(report)])

    _, err = capsys.readouterr()
    assert code == exit_code
    assert _strict_json(report)["parity"]["top1"] == 0.5
    if exit_code:
        assert err == f"graphopt: check failed: min_top1: top-1 agreement 0.5 (required >= {min_top1})\n"
    else:
        assert err == ""


def test_latency_is_reported_when_asked(
    tmp_path: Path, base: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    report, markdown = tmp_path / "r.json", tmp_path / "r.md"

    code = main(["check", str(base), str(base), "--latency", "-q", "--threads", "1",
                 "--max-size-ratio", "1", "--json", str(report), "--markdown", str(markdown)])

    assert code == 0
    latency = _strict_json(report)["latency"]
    assert latency["a"]["runs"] == latency["b"]["runs"] >= 5
    assert latency["ratio"] > 0 and latency["threads"] == 1
    assert latency["a"]["median_ms"] <= latency["a"]["p90_ms"]
    assert "Latency (median, interleaved, 1 thread)" in markdown.read_text()
    assert _strict_json(report)["size_ratio"] == 1.0


# -- bad input: exit 2, one line, nothing written -------------------------------------------


def _report_args(folder: Path) -> list[str]:
    return ["--json", str(folder / "r.json"), "--junit", str(folder / "r.xml"), "--markdown", str(folder / "r.md")]


def _assert_bad_input(code: int, err: str, out_folder: Path) -> str:
    assert code == 2
    assert err.count("\n") == 1 and err.startswith("graphopt: ")
    assert "Traceback" not in err
    assert list(out_folder.iterdir()) == []  # no report, no temporary file
    return err


@pytest.fixture
def out_folder(tmp_path: Path) -> Path:
    folder = tmp_path / "reports"
    folder.mkdir()
    return folder


def test_missing_model_file(tmp_path: Path, base: Path, out_folder: Path, capsys: pytest.CaptureFixture[str]) -> None:
    missing = tmp_path / "nowhere.onnx"

    code = main(["check", str(base), str(missing), "-q", *_report_args(out_folder)])

    err = _assert_bad_input(code, capsys.readouterr().err, out_folder)
    assert err == f"graphopt: {missing}: no such file\n"


def test_data_with_wrong_input_names(
    tmp_path: Path, base: Path, out_folder: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    np.savez(tmp_path / "wrong.npz", input=np.zeros((2, 4), np.float32))

    code = main(["check", str(base), str(base), "--data", str(tmp_path / "wrong.npz"), "-q",
                 *_report_args(out_folder)])

    err = _assert_bad_input(code, capsys.readouterr().err, out_folder)
    assert "missing X and unknown input" in err and "the model expects X: float32[N,4]" in err


def test_shape_for_an_unknown_input(base: Path, out_folder: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["check", str(base), str(base), "--shape", "Z=1,4", "-q", *_report_args(out_folder)])

    err = _assert_bad_input(code, capsys.readouterr().err, out_folder)
    assert err == "graphopt: --shape names unknown input Z; the model expects X: float32[N,4]\n"


def test_models_with_different_input_signatures(
    base: Path, save: Save, out_folder: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # base: X float[N,4] → … → Y; candidate: X float[N,4], ids int64[N,4] → Add → Y
    other = save(two_input_model(), "two_inputs.onnx")

    code = main(["check", str(base), str(other), "-q", *_report_args(out_folder)])

    err = _assert_bad_input(code, capsys.readouterr().err, out_folder)
    assert "two_inputs.onnx takes inputs ['X: float32[N,4]', 'ids: int64[N,4]']" in err
    assert "base.onnx takes ['X: float32[N,4]']" in err


def test_models_with_different_outputs(
    base: Path, save: Save, out_folder: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # same input, but the candidate's output is called Z
    renamed = save(linear_model(output_name="Z"), "renamed.onnx")

    code = main(["check", str(base), str(renamed), "-q", "--threads", "1", *_report_args(out_folder)])

    err = _assert_bad_input(code, capsys.readouterr().err, out_folder)
    assert err == "graphopt: the models have different outputs: ['Y'] vs ['Z']\n"


@pytest.mark.parametrize(
    ("args", "expected_code", "expected_err"),
    [
        pytest.param(["--min-cosine", "0.9999"], 1, "graphopt: check failed: min_cosine:", id="gate-failed"),
        pytest.param(["--data", "missing.npz"], 2, "graphopt: missing.npz: no such file or folder", id="bad-data"),
    ],
)
def test_python_m_graphopt_fails_without_a_traceback(
    base: Path, perturbed: Path, args: list[str], expected_code: int, expected_err: str
) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "graphopt", "check", str(base), str(perturbed), "-q", "--threads", "1", *args],
        capture_output=True, text=True, timeout=60, cwd=base.parent,
    )

    assert result.returncode == expected_code
    assert result.stderr.count("\n") == 1 and result.stderr.startswith(expected_err)
    assert "Traceback" not in result.stderr
    assert result.stdout == ""


# -- bench ----------------------------------------------------------------------------------


def test_bench_prints_a_median_and_writes_json(
    tmp_path: Path, base: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    report = tmp_path / "bench.json"

    code = main(["bench", str(base), "--runs", "7", "--warmup", "1", "--threads", "1", "--json", str(report)])

    out, _ = capsys.readouterr()
    assert code == 0
    assert out.startswith("base.onnx: median ") and " ms over 7 runs (1 thread," in out
    result = _strict_json(report)
    assert result["runs"] == 7 and result["threads"] == 1
    assert 0 < result["median_ms"] <= result["p90_ms"]
    assert result["data"]["synthetic"] is True


def test_bench_on_stacked_data(tmp_path: Path, base: Path, data: Path, capsys: pytest.CaptureFixture[str]) -> None:
    report = tmp_path / "bench.json"

    code = main(["bench", str(base), "--data", str(data), "--batch-size", "4", "--runs", "5", "--warmup", "0",
                 "--threads", "1", "--json", str(report)])

    assert code == 0
    result = _strict_json(report)
    assert result["batch_size"] == 4
    assert (result["data"]["feeds"], result["data"]["samples"]) == (2, 8)
    assert str(data) in capsys.readouterr().out


def test_bench_reports_the_batch_it_ran(tmp_path: Path, base: Path) -> None:
    report = tmp_path / "bench.json"

    main(["bench", str(base), "--batch-size", "4", "--runs", "5", "--warmup", "0", "--threads", "1",
          "--json", str(report)])

    result = _strict_json(report)
    assert result["data"]["samples"] == result["data"]["feeds"] * result["batch_size"]


@pytest.mark.filterwarnings("ignore:Mean of empty slice", "ignore:invalid value encountered")
def test_bench_with_zero_runs_is_a_usage_error(base: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["bench", str(base), "--runs", "0", "--threads", "1"])

    assert code == 2
    assert capsys.readouterr().err.count("\n") == 1


def test_check_and_bench_refuse_an_execution_provider_this_onnxruntime_lacks(tmp_path: Path, capsys) -> None:
    base = tmp_path / "base.onnx"
    onnx.save(linear_model(), base)
    for command in (["check", str(base), str(base)], ["bench", str(base), "--runs", "3"]):
        assert main([*command, "--provider", "NoSuchExecutionProvider", "-q"]) == 2
        err = capsys.readouterr().err
        assert "execution provider 'NoSuchExecutionProvider' is not in this onnxruntime; available:" in err
        assert "CPUExecutionProvider" in err
    assert main(["bench", str(base), "--runs", "3", "--provider", "CPUExecutionProvider", "-q"]) == 0
