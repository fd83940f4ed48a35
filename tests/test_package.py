"""`graphopt package`: bundle contents, reproducibility, targets, and every refusal."""

from __future__ import annotations

import hashlib
import json
import os
import time
import zipfile
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import helper

import graphopt
from graphopt.cli import main
from graphopt.errors import TargetError
from graphopt.package import ortformat
from graphopt.package.targets import builtin_targets, load_target, model_operators
from tests.conftest import linear_model, make_model, one_line_error, run, save, tensor
from tests.hostile.corpus import build_corpus

BUNDLE = ["manifest.json", "SUMMARY.txt", "model.onnx", "model.ort", "model.required_operators_and_types.config"]


@pytest.fixture
def model_path(tmp_path, rng):
    folder = tmp_path / "in"
    folder.mkdir()
    return save(linear_model(rng), folder / "model.onnx")


def package(model: Path, out: Path, *extra: str) -> int:
    return main(["package", str(model), "-o", str(out), "-q", *extra])


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def members(bundle: Path) -> dict[str, bytes]:
    with zipfile.ZipFile(bundle) as archive:
        return {info.filename: archive.read(info) for info in archive.infolist()}


@pytest.fixture
def many_ops_path(tmp_path):
    """Sixteen operator types: enough for onnxruntime's converter to write its kernel-type
    table in a different order in nearly every process, which canonical_ort must undo."""
    ops = ["Abs", "Sigmoid", "Tanh", "Neg", "Exp", "Relu", "Softmax", "Floor", "Ceil", "Sin", "Cos", "Erf",
           "Softsign", "Softplus", "Sign", "Round"]
    names = ["X", *(f"t{i}" for i in range(len(ops) - 1)), "Y"]
    nodes = [helper.make_node(op, [names[i]], [names[i + 1]]) for i, op in enumerate(ops)]
    return save(make_model(nodes, [tensor("X", ["N", 4])], [tensor("Y", ["N", 4])]), tmp_path / "many.onnx")


def hardmax_model(opset: int = 17) -> onnx.ModelProto:
    return make_model([helper.make_node("Hardmax", ["X"], ["Y"])], [tensor("X", [1, 4])], [tensor("Y", [1, 4])],
                      opset=opset)


# -- contents --------------------------------------------------------------------------------


def test_zip_holds_model_ort_config_summary_and_a_manifest_of_every_file(model_path, tmp_path):
    out = tmp_path / "bundle.zip"
    assert package(model_path, out) == 0
    files = members(out)
    assert list(files) == BUNDLE
    assert files["model.onnx"] == model_path.read_bytes()  # byte-exact copy
    manifest = json.loads(files["manifest.json"])
    listed = {entry["path"]: entry for entry in manifest["files"]}
    assert sorted(listed) == sorted(set(BUNDLE) - {"manifest.json"})
    for name, entry in listed.items():
        assert entry["bytes"] == len(files[name])
        assert entry["sha256"] == hashlib.sha256(files[name]).hexdigest()

    assert manifest["format"] == "graphopt-bundle/1"
    assert manifest["graphopt"] == graphopt.__version__
    assert manifest["onnxruntime"] == pytest.importorskip("onnxruntime").__version__
    model = manifest["model"]
    assert model["inputs"] == [{"name": "X", "dtype": "float", "shape": ["N", 8]}]
    assert model["outputs"] == [{"name": "Y", "dtype": "float", "shape": ["N", 4], "kind": "embeddings",
                                 "judged_by": "cosine (on what varies where the reference has a constant region)"}]
    assert model["opsets"] == {"ai.onnx": 17}
    assert model["ops"] == {"Add": 1, "MatMul": 1, "Relu": 1}
    assert manifest["ort"]["optimization_level"] == "all" and manifest["ort"]["type_reduction"] is True
    assert manifest["target"] is None and manifest["optimization"] is None

    with zipfile.ZipFile(out) as archive:
        for info in archive.infolist():
            assert info.date_time == (1980, 1, 1, 0, 0, 0)
            assert info.external_attr >> 16 == 0o100644
            assert info.compress_type == zipfile.ZIP_STORED


def test_package_returns_the_manifest_record_it_wrote(model_path, tmp_path):
    from graphopt.io import to_json
    from graphopt.package import PackageOptions
    from graphopt.package import package as build

    manifest = build(model_path, tmp_path / "bundle", PackageOptions())

    assert (tmp_path / "bundle" / "manifest.json").read_text() == to_json(manifest.to_dict())
    assert manifest.names.ort == "model.ort" and manifest.verification.data.samples == 8
    assert [f.path for f in manifest.files] == BUNDLE[1:]


