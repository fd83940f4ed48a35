"""The CLI: results, reports, and every error path as one stderr line with its exit code."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from graphopt.cli import main
from tests.conftest import linear_model, one_line_error, save
from tests.hostile.corpus import build_corpus

COMMANDS = {
    "inspect": lambda model, out: ["inspect", str(model)],
    "optimize": lambda model, out: ["optimize", str(model), "-o", str(out / "out.onnx"), "--no-latency"],
    "check": lambda model, out: ["check", str(model), str(model), "--json", str(out / "r.json")],
    "bench": lambda model, out: ["bench", str(model), "--runs", "5", "--json", str(out / "r.json")],
}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return build_corpus(tmp_path_factory.mktemp("hostile") / "corpus")


@pytest.fixture
def model_path(tmp_path, rng):
    return save(linear_model(rng), tmp_path / "model.onnx")


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_hostile_models_exit_2_with_one_line_and_no_output(command, corpus, tmp_path, capsys):
    for case in corpus:
        if command == "inspect" and case.loads:
            continue  # inspect only describes a model; it is legal, only running it fails
        out = tmp_path / case.name
        out.mkdir()
        assert main([*COMMANDS[command](case.model, out), "-q"]) == 2, case.name
        line = one_line_error(capsys).lower()
        assert any(word in line for word in case.expect), (case.name, line)
        assert list(out.iterdir()) == [], case.name


def test_subprocess_error_has_no_traceback(corpus, tmp_path):
    case = next(c for c in corpus if c.name == "external-dotdot")
    proc = subprocess.run([sys.executable, "-m", "graphopt", "optimize", str(case.model), "-o",
                           str(tmp_path / "o.onnx")], capture_output=True, text=True)
    assert proc.returncode == 2
    assert proc.stderr.count("\n") == 1 and "Traceback" not in proc.stderr
    assert "'../secret.bin' uses '..'" in proc.stderr
    assert not (tmp_path / "o.onnx").exists()


def test_inspect_json(model_path, capsys):
    assert main(["inspect", str(model_path), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["inputs"] == [{"name": "X", "dtype": "float", "shape": ["N", 8]}]
    assert info["ops"] == {"Add": 1, "MatMul": 1, "Relu": 1}
    assert info["parameters"] == 8 * 4 + 4
    assert info["opsets"] == {"ai.onnx": 17}
    assert info["largest_tensors"][0]["name"] == "W"


def test_optimize_writes_model_and_report(model_path, tmp_path, capsys):
    out, report = tmp_path / "out.onnx", tmp_path / "report.json"
    assert main(["optimize", str(model_path), "-o", str(out), "--report", str(report), "--no-latency"]) == 0
    data = json.loads(report.read_text())
    assert data["written"] and out.exists()
    assert [s["name"] for s in data["steps"]] == ["simplify", "lift-constants", "cleanup", "prune-dead-channels"]
    assert data["verification"]["data"]["synthetic"] is True
    assert data["verification"]["parity"]["max_abs"] <= 1e-4
    assert data["output_bytes"] <= data["input_bytes"]
    assert "wrote" in capsys.readouterr().out


def test_missed_budget_exits_1_writes_no_model_but_the_report(model_path, tmp_path, capsys):
    out, report = tmp_path / "out.onnx", tmp_path / "report.json"
    code = main(["optimize", str(model_path), "-o", str(out), "--report", str(report), "--no-latency",
                 "--max-size-ratio", "0.5", "-q"])
    assert code == 1
    assert "size ratio" in one_line_error(capsys)
    assert not out.exists()
    assert json.loads(report.read_text())["written"] is False
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.onnx", "report.json"]


def test_output_equal_to_input_exits_2_and_keeps_input(model_path, capsys):
    before = model_path.read_bytes()
    assert main(["optimize", str(model_path), "-o", str(model_path)]) == 2
    assert "output path equals the input" in one_line_error(capsys)
    assert model_path.read_bytes() == before


def test_usage_error_is_one_line(capsys):
    assert main(["optimize", "--bogus"]) == 2
    assert "see --help" in one_line_error(capsys)


def test_interrupt_exits_130_and_writes_nothing(model_path, tmp_path, monkeypatch, capsys):
    import graphopt.optimize

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(graphopt.optimize, "optimize", interrupted)
    assert main(["optimize", str(model_path), "-o", str(tmp_path / "o.onnx")]) == 130
    assert "interrupted" in one_line_error(capsys)
    assert not (tmp_path / "o.onnx").exists()


def test_unknown_recipe_exits_2(model_path, tmp_path, capsys):
    assert main(["optimize", str(model_path), "-o", str(tmp_path / "o.onnx"), "--recipe", "turbo"]) == 2
    assert "unknown recipe 'turbo'" in one_line_error(capsys)


def test_data_with_wrong_input_name_exits_2(model_path, tmp_path, capsys):
    data = tmp_path / "d.npz"
    np.savez(data, x=np.zeros((2, 8), np.float32))
    assert main(["optimize", str(model_path), "-o", str(tmp_path / "o.onnx"), "--data", str(data)]) == 2
    line = one_line_error(capsys)
    assert "missing X" in line and "X: float32[N,8]" in line
    assert not Path(tmp_path / "o.onnx").exists()


# -- fail before the work ----------------------------------------------------------------------


def _no_work(monkeypatch):
    """Any attempt to load the model means the command started its work."""
    import graphopt.optimize

    def started(*args, **kwargs):
        raise AssertionError("the command started working before refusing")

    monkeypatch.setattr(graphopt.optimize, "load_model", started)


@pytest.mark.parametrize(("flag", "target", "message"), [
    ("-o", "missing/out.onnx", "folder {tmp}/missing does not exist"),
    ("-o", ".", "is a folder; give a file name to write"),
    ("--report", ".", "is a folder; give a file name to write"),
    ("--html", "missing/p.html", "folder {tmp}/missing does not exist"),
])
def test_output_paths_are_refused_before_any_work(flag, target, message, model_path, tmp_path, monkeypatch, capsys):
    _no_work(monkeypatch)
    args = {"-o": str(tmp_path / "out.onnx"), flag: str(tmp_path / target)}
    command = ["optimize", str(model_path), "--no-latency"] + [x for pair in args.items() for x in pair]

    assert main(command) == 2
    assert message.format(tmp=tmp_path) in one_line_error(capsys)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.onnx"]


def test_a_recipe_needing_calibration_says_so_before_any_pass(model_path, tmp_path, monkeypatch, capsys):
    _no_work(monkeypatch)
    assert main(["optimize", str(model_path), "-o", str(tmp_path / "o.onnx"), "--recipe", "int8"]) == 2
    assert one_line_error(capsys) == ("graphopt: recipe 'int8' needs calibration data for quantize-int8: "
                                      "give --calib DATA")


def test_int8_that_quantizes_nothing_writes_the_input_as_it_is(tmp_path, capsys, monkeypatch):
    """light_squeezenet builds its weights at run time (ConstantOfShape): int8 finds nothing to
    quantize. The opset upgrade it ran for quantization enabled nothing and is undone, and the
    run writes the input's own bytes instead of a larger rewrite."""
    import onnx

    monkeypatch.setenv("GRAPHOPT_CACHE_DIR", str(tmp_path / "cache"))
    source = Path(onnx.__file__).parent / "backend" / "test" / "data" / "light" / "light_squeezenet.onnx"
    np.savez(tmp_path / "c.npz", data_0=np.ones((2, 3, 224, 224), np.float32))
    out, report = tmp_path / "o.onnx", tmp_path / "r.json"

    code = main(["optimize", str(source), "-o", str(out), "--recipe", "int8", "--calib", str(tmp_path / "c.npz"),
                 "--no-latency", "--report", str(report)])

    assert code == 0
    assert out.read_bytes() == source.read_bytes()
    data = json.loads(report.read_text())
    upgrade = next(step for step in data["steps"] if step["name"] == "upgrade-opset")
    assert upgrade["rolled_back"] and "enabled nothing" in upgrade["notes"][-1]
    assert data["notes"] == ["quantize-int8 changed nothing: the input is written as it is (the recipe's other "
                             "steps would only have rewritten it)"]
    assert f"graphopt: warning: {data['notes'][0]}" in capsys.readouterr().err


