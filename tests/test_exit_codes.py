"""README's exit codes, one row per user mistake it lists.

Each row runs the command line in-process on a small workspace and checks what README
promises: the documented exit code, exactly one line on stderr naming the file or option at
fault, no traceback, nothing written and every input byte for byte as before.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.util
import re
import shlex
from pathlib import Path

import numpy as np
import pytest
from onnx import helper

from graphopt.cli import main
from graphopt.errors import EXIT_BAD_INPUT, EXIT_GATE_FAILED, EXIT_INTERNAL, EXIT_INTERRUPTED, EXIT_OK
from tests.conftest import linear_model, make_model, save, tensor
from tests.hostile.corpus import CASE_NAMES, build_corpus

README = Path(__file__).resolve().parents[1] / "README.md"


@dataclasses.dataclass(frozen=True)
class Mistake:
    """``command`` and ``names`` are templates over the workspace: {model}, {tmp}, {data},
    {labelled}, {corpus}. The one stderr line must contain every string of ``names``."""

    id: str
    command: str
    code: int
    names: tuple[str, ...]
    # (module, attribute, exception): the attribute raises it, for the codes no input can cause
    raises: tuple[str, str, type[BaseException]] | None = None
    needs: str | None = None  # an optional package the command needs


def _hostile(index: int, name: str) -> Mistake:
    """Every hostile corpus case, by a command that must run it; the one line names the file
    (or, for absurd-dims, as README says, the input and its declared shape) and the problem,
    in the corpus's own words."""
    case = f"{{corpus}}/{name}/model.onnx"
    names = ("input 'X' declares shape",) if name == "absurd-dims" else (case,)
    commands = [
        f"optimize {case} -o {{tmp}}/out.onnx",
        f"check {case} {case} --json {{tmp}}/r.json",
        f"bench {case} --runs 1 --json {{tmp}}/r.json",
        f"package {case} -o {{tmp}}/bundle.zip",
        f"evaluate {case} --data {{labelled}} --labels labels --folds 2 --candidate {case}",
    ]
    return Mistake(f"hostile-{name}", commands[index % len(commands)], EXIT_BAD_INPUT, names)