def test_config_names_the_operators_and_no_path(model_path, tmp_path):
    out = tmp_path / "bundle.zip"
    assert package(model_path, out) == 0
    files = members(out)
    config = files["model.required_operators_and_types.config"].decode()
    manifest = json.loads(files["manifest.json"])
    assert manifest["ort"]["operators"] == ortformat.config_operators(config)
    assert manifest["ort"]["operators"]  # the model needs kernels; the config lists them
    assert "# - model.ort" in config and str(tmp_path) not in config


def test_ort_runs_and_its_parity_is_recorded(model_path, tmp_path):
    out = tmp_path / "bundle"
    assert package(model_path, out) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    verification = manifest["verification"]
    assert verification["passed"] and verification["max_abs_budget"] == 1e-4
    assert verification["data"]["synthetic"] and verification["data"]["samples"] == 8
    assert verification["parity"]["max_abs"] <= 1e-4
    assert [c["name"] for c in verification["checks"]] == ["output_shapes", "no_new_nonfinite", "max_abs"]

    import onnxruntime as ort

    x = np.random.default_rng(5).standard_normal((3, 8)).astype(np.float32)
    session = ort.InferenceSession(str(out / "model.ort"), providers=["CPUExecutionProvider"])
    np.testing.assert_allclose(session.run(None, {"X": x})[0], run(model_path, {"X": x})[0], atol=1e-5, rtol=0)
    assert "max abs" in (out / "SUMMARY.txt").read_text()


def test_external_data_is_bundled_byte_exact(tmp_path, rng):
    folder = tmp_path / "in"
    folder.mkdir()
    onnx.save(linear_model(rng), folder / "model.onnx", save_as_external_data=True, location="weights.bin",
              size_threshold=0)
    out = tmp_path / "bundle.zip"
    assert package(folder / "model.onnx", out) == 0
    files = members(out)
    assert files["weights.bin"] == (folder / "weights.bin").read_bytes()
    assert files["model.onnx"] == (folder / "model.onnx").read_bytes()
    manifest = json.loads(files["manifest.json"])
    assert manifest["model"]["external_data"] == ["weights.bin"]
    assert "weights.bin" in {entry["path"] for entry in manifest["files"]}


def test_report_and_data_are_embedded_without_absolute_paths(model_path, tmp_path):
    report, data = tmp_path / "report.json", tmp_path / "data.npz"
    np.savez(data, X=np.random.default_rng(1).standard_normal((4, 8)).astype(np.float32))
    optimized = tmp_path / "in" / "model.opt.onnx"
    assert main(["optimize", str(model_path), "-o", str(optimized), "--report", str(report), "--no-latency",
                 "-q"]) == 0
    out = tmp_path / "bundle.zip"
    assert package(optimized, out, "--report", str(report), "--data", str(data), "--batch-size", "2") == 0
    files = members(out)
    manifest = json.loads(files["manifest.json"])
    assert manifest["optimization"]["recipe"]["name"] == "lossless"
    assert manifest["optimization"]["output"] == "model.opt.onnx"
    assert manifest["verification"]["data"] == {"source": "data.npz", "synthetic": False, "feeds": 2,
                                                "samples": 4, "evidence": "data"}
    for name in ("manifest.json", "SUMMARY.txt"):
        assert str(tmp_path) not in files[name].decode()


# -- reproducibility -------------------------------------------------------------------------


def test_packaging_twice_gives_the_same_zip(many_ops_path, tmp_path):
    zips = [tmp_path / f"{i}.zip" for i in range(3)]
    for out in zips:
        assert package(many_ops_path, out) == 0
    assert len({sha256(out) for out in zips}) == 1


def test_packaging_twice_gives_identical_folders(many_ops_path, tmp_path):
    first, second = tmp_path / "a", tmp_path / "b"
    assert package(many_ops_path, first) == 0
    assert package(many_ops_path, second) == 0

    def tree(root: Path) -> dict[str, tuple[int, bytes]]:
        return {p.relative_to(root).as_posix(): (p.stat().st_mode, p.read_bytes()) for p in root.rglob("*")}

    assert tree(first) == tree(second)
    assert first.stat().st_mode & 0o777 == 0o755


def test_canonical_ort_is_a_fixed_point(many_ops_path, tmp_path):
    out = tmp_path / "bundle"
    assert package(many_ops_path, out) == 0
    data = (out / "many.ort").read_bytes()
    assert ortformat.canonical_ort(data) == data