# -- one set of flags ---------------------------------------------------------------------------


def test_labelled_data_is_read_with_labels_and_refused_with_a_hint_without(model_path, tmp_path, capsys):
    data = tmp_path / "d.npz"
    np.savez(data, X=np.ones((4, 8), np.float32), labels=np.arange(4))
    out = tmp_path / "o.onnx"
    assert main(["optimize", str(model_path), "-o", str(out), "--data", str(data), "--no-latency", "-q"]) == 2
    assert "unknown labels (labels? give --labels labels)" in one_line_error(capsys)
    assert not out.exists()
    assert main(["optimize", str(model_path), "-o", str(out), "--data", str(data), "--labels", "labels",
                 "--no-latency", "-q"]) == 0
    assert out.exists()


def test_recipes_prints_a_recipe_toml_or_a_pass_options(capsys):
    assert main(["recipes", "int8"]) == 0
    assert 'pass = "quantize-int8"' in capsys.readouterr().out
    assert main(["recipes", "quantize-int8"]) == 0
    text = capsys.readouterr().out
    assert '# method = "percentile"  (one of minmax|percentile|entropy|mse)' in text
    assert "# margin = 0.4  (float): Part of the error budget kept in reserve" in text
    assert main(["recipes", "turbo"]) == 2
    assert "'turbo' is neither a built-in recipe" in one_line_error(capsys)


