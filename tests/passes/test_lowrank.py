"""`lowrank`: truncated-SVD factors for MatMul/Gemm weights and embedding tables.

Tolerances: a weight of exact rank r factorized at rank r is rebuilt up to float32 rounding
of the factors (max abs ≤ 1e-5 on outputs of size ~1); truncation below the true rank is lossy
on purpose, and those tests compare errors between variants rather than against a bound."""

from __future__ import annotations

import functools

import numpy as np
import onnx_ir as ir
import pytest
from onnx import helper

from graphopt.errors import DataError
from graphopt.passes import get_pass
from graphopt.passes.base import PassContext
from graphopt.passes.lowrank import Candidate, _square_root, _svd
from graphopt.passes.pipeline import op_histogram
from graphopt.verify.feeds import FeedSet
from graphopt.verify.gate import Thresholds
from tests.conftest import make_model, run, tensor


def low_rank(rng: np.random.Generator, k: int, n: int, rank: int) -> np.ndarray:
    return (rng.standard_normal((k, rank)) @ rng.standard_normal((rank, n)) / np.sqrt(rank * k)).astype(np.float32)


def matmul_model(weight: np.ndarray):
    """X[N,k] → MatMul(W) → Add(b) → Y[N,n]."""
    k, n = weight.shape
    return make_model(
        [helper.make_node("MatMul", ["X", "W"], ["h"], name="matmul"),
         helper.make_node("Add", ["h", "b"], ["Y"], name="bias")],
        [tensor("X", ["N", k])], [tensor("Y", ["N", n])],
        [weight, np.linspace(-1, 1, n).astype(np.float32)], names=["W", "b"],
    )


def with_calibration(pass_, feeds, **context):
    return functools.partial(pass_, context=PassContext(calibration=FeedSet(feeds, "test", False), threads=1, **context))
    return pass_


@pytest.mark.parametrize("shape", [(48, 32), (400, 32)])  # LAPACK's SVD; a tall table's Gram route
@pytest.mark.parametrize("weighted", [False, True])
def test_factors_at_full_rank_rebuild_the_weight(rng, shape, weighted):
    weight = rng.standard_normal(shape)
    root, inverse = _square_root(np.cov(rng.standard_normal((shape[0], 4 * shape[0])))) if weighted else (None, None)
    left, singular, right = _svd(root @ weight if weighted else weight)
    a, b = Candidate(0, None, weight, left, singular, right, inverse).factors(shape[1])
    assert a.shape == (shape[0], shape[1]) and b.shape == (shape[1], shape[1])
    assert np.abs(a.astype(np.float64) @ b - weight).max() <= 1e-5


def test_matmul_of_exact_rank_is_rebuilt_exactly_with_op_structure(rng):
    proto = matmul_model(low_rank(rng, 96, 64, 8))
    model = ir.serde.deserialize_model(proto)
    result = get_pass("lowrank")(energy=0.999999, min_elements=1024)(model)
    assert result.changes == {"weights factorized": 1, "parameters removed": 96 * 64 - 8 * (96 + 64)}
    assert op_histogram(model) == {"MatMul": 2, "Add": 1}
    first, second, add = list(model.graph)
    assert first.inputs[0].name == "X" and second.inputs[0] is first.outputs[0] and add.inputs[0] is second.outputs[0]
    assert first.inputs[1].const_value.shape == (96, 8) and second.inputs[1].const_value.shape == (8, 64)
    assert "W" not in model.graph.initializers
    x = rng.standard_normal((16, 96)).astype(np.float32)
    assert np.abs(run(proto, {"X": x})[0] - run(model, {"X": x})[0]).max() <= 1e-5


@pytest.mark.parametrize("trans_a", [0, 1])
def test_gemm_trans_b_alpha_beta_and_bias(rng, trans_a):
    w = low_rank(rng, 96, 40, 6).T.copy()  # [n, k] read with transB
    c = rng.standard_normal(40).astype(np.float32)
    x_shape = [96, 5] if trans_a else [5, 96]
    proto = make_model(
        [helper.make_node("Gemm", ["X", "W", "C"], ["Y"], name="gemm", transA=trans_a, transB=1, alpha=0.5, beta=2.0)],
        [tensor("X", x_shape)], [tensor("Y", [5, 40])], [w, c], names=["W", "C"],
    )
    model = ir.serde.deserialize_model(proto)
    result = get_pass("lowrank")(energy=0.999999, min_elements=1024)(model)
    assert result.details["layers"][0]["rank"] == 6
    expected = {"MatMul": 2, "Add": 1, **({"Transpose": 1} if trans_a else {})}
    assert op_histogram(model) == expected
    x = rng.standard_normal(x_shape).astype(np.float32)
    assert np.abs(run(proto, {"X": x})[0] - run(model, {"X": x})[0]).max() <= 1e-5