MISTAKES = [
    # usage (README: "bad input or usage")
    Mistake("unknown-option", "optimize {model} -o {tmp}/out.onnx --bogus", 2, ("--bogus", "see --help")),
    Mistake("missing-output", "optimize {model}", 2, ("-o/--output",)),
    Mistake("unknown-metric", "evaluate {model} --data {labelled} --labels labels --folds 2 --candidate {model} "
            "--metric recall", 2, ("--metric", "recall")),
    Mistake("runs-below-one", "bench {model} --runs 0", 2, ("--runs",)),
    Mistake("bad-shape", "bench {model} --shape X=a,b", 2, ("--shape", "X=a,b")),
    Mistake("output-equal-to-input", "optimize {model} -o {model}", 2, ("{model}", "output path equals the input")),
    Mistake("bundle-equal-to-input", "package {model} -o {model}", 2, ("{model}", "overwrite the input")),
    Mistake("output-folder-missing", "optimize {model} -o {tmp}/missing/out.onnx", 2,
            ("{tmp}/missing", "does not exist")),
    Mistake("report-is-a-folder", "check {model} {model} --json {tmp}", 2, ("{tmp}", "is a folder")),
    Mistake("model-missing", "inspect {tmp}/absent.onnx", 2, ("absent.onnx",)),
    # recipes
    Mistake("unknown-recipe", "optimize {model} -o {tmp}/out.onnx --recipe turbo", 2, ("unknown recipe 'turbo'",)),
    Mistake("recipe-unknown-pass", "optimize {model} -o {tmp}/out.onnx --recipe {tmp}/unknown-pass.toml", 2,
            ("unknown-pass.toml", "unknown pass 'frobnicate'")),
    Mistake("recipe-unknown-option", "optimize {model} -o {tmp}/out.onnx --recipe {tmp}/unknown-option.toml", 2,
            ("unknown-option.toml", "unknown key colour")),
    Mistake("recipe-needs-calibration", "optimize {model} -o {tmp}/out.onnx --recipe int8", 2, ("--calib",)),
    Mistake("recipes-unknown-name", "recipes turbo", 2, ("'turbo'",)),
    # data
    Mistake("data-missing", "check {model} {model} --data {tmp}/absent.npz", 2, ("absent.npz",)),
    Mistake("data-wrong-input-name", "optimize {model} -o {tmp}/out.onnx --data {tmp}/wrong-name.npz", 2,
            ("wrong-name.npz", "missing X")),
    Mistake("labels-key-absent", "check {model} {model} --data {labelled} --labels truth", 2,
            ("labelled.npz", "--labels")),
    Mistake("labels-not-declared", "optimize {model} -o {tmp}/out.onnx --data {labelled}", 2,
            ("labelled.npz", "--labels")),
    Mistake("candidate-takes-other-inputs", "check {model} {tmp}/other.onnx", 2, ("other.onnx", "takes inputs")),
    # check --cv (README: "--max-drop without --cv, or --cv without --max-drop or --data")
    Mistake("max-drop-without-cv", "check {model} {model} --data {labelled} --labels labels --max-drop 0.01", 2,
            ("--max-drop", "--cv")),
    Mistake("cv-without-max-drop", "check {model} {model} --data {labelled} --labels labels --cv 2", 2,
            ("--cv", "--max-drop")),
    Mistake("cv-without-data", "check {model} {model} --cv 2 --max-drop 0.01", 2, ("--cv", "--data")),
    # evaluate
    Mistake("holdout-not-a-fraction", "evaluate {model} --data {labelled} --labels labels --holdout 1.5 "
            "--candidate {model}", 2, ("--holdout",)),
    Mistake("metric-needs-labels", "evaluate {model} --data {labelled} --folds 2 --candidate {model}", 2,
            ("--labels",)),
    # package targets
    Mistake("unknown-target", "package {model} -o {tmp}/bundle.zip --target tpu-9000", 2,
            ("unknown target 'tpu-9000'",)),
    Mistake("target-unknown-key", "package {model} -o {tmp}/bundle.zip --target {tmp}/target.toml", 2,
            ("target.toml", "unknown key operator")),
    Mistake("model-outside-target", "package {tmp}/hardmax.onnx -o {tmp}/bundle.zip --target cpu-minimal", 2,
            ("Hardmax", "opset 9", "cpu-minimal")),
    # distill (README: "unknown keys are an error listing the valid ones")
    Mistake("distill-unknown-key", "distill {tmp}/distill.toml", 2, ("distill.toml", "unknown key misc"),
            needs="torch"),
    Mistake("distill-config-missing", "distill {tmp}/absent.toml", 2, ("absent.toml",), needs="torch"),
    # hostile models (README, Reliability)
    *(_hostile(index, name) for index, name in enumerate(CASE_NAMES)),
    # a gate or parity budget failed
    Mistake("check-threshold-missed", "check {model} {model} --max-size-ratio 0.5", 1, ("size ratio",)),
    Mistake("optimize-budget-missed", "optimize {model} -o {tmp}/out.onnx --no-latency --max-size-ratio 0.5", 1,
            ("size ratio",)),
    # what no input should cause: a bug, and Ctrl-C
    Mistake("internal-error", "inspect {model}", 3, ("internal error", "RuntimeError", "--debug"),
            raises=("graphopt.report.inspection", "describe", RuntimeError)),
    Mistake("interrupted", "optimize {model} -o {tmp}/out.onnx", 130, ("interrupted", "nothing was written"),
            raises=("graphopt.optimize", "optimize", KeyboardInterrupt)),
]

UNKNOWN_PASS_RECIPE = '[[steps]]\npass = "frobnicate"\n'
UNKNOWN_OPTION_RECIPE = '[[steps]]\npass = "simplify"\ncolour = 3\n'
DISTILL_CONFIG = """
[teacher]
factory = "factories:teacher"
[student]
factory = "factories:student"
[data]
factory = "factories:data"
[misc]
a = 1
"""


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("hostile") / "corpus"
    return root, {case.name: case for case in build_corpus(root)}