def test_config_operators_reads_type_reduction_entries():
    config = ('# Generated from model/s:\n# - m.ort\n'
              'ai.onnx;13;Cast{"inputs": {"0": ["float"]}, "outputs": {"0": ["int64_t"]}},Relu\n'
              'com.microsoft;1;FusedConv\n')
    assert ortformat.config_operators(config) == ["Cast", "Relu", "com.microsoft:FusedConv"]


# -- targets ---------------------------------------------------------------------------------


def test_builtin_target_accepts_the_model_and_is_recorded(model_path, tmp_path):
    out = tmp_path / "bundle.zip"
    assert package(model_path, out, "--target", "cpu-minimal") == 0
    target = json.loads(members(out)["manifest.json"])["target"]
    assert target["name"] == "cpu-minimal" and "Conv" in target["operators"]
    assert (target["opset_min"], target["opset_max"]) == (11, 21)


def test_model_outside_the_target_exits_2_naming_ops_and_opset(tmp_path, capsys):
    model = save(hardmax_model(opset=9), tmp_path / "hard.onnx")
    out = tmp_path / "bundle.zip"
    assert package(model, out, "--target", "cpu-minimal") == 2
    line = one_line_error(capsys)
    assert "Hardmax" in line and "opset 9" in line and "cpu-minimal" in line
    assert "--target FILE" in line  # the way out
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hard.onnx"]  # no bundle, no staging


def test_the_minimal_target_covers_what_common_models_run():
    from graphopt.package.targets import load_target

    operators = load_target("cpu-minimal").operators
    recogniser = {"LSTM", "GRU", "Reciprocal", "Floor", "ReduceMin", "TopK", "NonMaxSuppression", "Tile",
                  "com.microsoft:DynamicQuantizeLSTM", "com.microsoft:DynamicQuantizeMatMul"}
    assert recogniser <= operators


def test_target_file_with_its_own_allow_list(model_path, tmp_path, capsys):
    toml = tmp_path / "edge.toml"
    toml.write_text('description = "tiny"\noperators = ["MatMul", "Add"]\nopset_max = 18\n')
    out = tmp_path / "bundle.zip"
    assert package(model_path, out, "--target", str(toml)) == 2
    assert "operators Relu are not in its allow-list" in one_line_error(capsys)
    toml.write_text('operators = ["MatMul", "Add", "ai.onnx:Relu"]\n')
    assert package(model_path, out, "--target", str(toml)) == 0
    assert json.loads(members(out)["manifest.json"])["target"]["name"] == "edge.toml"


def test_unknown_target_lists_the_builtin_ones(model_path, tmp_path, capsys):
    assert package(model_path, tmp_path / "b.zip", "--target", "tpu-9000") == 2
    line = one_line_error(capsys)
    assert "unknown target 'tpu-9000'" in line and "cpu-minimal" in line
    assert "cpu-minimal" in builtin_targets()


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('operator = ["Conv"]\n', "unknown key operator; valid keys: description, operators, opset_max, opset_min"),
        ("opset_min = 13\nopset_max = 11\n", "opset_min 13 is above opset_max 11"),
        ('opset_min = "11"\n', "'opset_min' must be int"),
        ("operators = []\n", "non-empty list"),
        ('platform = "riscv"\n', "'platform' must be one of arm, amd64"),
        ("operators = [\n", "invalid TOML"),
    ],
)
def test_malformed_target_file_is_refused(tmp_path, text, message):
    toml = tmp_path / "t.toml"
    toml.write_text(text)
    with pytest.raises(TargetError, match="t.toml") as error:
        load_target(toml)
    assert message in str(error.value)


def test_operators_of_functions_and_subgraphs_count(rng):
    then = helper.make_graph([helper.make_node("Hardmax", ["X"], ["t"])], "then", [], [tensor("t", [1, 4])])
    other = helper.make_graph([helper.make_node("Relu", ["X"], ["e"])], "else", [], [tensor("e", [1, 4])])
    graph = helper.make_graph(
        [helper.make_node("Constant", [], ["c"], value=helper.make_tensor("v", onnx.TensorProto.BOOL, [], [True])),
         helper.make_node("If", ["c"], ["Y"], then_branch=then, else_branch=other)],
        "g", [tensor("X", [1, 4])], [tensor("Y", [1, 4])])
    from onnx_ir import serde

    model = serde.deserialize_model(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]))
    assert model_operators(model) == {"Constant": 1, "If": 1, "Hardmax": 1, "Relu": 1}