def test_embedding_table_becomes_gather_of_thin_factor_then_matmul(rng):
    table = low_rank(rng, 500, 64, 12)
    proto = make_model(
        [helper.make_node("Gather", ["E", "ids"], ["Y"], name="embed")],
        [tensor("ids", [2, 7], dtype=7)], [tensor("Y", [2, 7, 64])], [table], names=["E"],
    )
    model = ir.serde.deserialize_model(proto)
    assert not get_pass("lowrank")(energy=0.999999)(model.clone()).modified  # tables only on request
    result = get_pass("lowrank")(energy=0.999999, embeddings=True)(model)
    assert result.details["layers"][0]["rank"] == 12
    gather, matmul = list(model.graph)
    assert (gather.op_type, matmul.op_type) == ("Gather", "MatMul")
    assert gather.inputs[0].const_value.shape == (500, 12) and matmul.inputs[1].const_value.shape == (12, 64)
    ids = rng.integers(0, 500, (2, 7)).astype(np.int64)
    assert np.abs(run(proto, {"ids": ids})[0] - run(model, {"ids": ids})[0]).max() <= 1e-5


@pytest.mark.parametrize("options", [dict(select="energy", energy=0.5), dict(select="ratio", ratio=0.25),
                                     dict(select="budget", params=0.3)])
def test_second_run_changes_nothing(rng, options):
    """The factors are too thin to pay again, and a MatMul pair is recognised as factors."""
    model = ir.serde.deserialize_model(matmul_model(rng.standard_normal((192, 128)).astype(np.float32)))
    assert get_pass("lowrank")(**options)(model).modified
    again = get_pass("lowrank")(**options, min_saving=0.0, min_elements=1024)(model)
    assert not again.modified
    assert set(again.details["skipped"].values()) == {"already one factor of a low-rank pair"}


def test_rank_that_does_not_pay_is_refused(rng):
    """A full-rank 192×128 weight at 99% energy needs rank > 100 > 192·128/320 ≈ 77."""
    model = ir.serde.deserialize_model(matmul_model(rng.standard_normal((192, 128)).astype(np.float32)))
    result = get_pass("lowrank")(energy=0.99, min_saving=0.0)(model)
    assert not result.modified
    assert "does not pay" in result.details["skipped"]["matmul"]


def test_runtime_and_small_weights_are_left_alone(rng):
    proto = make_model(
        [helper.make_node("MatMul", ["X", "R"], ["h"], name="runtime_weight"),
         helper.make_node("MatMul", ["h", "W"], ["Y"], name="small")],
        [tensor("X", [2, 256]), tensor("R", [256, 256])], [tensor("Y", [2, 8])],
        [rng.standard_normal((256, 8)).astype(np.float32)], names=["W"],
    )
    result = get_pass("lowrank")(select="ratio", ratio=0.1)(ir.serde.deserialize_model(proto))
    assert not result.modified
    assert result.details["skipped"] == {
        "runtime_weight": "weight is not a constant float initializer",
        "small": "weight has 2048 elements (< 16384)",
    }


