"""Models with If, Loop and Scan through every registered pass and through the lossless and
int8 recipes: subgraphs are handled or left alone, never broken.

"Never broken" is measured: the result passes the ONNX checker, loads in onnxruntime and, run
with optimizations off on inputs that take every branch, matches the original — within float
rounding for lossless passes and within a cosine bound for lossy ones.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import pytest

from graphopt.cli import main
from graphopt.io import load_model
from graphopt.passes import Pipeline, available_passes, get_pass
from graphopt.passes.base import PassContext
from graphopt.verify.feeds import FeedSet
from graphopt.verify.runtime import check_loadable
from tests.conftest import run
from tests.reliability.models import CONTROL_FLOW, WIDTH

LOSSLESS = {"simplify", "lift-constants", "cleanup", "upgrade-opset", "prune-dead-channels"}
LOSSLESS_MAX_ABS = 1e-5
# Lossy passes on these random 32×32 weights, measured worst case per output: int8 forms
# ≥ 0.9998, 4-bit codebooks 0.993, lowrank 0.969, prune-weights 0.894 (half of W_in and W_out
# of the if-identity model, whose else-branch is the two of them alone). A miswired branch or
# loop body gives a cosine near 0 (the Scan state this file caught came back as zeros).
LOSSY_MIN_COSINE = 0.85
# Low enough for the quantizers to consider the 32×32 weights of these models.
SMALL = {"min_elements": 16}


def _inputs(kind: str, rng: np.random.Generator, count: int) -> list[dict[str, np.ndarray]]:
    if kind == "scan":
        return [{"X": rng.standard_normal((4, 1, WIDTH)).astype(np.float32)} for _ in range(count)]
    feeds = [{"X": rng.standard_normal((2, WIDTH)).astype(np.float32)} for _ in range(count)]
    if kind.startswith("if"):  # both branches, alternating
        for index, feed in enumerate(feeds):
            feed["cond"] = np.array(index % 2 == 0)
    return feeds


def _make(name: str):  # noqa: ANN202
    cls = get_pass(name)
    valid = {f.name for f in dataclasses.fields(cls.Options)}
    return cls(**{k: v for k, v in SMALL.items() if k in valid})


def _cosine(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.ravel().astype(np.float64), b.ravel().astype(np.float64)
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


def _compare(name: str, reference: list[list[np.ndarray]], candidate: list[list[np.ndarray]]) -> None:
    for ref_outputs, cand_outputs in zip(reference, candidate):
        for ref, cand in zip(ref_outputs, cand_outputs):
            assert ref.shape == cand.shape and np.isfinite(cand).all()
            if name in LOSSLESS:
                np.testing.assert_allclose(cand, ref, atol=LOSSLESS_MAX_ABS, rtol=0)
            else:
                assert _cosine(ref, cand) >= LOSSY_MIN_COSINE, name


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("speed-profile")


@pytest.mark.parametrize("pass_name", available_passes())
@pytest.mark.parametrize("kind", sorted(CONTROL_FLOW))
def test_every_pass_keeps_control_flow_models_correct(kind, pass_name, tmp_path, cache_dir):
    path = tmp_path / "model.onnx"
    onnx.save(CONTROL_FLOW[kind](), path)
    rng = np.random.default_rng(0)
    calibration = FeedSet(_inputs(kind, rng, 16), "test", synthetic=True)
    context = PassContext(calibration=calibration, threads=1, cache_dir=str(cache_dir))
    result = Pipeline([_make(pass_name)], check=check_loadable, context=context).run(load_model(path).model)
    check_loadable(result.model)
    feeds = _inputs(kind, np.random.default_rng(1), 6)
    _compare(pass_name, [run(path, f) for f in feeds], [run(result.model, f) for f in feeds])


def _subgraph_ops(model: ir.Model) -> list[str]:
    return sorted(node.op_type for graph in model.graph.subgraphs() for node in graph)


def test_a_pass_that_leaves_subgraphs_alone_really_does(tmp_path, cache_dir):
    """quantize-codebook says it leaves If/Loop/Scan bodies untouched: their ops are unchanged."""
    path = tmp_path / "model.onnx"
    onnx.save(CONTROL_FLOW["loop"](), path)
    before = _subgraph_ops(load_model(path).model)
    result = Pipeline([_make("quantize-codebook")], context=PassContext(cache_dir=str(cache_dir))).run(
        load_model(path).model)
    assert _subgraph_ops(result.model) == before


@pytest.mark.parametrize("recipe", ["lossless", "int8"])
@pytest.mark.parametrize("kind", sorted(CONTROL_FLOW))
def test_recipes_on_control_flow_models(kind, recipe, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("GRAPHOPT_CACHE_DIR", str(tmp_path / "cache"))
    path, out = tmp_path / "model.onnx", tmp_path / "out.onnx"
    onnx.save(CONTROL_FLOW[kind](), path)
    feeds = _inputs(kind, np.random.default_rng(0), 16)
    calib = tmp_path / "calib"
    calib.mkdir()
    for index, feed in enumerate(feeds):  # a folder of .npz, one feed each (scalar cond)
        np.savez(calib / f"{index:02d}.npz", **feed)
    args = ["optimize", str(path), "-o", str(out), "--no-latency", "-q", "--data", str(calib)]
    if recipe == "int8":
        args += ["--recipe", "int8", "--calib", str(calib)]
    assert main(args) == 0, capsys.readouterr().err
    check_loadable(load_model(out).model)
    test_feeds = _inputs(kind, np.random.default_rng(1), 6)
    _compare("cleanup" if recipe == "lossless" else "quantize-int8",
             [run(path, f) for f in test_feeds], [run(out, f) for f in test_feeds])


def test_cleanup_keeps_an_identity_copy_of_an_output(tmp_path):
    """Y2 = Identity(Y1) with both graph outputs: removing it would lose the name Y1 (found
    through the Scan model above, whose state came back as zeros)."""
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        [helper.make_node("Tanh", ["X"], ["Y1"]), helper.make_node("Identity", ["Y1"], ["Y2"])], "copy",
        [helper.make_tensor_value_info("X", TensorProto.FLOAT, [2])],
        [helper.make_tensor_value_info("Y1", TensorProto.FLOAT, [2]),
         helper.make_tensor_value_info("Y2", TensorProto.FLOAT, [2])])
    path = tmp_path / "copy.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8), path)
    result = Pipeline([get_pass("cleanup")()], check=check_loadable).run(load_model(path).model)
    assert [v.name for v in result.model.graph.outputs] == ["Y1", "Y2"]
    x = np.array([0.5, -1.0], np.float32)
    assert all(np.allclose(y, np.tanh(x)) for y in run(result.model, {"X": x}))