# -- refusals and atomicity ------------------------------------------------------------------


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return build_corpus(tmp_path_factory.mktemp("hostile") / "corpus")


def test_hostile_models_exit_2_and_write_nothing(corpus, tmp_path, capsys):
    for case in corpus:
        out = tmp_path / case.name
        out.mkdir()
        assert package(case.model, out / "bundle.zip") == 2, case.name
        line = one_line_error(capsys).lower()
        expected = case.expect if case.name != "absurd-dims" else ("declares shape",)
        assert any(word in line for word in expected), (case.name, line)
        assert list(out.iterdir()) == [], case.name


def test_output_equal_to_input_exits_2_and_keeps_it(model_path, capsys):
    before = model_path.read_bytes()
    assert package(model_path, model_path) == 2
    assert "overwrite the input" in one_line_error(capsys)
    assert model_path.read_bytes() == before


def test_output_folder_holding_the_input_exits_2(model_path, capsys):
    assert package(model_path, model_path.parent) == 2
    assert "holds the input" in one_line_error(capsys)
    assert sorted(p.name for p in model_path.parent.iterdir()) == ["model.onnx"]


def test_existing_folder_is_replaced_only_if_it_is_a_bundle(model_path, tmp_path, capsys):
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    assert package(model_path, foreign) == 2
    assert "not a graphopt bundle" in one_line_error(capsys)
    assert (foreign / "notes.txt").read_text() == "keep me"

    bundle = tmp_path / "bundle"
    assert package(model_path, bundle) == 0
    (bundle / "stale.txt").write_text("from an older bundle")
    assert package(model_path, bundle) == 0
    assert sorted(p.name for p in bundle.iterdir()) == sorted(BUNDLE)


def test_ort_that_computes_something_else_exits_1_and_writes_nothing(model_path, tmp_path, rng, monkeypatch,
                                                                      capsys):
    other = save(linear_model(rng), tmp_path / "other.onnx")  # same signature, other weights
    assert package(other, tmp_path / "other") == 0
    wrong_ort = (tmp_path / "other" / "other.ort").read_bytes()
    monkeypatch.setattr(ortformat, "canonical_ort", lambda data: wrong_ort)
    out = tmp_path / "bundle.zip"
    assert package(model_path, out) == 1
    line = one_line_error(capsys)
    assert "bundle not written" in line and "max abs difference" in line
    assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_interrupt_exits_130_and_leaves_no_staging(model_path, tmp_path, monkeypatch, capsys):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr("graphopt.package.bundle.convert_to_ort", interrupted)
    assert package(model_path, tmp_path / "bundle.zip") == 130
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in"]


def test_model_onnxruntime_cannot_convert_exits_2_naming_the_op(tmp_path, capsys):
    graph = helper.make_graph([helper.make_node("Foo", ["X"], ["Y"], domain="my.ops")], "g", [tensor("X", [1, 4])],
                              [tensor("Y", [1, 4])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("my.ops", 1)],
                              ir_version=8)
    path = save(model, tmp_path / "custom.onnx")
    assert package(path, tmp_path / "b.zip") == 2
    line = one_line_error(capsys)
    assert "cannot convert it to ORT format" in line and "my.ops:Foo" in line
    assert sorted(p.name for p in tmp_path.iterdir()) == ["custom.onnx"]


def test_unreadable_report_exits_2(model_path, tmp_path, capsys):
    report = tmp_path / "r.json"
    report.write_text("[1, 2]")
    assert package(model_path, tmp_path / "b.zip", "--report", str(report)) == 2
    assert "not an optimization report" in one_line_error(capsys)
    assert not (tmp_path / "b.zip").exists()


# -- the real model --------------------------------------------------------------------------


@pytest.mark.slow
def test_ppocr_det_after_lossless_packages_reproducibly(tmp_path):
    from graphopt.samples import render_text_images
    from tests.conftest import ppocr_det_path

    model = tmp_path / "det.onnx"
    model.write_bytes(ppocr_det_path().read_bytes())
    np.savez(tmp_path / "images.npz", x=render_text_images(2, seed=3))
    optimized, report = tmp_path / "det.opt.onnx", tmp_path / "report.json"
    assert main(["optimize", str(model), "-o", str(optimized), "--recipe", "lossless", "--report", str(report),
                 "--no-latency", "-q"]) == 0
    zips = [tmp_path / "a.zip", tmp_path / "b.zip"]
    for out in zips:
        assert package(optimized, out, "--data", str(tmp_path / "images.npz"), "--report", str(report),
                       "--target", "cpu-minimal") == 0
    assert sha256(zips[0]) == sha256(zips[1])
    files = members(zips[0])
    assert {"det.opt.ort", "det.opt.required_operators_and_types.config", "manifest.json"} <= set(files)
    assert "Conv" in ortformat.config_operators(files["det.opt.required_operators_and_types.config"].decode())
    verification = json.loads(files["manifest.json"])["verification"]
    assert verification["parity"]["max_abs"] <= 1e-4 and verification["data"]["samples"] == 2