def correlated_inputs(rng: np.random.Generator, mix: np.ndarray, count: int) -> list[dict[str, np.ndarray]]:
    """Inputs whose energy sits in a few correlated channels, as real activations' does."""
    k = len(mix)
    loud = np.ones(k, np.float32)
    loud[: k // 8] = 20.0
    return [{"X": (rng.standard_normal((32, k)).astype(np.float32) * loud) @ mix} for _ in range(count)]


@pytest.mark.parametrize("mode", ["diagonal", "covariance"])
def test_activation_aware_beats_plain_svd_on_output_error(rng, mode):
    weight = rng.standard_normal((128, 128)).astype(np.float32)
    proto = matmul_model(weight)
    mix = np.eye(128, dtype=np.float32) + 0.1 * rng.standard_normal((128, 128)).astype(np.float32)
    calib, unseen = correlated_inputs(rng, mix, 16), correlated_inputs(rng, mix, 4)

    def output_error(activation_aware: str) -> float:
        model = ir.serde.deserialize_model(proto)
        pass_ = with_calibration(get_pass("lowrank")(select="ratio", ratio=0.25, activation_aware=activation_aware),
                                 calib)
        assert pass_(model).modified
        return sum(float(np.square(run(proto, f)[0] - run(model, f)[0]).sum()) for f in unseen)

    assert output_error(mode) < {"diagonal": 0.8, "covariance": 0.2}[mode] * output_error("off")


def test_budget_keeps_the_stated_share_of_parameters(rng):
    proto = make_model(
        [helper.make_node("MatMul", ["X", "W1"], ["h"], name="first"),
         helper.make_node("Relu", ["h"], ["r"]),
         helper.make_node("MatMul", ["r", "W2"], ["Y"], name="second")],
        [tensor("X", ["N", 256])], [tensor("Y", ["N", 256])],
        [low_rank(rng, 256, 256, 16), rng.standard_normal((256, 256)).astype(np.float32)], names=["W1", "W2"],
    )
    result = get_pass("lowrank")(select="budget", params=0.6)(ir.serde.deserialize_model(proto))
    layers = {e["node"]: e for e in result.details["layers"]}
    assert layers["first"]["rank"] >= 16  # its energy is concentrated: the cheap layer to cut
    kept = sum(e["params_after"] for e in layers.values()) + (0 if "second" in layers else 256 * 256)
    assert kept <= 0.6 * 2 * 256 * 256


def test_parity_search_meets_its_held_out_target(rng):
    weight = (low_rank(rng, 128, 128, 24) + 0.002 * rng.standard_normal((128, 128))).astype(np.float32)
    proto = matmul_model(weight)
    feeds = [{"X": rng.standard_normal((16, 128)).astype(np.float32)} for _ in range(8)]
    pass_ = with_calibration(get_pass("lowrank")(select="parity", search_steps=6), feeds,
                             budget=Thresholds(min_cosine=0.99))
    model = ir.serde.deserialize_model(proto)
    result = pass_(model)
    assert result.modified
    held = result.details["held_out"]
    assert held["allowed"] == pytest.approx(0.5 * 0.6)  # budget_share 0.5, margin 0.4
    assert held["meets_target"] and held["budget_used"] <= 0.3
    target = 1 - 0.01 * 0.3
    for trial in result.details["trials"]:  # bisection: passing trials lower the budget, failing raise it
        assert 0.0 < trial["params"] < 1.0
    held_out = feeds[-2:]
    cosines = [np.dot(a.ravel(), b.ravel()) / np.linalg.norm(a) / np.linalg.norm(b)
               for f in held_out for a, b in [(run(proto, f)[0], run(model, f)[0])]]
    assert np.mean(cosines) >= target - 1e-6


def test_parity_needs_calibration(rng):
    model = ir.serde.deserialize_model(matmul_model(rng.standard_normal((128, 128)).astype(np.float32)))
    with pytest.raises(DataError, match="lowrank.*--calib"):
        get_pass("lowrank")(select="parity")(model)


def test_factors_are_quantized_by_quantize_int8(rng, tmp_path):
    """The first factor's output is a float activation: both MatMuls get int8 weights."""
    weight = (low_rank(rng, 128, 128, 16) + 0.01 * rng.standard_normal((128, 128))).astype(np.float32)
    proto = matmul_model(weight)
    feeds = [{"X": rng.standard_normal((16, 128)).astype(np.float32)} for _ in range(8)]
    model = ir.serde.deserialize_model(proto)
    with_calibration(get_pass("lowrank")(select="ratio", ratio=0.125), feeds)(model)
    quantize = with_calibration(get_pass("quantize-int8")(), feeds, cache_dir=str(tmp_path))
    result = quantize(model)
    modes = {layer["node"]: layer["mode"] for layer in result.details["layers"]}
    assert set(modes) == {"matmul_lowrank_a", "matmul_lowrank_b"}
    assert not any(v.const_value is not None and v.const_value.dtype == ir.DataType.FLOAT and v.const_value.size > 1024
                   for v in model.graph.initializers.values())
    x = feeds[0]["X"]
    reference, candidate = run(proto, {"X": x})[0].ravel(), run(model, {"X": x})[0].ravel()
    assert reference @ candidate / np.linalg.norm(reference) / np.linalg.norm(candidate) > 0.99


def test_nothing_factorized_says_why(rng):
    from tests.conftest import linear_model

    model = ir.serde.deserialize_model(linear_model(rng, k=64, n=32))
    result = get_pass("lowrank")(ops=(), embeddings=True)(model)
    assert not result.modified
    assert result.notes == ["no weight factorized: the model has no embedding tables (Gather on a 2-D table) "
                            "this pass may take"]
    square = get_pass("lowrank")(min_elements=16, min_saving=0.9)(ir.serde.deserialize_model(linear_model(rng)))
    assert square.notes[-1] == "no weight factorized: no rank saves 90% of a weight's parameters"