@pytest.fixture
def workspace(tmp_path, rng, corpus) -> dict[str, str]:
    """A valid model and data, and every broken file a row needs, in ``tmp_path``."""
    model = save(linear_model(rng), tmp_path / "model.onnx")
    np.savez(tmp_path / "data.npz", X=rng.standard_normal((6, 8)).astype(np.float32))
    np.savez(tmp_path / "labelled.npz", X=rng.standard_normal((12, 8)).astype(np.float32),
             labels=np.arange(12) % 4)
    np.savez(tmp_path / "wrong-name.npz", x=np.zeros((2, 8), np.float32))
    save(make_model([helper.make_node("Relu", ["A"], ["Y"])], [tensor("A", ["N", 8])], [tensor("Y", ["N", 8])]),
         tmp_path / "other.onnx")
    save(make_model([helper.make_node("Hardmax", ["X"], ["Y"])], [tensor("X", [1, 4])], [tensor("Y", [1, 4])],
                    opset=9), tmp_path / "hardmax.onnx")
    (tmp_path / "unknown-pass.toml").write_text(UNKNOWN_PASS_RECIPE)
    (tmp_path / "unknown-option.toml").write_text(UNKNOWN_OPTION_RECIPE)
    (tmp_path / "target.toml").write_text('operator = ["Conv"]\n')
    (tmp_path / "distill.toml").write_text(DISTILL_CONFIG)
    return {"model": str(model), "tmp": str(tmp_path), "data": str(tmp_path / "data.npz"),
            "labelled": str(tmp_path / "labelled.npz"), "corpus": str(corpus[0])}


def _snapshot(*roots: str) -> dict[str, str]:
    """Every file under ``roots`` with the sha256 of its bytes (links followed)."""
    return {str(path): hashlib.sha256(path.read_bytes()).hexdigest()
            for root in roots for path in sorted(Path(root).rglob("*")) if path.is_file()}


@pytest.mark.parametrize("mistake", MISTAKES, ids=[m.id for m in MISTAKES])
def test_a_mistake_exits_with_its_code_one_line_and_nothing_written(mistake, workspace, corpus, monkeypatch,
                                                                     capsys):
    if mistake.needs and importlib.util.find_spec(mistake.needs) is None:
        pytest.skip(f"needs {mistake.needs}")
    if mistake.raises:
        module, attribute, exception = mistake.raises

        def fail(*args, **kwargs):
            raise exception("raised by the test")

        monkeypatch.setattr(importlib.import_module(module), attribute, fail)
    before = _snapshot(workspace["tmp"], workspace["corpus"])

    code = main([*shlex.split(mistake.command.format(**workspace)), "-q"])

    captured = capsys.readouterr()
    lines = captured.err.splitlines()
    assert (code, len(lines)) == (mistake.code, 1), captured.err
    assert lines[0].startswith("graphopt: ") and "Traceback" not in captured.err
    for name in mistake.names:
        assert name.format(**workspace) in lines[0]
    if mistake.id.startswith("hostile-"):
        case = corpus[1][mistake.id.removeprefix("hostile-")]
        assert any(word in lines[0].lower() for word in case.expect), lines[0]
    assert _snapshot(workspace["tmp"], workspace["corpus"]) == before


def test_without_a_mistake_the_workspace_runs(workspace, capsys):
    """The control: the rows fail for their mistake, not for something broken in the workspace."""
    model, tmp = workspace["model"], workspace["tmp"]
    assert main(["check", model, model, "--data", workspace["data"], "--max-size-ratio", "1.0", "-q"]) == EXIT_OK
    assert main(["optimize", model, "-o", f"{tmp}/out.onnx", "--no-latency", "-q"]) == EXIT_OK
    assert capsys.readouterr().err == ""
    assert Path(tmp, "out.onnx").is_file()


def _documented_exit_codes() -> set[int]:
    text = README.read_text(encoding="utf-8")
    section = text[text.index("### Exit codes"):]
    table = section[: section.index("\n\n", section.index("|"))]
    return {int(match) for match in re.findall(r"^\|\s*(\d+)\s*\|", table, flags=re.MULTILINE)}


def test_every_documented_exit_code_has_a_row_and_every_row_a_documented_code():
    documented = _documented_exit_codes()
    assert documented == {EXIT_OK, EXIT_GATE_FAILED, EXIT_BAD_INPUT, EXIT_INTERNAL, EXIT_INTERRUPTED}
    # 0 is the control above; every other code is some row's
    assert {EXIT_OK} | {mistake.code for mistake in MISTAKES} == documented