def test_int8_qdq_model_packages_with_an_exact_ort(tmp_path, rng):
    """A static-QDQ int8 model: its .ort equals the .onnx at the level ORT format stores, while
    the optimizations-off float simulation of the QDQ graph differs (recorded, not gated)."""
    import onnx_ir as ir

    from graphopt.passes import get_pass
    from graphopt.passes.base import PassContext
    from graphopt.verify.feeds import FeedSet
    from tests.passes.quantize.models import conv_model

    model = ir.serde.deserialize_model(conv_model(rng))
    step = get_pass("quantize-static")()
    step(model, PassContext(calibration=FeedSet(
        [{"X": rng.standard_normal((1, 8, 16, 16)).astype(np.float32)} for _ in range(4)], "test", False), threads=1))
    path = save(model, tmp_path / "int8.onnx")
    out = tmp_path / "bundle.zip"
    assert package(path, out) == 0
    manifest = json.loads(zipfile.ZipFile(out).read("manifest.json"))
    assert manifest["verification"]["parity"]["max_abs"] <= 1e-4
    assert "unoptimized_onnx" in manifest["verification"]


def test_a_killed_runs_staging_folder_is_removed_by_the_next_run(model_path, tmp_path):
    """SIGKILL leaves the staging folder; the next package run to the same output cleans it."""
    from graphopt.io import STALE_STAGING_SECONDS

    out = tmp_path / "bundle.zip"
    left = tmp_path / f".{out.name}.999999999-abc123.graphopt-tmp"  # no such process
    (left / "bundle").mkdir(parents=True)
    old = time.time() - STALE_STAGING_SECONDS - 60
    os.utime(left, (old, old))
    assert package(model_path, out) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["in", "bundle.zip"])


def test_a_legacy_ir3_model_with_initializers_as_inputs_is_packaged(tmp_path, capsys):
    """Model-zoo files of IR 3 list every initializer as a graph input too; the ORT format kept
    those as inputs the app would have to feed, so the bundle makes them constants (IR 4)."""
    source = Path(onnx.__file__).parent / "backend" / "test" / "data" / "light" / "light_squeezenet.onnx"
    out = tmp_path / "sq.zip"

    assert main(["package", str(source), "-o", str(out), "-q"]) == 0, capsys.readouterr().err

    with zipfile.ZipFile(out) as bundle:
        manifest = json.loads(bundle.read("manifest.json"))
        model = onnx.load_from_string(bundle.read("light_squeezenet.onnx"))
    assert manifest["model"]["normalized"].startswith("IR 3 -> 4: ")
    assert [i.name for i in model.graph.input] == ["data_0"] and model.ir_version == 4
    assert manifest["verification"]["parity"]["max_abs"] <= 1e-4


def test_cpu_minimal_takes_what_graphopt_emits_for_transformers():
    """graphopt's int8 MiniLM: attention fused into com.microsoft:MultiHeadAttention, the sdpa
    NaN guard (IsNaN, Where), mask arithmetic (And, GreaterOrEqual) and ReduceL2 pooling."""
    import onnx_ir as ir

    from graphopt.package.targets import check_model

    nodes = [
        helper.make_node("IsNaN", ["X"], ["nan"]), helper.make_node("GreaterOrEqual", ["X", "X"], ["ge"]),
        helper.make_node("And", ["nan", "ge"], ["both"]), helper.make_node("Where", ["both", "X", "X"], ["w"]),
        helper.make_node("ReduceL2", ["w"], ["n"], keepdims=1),
        helper.make_node("MultiHeadAttention", ["w", "w", "w"], ["Y"], domain="com.microsoft", num_heads=1),
    ]
    graph = helper.make_graph(nodes, "t", [tensor("X", [1, 2, 4])], [tensor("Y", [1, 2, 4]), tensor("n", [1, 1, 1])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)])
    check_model(load_target("cpu-minimal"), ir.serde.deserialize_model(model), "t.onnx")