def test_inspect_json_to_a_file_and_to_stdout(model_path, tmp_path, capsys):
    assert main(["inspect", str(model_path), "--json", str(tmp_path / "i.json"), "-q"]) == 0
    assert capsys.readouterr().out == ""
    assert json.loads((tmp_path / "i.json").read_text())["outputs"][0]["kind"] == "embeddings"
    assert main(["inspect", str(model_path), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["inputs"][0]["name"] == "X"


def test_latency_switch_spelled_the_same_in_optimize_and_check(model_path, tmp_path, capsys):
    out = tmp_path / "o.onnx"
    assert main(["optimize", str(model_path), "-o", str(out), "--no-latency", "--json", str(tmp_path / "r.json"),
                 "-q"]) == 0
    assert json.loads((tmp_path / "r.json").read_text())["verification"]["latency"] is None
    assert main(["check", str(model_path), str(out), "--latency", "--json", str(tmp_path / "c.json"), "-q"]) == 0
    assert json.loads((tmp_path / "c.json").read_text())["latency"]["ratio"] > 0
    assert capsys.readouterr().out == ""


def test_a_failed_optimize_prints_the_pass_fail_table(model_path, tmp_path, capsys):
    assert main(["optimize", str(model_path), "-o", str(tmp_path / "o.onnx"), "--no-latency",
                 "--max-size-ratio", "0.5"]) == 1
    captured = capsys.readouterr()
    assert "FAIL  max_size_ratio" in captured.out and "PASS  output_shapes" in captured.out


def test_quiet_hides_warnings(model_path, tmp_path, capsys):
    data = tmp_path / "c.npz"
    np.savez(data, X=np.ones((1, 8), np.float32))
    command = ["optimize", str(model_path), "-o", str(tmp_path / "o.onnx"), "--recipe", "int8", "--calib", str(data),
               "--no-latency", "--cache-dir", str(tmp_path / "cache")]
    assert main(command) == 0
    assert "graphopt: warning: quantize-int8: one calibration feed" in capsys.readouterr().err
    (tmp_path / "o.onnx").unlink()
    assert main([*command, "-q"]) == 0
    assert capsys.readouterr().err == ""


def test_onnxruntime_prints_nothing_of_its_own_before_graphopt_s_one_line(tmp_path):
    """onnxruntime logs its load failures itself, coloured, on the process's stderr (outside
    Python's sys.stderr): only a subprocess sees that line."""
    import onnx

    model = Path(onnx.__file__).parent / "backend" / "test" / "data" / "pytorch-converted" / "test_AvgPool1d" / \
        "model.onnx"
    proc = subprocess.run([sys.executable, "-m", "graphopt", "optimize", str(model), "-o", str(tmp_path / "o.onnx")],
                          capture_output=True, text=True)
    assert proc.returncode == 2
    errors = [line for line in proc.stderr.splitlines() if not line.startswith("graphopt: ") or "cannot" in line]
    assert len(errors) == 1 and "\x1b[" not in proc.stderr
    assert errors[0].startswith(f"graphopt: {model}: onnxruntime cannot load it:")
    assert not (tmp_path / "o.onnx").exists()


def test_check_on_images_of_different_sizes(tmp_path, capsys):
    """A fully convolutional model fed 32×32 and 16×24 images: outputs differ in size between
    feeds, and the comparison goes feed by feed."""
    from onnx import helper

    from tests.conftest import make_model, tensor

    weight = np.random.default_rng(0).standard_normal((2, 3, 3, 3)).astype(np.float32)
    model = save(make_model([helper.make_node("Conv", ["x", "W"], ["y"], pads=[1, 1, 1, 1])],
                            [tensor("x", [1, 3, "h", "w"])], [tensor("y", [1, 2, "h", "w"])], [weight], names=["W"]),
                 tmp_path / "fcn.onnx")
    data = tmp_path / "images"
    data.mkdir()
    for index, (h, w) in enumerate([(32, 32), (16, 24)]):
        np.savez(data / f"{index}.npz", x=np.ones((1, 3, h, w), np.float32))
    assert main(["check", str(model), str(model), "--data", str(data), "--max-abs", "1e-4"]) == 0
    assert "check passed" in capsys.readouterr().out


def test_inspect_cuts_long_symbolic_dimensions(tmp_path, capsys):
    from onnx import helper

    from tests.conftest import make_model, tensor

    long_dim = "Add(Mul(floor(" + "sequence_length_" * 25 + "), 2), 1)"
    path = tmp_path / "m.onnx"
    path.write_bytes(make_model([helper.make_node("Relu", ["X"], ["Y"])], [tensor("X", [1, long_dim])],
                                [tensor("Y", [1, long_dim])]).SerializeToString())
    assert main(["inspect", str(path)]) == 0
    out = capsys.readouterr().out
    assert long_dim not in out and "input:    X: float[1,Add(Mul(floor(sequence_…]" in out


@pytest.mark.parametrize("command", ["inspect", "optimize", "check", "bench", "package", "evaluate", "distill",
                                     "export", "generate", "recipes"])
def test_every_subcommand_takes_the_common_options_and_runs_its_own_command(command):
    from graphopt import cli

    help_text = cli.build_parser()._subparsers._group_actions[0].choices[command].format_help()
    (subcommand,) = [s for s in cli._SUBCOMMANDS if s.name == command]

    assert "-q, --quiet" in help_text and "--debug" in help_text
    assert subcommand.run is getattr(cli, f"cmd_{command}")
