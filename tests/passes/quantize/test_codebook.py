"""quantize-codebook: weights become bit-packed indices into small codebooks, rebuilt in the graph.

Decoded weights are read back through onnxruntime (optimizations off): a MatMul fed the
identity matrix outputs its weight exactly, so the tests see what the graph really rebuilds.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import TensorProto, helper, numpy_helper

from graphopt.errors import RecipeError
from graphopt.passes import Pipeline, get_pass
from graphopt.passes.pipeline import op_histogram
from graphopt.passes.quantize.codebook import CODEBOOK_TAG, bit_layout, kmeans_codebook
from graphopt.recipe import load_recipe, parse_recipe
from tests.conftest import make_model, run, tensor

# A 16-value codebook: weights drawn from it must come back bit for bit.
CODEBOOK16 = np.array(
    [-1.5, -0.75, -0.5, -0.3, -0.2, -0.125, -0.05, -0.01, 0.0, 0.02, 0.1, 0.25, 0.4, 0.6, 0.9, 1.7],
    dtype=np.float32,
)


def quantize(model: onnx.ModelProto | ir.Model, **options):
    if isinstance(model, onnx.ModelProto):
        model = ir.serde.deserialize_model(model)
    return get_pass("quantize-codebook")(**options)(model)


def matmul_model(w: np.ndarray) -> onnx.ModelProto:
    """Y = X @ W."""
    k, n = w.shape
    return make_model(
        [helper.make_node("MatMul", ["X", "W"], ["Y"], name="matmul")],
        [tensor("X", ["N", k], helper.np_dtype_to_tensor_dtype(w.dtype))],
        [tensor("Y", ["N", n], helper.np_dtype_to_tensor_dtype(w.dtype))],
        [w],
        names=["W"],
    )


def decoded_matmul_weight(model: ir.Model, w: np.ndarray) -> np.ndarray:
    return run(model, {"X": np.eye(w.shape[0], dtype=w.dtype)})[0]


def channel_model(op: str, w: np.ndarray) -> tuple[onnx.ModelProto, dict[str, np.ndarray], Callable[[np.ndarray], np.ndarray]]:
    """A model reading ``w`` as ``op``'s weight, a feed, and how to read ``w`` back from the output
    (each one-hot row of the feed selects one slice of the weight)."""
    if op == "MatMul":
        return matmul_model(w), {"X": np.eye(w.shape[0], dtype=np.float32)}, lambda y: y
    if op == "Gemm":  # transB=1: W is [N, K], the output channel is axis 0
        model = make_model(
            [helper.make_node("Gemm", ["X", "W"], ["Y"], name="gemm", transB=1)],
            [tensor("X", [w.shape[1], w.shape[1]])], [tensor("Y", [w.shape[1], w.shape[0]])], [w], names=["W"],
        )
        return model, {"X": np.eye(w.shape[1], dtype=np.float32)}, lambda y: y.T
    if op == "Conv":  # 1x1 kernel: W is [Cout, Cin, 1, 1]
        cin = w.shape[1]
        model = make_model(
            [helper.make_node("Conv", ["X", "W"], ["Y"], name="conv")],
            [tensor("X", [cin, cin, 1, 1])], [tensor("Y", [cin, w.shape[0], 1, 1])], [w], names=["W"],
        )
        return model, {"X": np.eye(cin, dtype=np.float32).reshape(cin, cin, 1, 1)}, lambda y: y[:, :, 0, 0].T[..., None, None]
    model = make_model(  # Gather: an embedding table [V, D]
        [helper.make_node("Gather", ["W", "ids"], ["Y"], name="embed")],
        [tensor("ids", [w.shape[0]], TensorProto.INT64)], [tensor("Y", list(w.shape))], [w], names=["W"],
    )
    return model, {"ids": np.arange(w.shape[0], dtype=np.int64)}, lambda y: y


# --------------------------------------------------------------------------- exactness


@pytest.mark.parametrize("dtype", [np.float32, np.float16])
def test_weights_on_a_16_value_codebook_round_trip_exactly(rng, dtype):
    w = CODEBOOK16.astype(dtype)[rng.integers(0, 16, (64, 96))]
    encoded = quantize(matmul_model(w))
    (detail,) = encoded.details["weights"]
    assert detail["codebook_size"] == 16 and detail["max_abs_error"] == 0.0
    np.testing.assert_array_equal(decoded_matmul_weight(encoded.model, w), w)


def test_powers_of_two_round_trip_exactly_in_log2_mode(rng):
    """4 bits hold 0 and ±2^e for 7 exponents below the largest magnitude (here 2^0)."""
    levels = np.concatenate((-(2.0 ** -np.arange(7)), [0.0], 2.0 ** -np.arange(7))).astype(np.float32)
    w = levels[rng.integers(0, levels.size, (64, 96))]
    encoded = quantize(matmul_model(w), mode="log2")
    assert encoded.details["weights"][0]["codebook_size"] == 15
    np.testing.assert_array_equal(decoded_matmul_weight(encoded.model, w), w)


def test_log2_mode_decodes_to_zero_or_signed_powers_of_two(rng):
    w = (0.9 * rng.standard_normal((64, 96)) / 3).astype(np.float32)
    encoded = quantize(matmul_model(w), mode="log2")
    decoded = decoded_matmul_weight(encoded.model, w)
    magnitudes = np.abs(decoded[decoded != 0])
    np.testing.assert_array_equal(np.exp2(np.round(np.log2(magnitudes))), magnitudes)
    assert magnitudes.max() <= 1.0 and magnitudes.min() >= 2.0**-6  # e_max = round(log2(max|w|)) = 0


@pytest.mark.parametrize("op", ["MatMul", "Gemm", "Conv", "Gather"])
def test_per_channel_codebooks_follow_the_output_channel(rng, op):
    """Each output channel draws from its own scaled copy of the 16 values: exact only if the
    codebooks are cut along the right axis."""
    shape, axis = {"MatMul": ((80, 64), 1), "Gemm": ((64, 80), 0), "Conv": ((64, 80, 1, 1), 0), "Gather": ((80, 64), 1)}[op]
    scales = np.exp2(np.arange(shape[axis]) % 7).astype(np.float32)
    bshape = [1] * len(shape)
    bshape[axis] = -1
    w = CODEBOOK16[rng.integers(0, 16, shape)] * scales.reshape(bshape)
    model, feeds, read_back = channel_model(op, w)
    encoded = quantize(model, per_channel=True, ops=(op,))
    (detail,) = encoded.details["weights"]
    assert detail["per_channel"] and detail["codebooks"] == shape[axis]
    np.testing.assert_array_equal(read_back(run(encoded.model, feeds)[0]), w)
    assert quantize(model, ops=(op,)).details["weights"][0]["max_abs_error"] > 0  # one codebook cannot


@pytest.mark.parametrize("bits", range(2, 9))
def test_packed_indices_unpack_at_odd_lengths(rng, bits):
    """61 x 71 = 4331 elements: odd, and no multiple of any group size, so the last group is
    partial and the rebuild must trim it."""
    levels = np.linspace(-1, 1, 2**bits, dtype=np.float32)
    w = levels[rng.integers(0, 2**bits, (61, 71))]
    encoded = quantize(matmul_model(w), bits=bits)
    group_bytes, per_group = bit_layout(bits)
    packed = encoded.model.graph.initializers["W.indices"].const_value
    assert packed.dtype == ir.DataType.UINT8
    assert packed.size == math.ceil(w.size / per_group) * group_bytes
    np.testing.assert_array_equal(decoded_matmul_weight(encoded.model, w), w)


# --------------------------------------------------------------------------- structure


def test_structure_of_a_packed_4bit_weight(rng):
    w = rng.standard_normal((63, 67)).astype(np.float32)
    encoded = quantize(matmul_model(w))
    graph = encoded.model.graph
    # Cast → Reshape [groups, 1] → Div, Mod → Reshape [-1] → Slice to the odd length → Reshape → Gather
    assert op_histogram(encoded.model) == {"MatMul": 1, "Cast": 1, "Reshape": 3, "Div": 1, "Mod": 1, "Slice": 1, "Gather": 1}
    assert "W" not in graph.initializers
    packed, codebook = graph.initializers["W.indices"].const_value, graph.initializers["W.codebook"].const_value
    assert packed.dtype == ir.DataType.UINT8 and packed.shape == ir.Shape([math.ceil(w.size / 2)])
    assert codebook.dtype == ir.DataType.FLOAT and codebook.shape == ir.Shape([16])
    assert codebook.metadata_props[CODEBOOK_TAG] == "kmeans4"
    matmul = next(n for n in graph if n.op_type == "MatMul")
    assert matmul.inputs[1].name == "W" and matmul.inputs[1].producer().op_type == "Gather"
    assert encoded.changes == {"weights encoded": 1, "weights skipped": 0, "bytes before": w.nbytes,
                               "bytes after": sum(v.const_value.nbytes for v in graph.initializers.values())}
    assert encoded.changes["bytes after"] < w.nbytes / 6
    onnx.checker.check_model(ir.serde.serialize_model(encoded.model), full_check=True)


def test_per_channel_adds_channel_offsets(rng):
    w = rng.standard_normal((128, 48)).astype(np.float32)
    encoded = quantize(matmul_model(w), per_channel=True)
    assert op_histogram(encoded.model)["Range"] == 1 and op_histogram(encoded.model)["Add"] == 1
    assert encoded.model.graph.initializers["W.codebook"].const_value.shape == ir.Shape([48 * 16])


def test_details_report_each_weight(rng):
    w = rng.standard_normal((64, 96)).astype(np.float32)
    (detail,) = quantize(matmul_model(w), bits=3).details["weights"]
    assert {k: detail[k] for k in ("name", "shape", "mode", "bits", "per_channel", "codebooks", "codebook_size")} == {
        "name": "W", "shape": [64, 96], "mode": "kmeans", "bits": 3, "per_channel": False, "codebooks": 1, "codebook_size": 8,
    }
    assert 0 < detail["rel_l2_error"] < 0.2 and detail["max_abs_error"] > 0


# --------------------------------------------------------------------------- parity


def test_parity_on_gaussian_weights_within_the_lloyd_max_bound(rng):
    """The best 16-level quantizer of a Gaussian has a relative L2 error of 0.0975 (Lloyd-Max
    distortion 0.009497·σ²), so k-means on 16384 Gaussian samples must land at or near it; with
    inputs independent of the error, the outputs' relative error matches the weights'. Slack:
    0.0975 → 0.10 for the weights, 0.12 for outputs of 32 samples."""
    w = rng.standard_normal((256, 64)).astype(np.float32)
    x = rng.standard_normal((32, 256)).astype(np.float32)
    proto = matmul_model(w)
    encoded = quantize(proto)
    decoded = decoded_matmul_weight(encoded.model, w)
    assert len(np.unique(decoded)) == 16
    rel_w = np.linalg.norm(decoded - w) / np.linalg.norm(w)
    assert rel_w < 0.10
    assert encoded.details["weights"][0]["rel_l2_error"] == pytest.approx(rel_w, rel=1e-6)
    got, ref = run(encoded.model, {"X": x})[0], run(proto, {"X": x})[0]
    np.testing.assert_allclose(got, x @ decoded, rtol=1e-4, atol=1e-4)  # the graph computes with W-hat
    assert np.linalg.norm(got - ref) / np.linalg.norm(ref) < 0.12


def test_kmeans_matches_the_lloyd_max_quantizer_and_isolated_outliers_get_centroids(rng):
    gaussian = rng.standard_normal(200_000)
    centroids = kmeans_codebook(gaussian, 16)
    error = np.mean((centroids[np.abs(gaussian[:, None] - centroids).argmin(1)] - gaussian) ** 2)
    assert error == pytest.approx(0.009497, rel=0.03)
    # Three outliers far from the bulk: plain Lloyd leaves them sharing one centroid.
    values = np.concatenate((rng.standard_normal(10_000) * 0.1, [4.0, 6.5, 9.5]))
    centroids = kmeans_codebook(values, 64)
    assert all(np.min(np.abs(centroids - outlier)) < 1e-9 for outlier in (4.0, 6.5, 9.5))


def test_two_runs_give_byte_identical_models(rng):
    proto = matmul_model(rng.standard_normal((96, 80)).astype(np.float32))
    first, second = (
        ir.serde.serialize_model(quantize(proto, per_channel=True).model).SerializeToString(deterministic=True)
        for _ in range(2)
    )
    assert first == second


# --------------------------------------------------------------------------- what it leaves alone


def test_second_run_changes_nothing(rng):
    """Indices are uint8 and codebooks are tagged, so neither is encoded again, even when a
    per-channel codebook is large enough to qualify as a Gather table."""
    model = ir.serde.deserialize_model(matmul_model(rng.standard_normal((64, 96)).astype(np.float32)))
    quantize(model, per_channel=True)
    again = quantize(model, per_channel=True, min_elements=16)
    assert not again.modified and again.changes["weights encoded"] == 0
    assert again.details["skipped"] == [{"name": "W.codebook", "reason": "is a codebook written by quantize-codebook"}]


def test_small_and_integer_weights_stay(rng):
    small = make_model(
        [helper.make_node("MatMul", ["X", "W"], ["Y"])],
        [tensor("X", ["N", 8])], [tensor("Y", ["N", 4])], [rng.standard_normal((8, 4)).astype(np.float32)], names=["W"],
    )
    result = quantize(small)
    assert not result.modified
    assert result.details["skipped"] == [{"name": "W", "reason": "has 32 elements, fewer than min_elements=4096"}]
    assert result.notes == []  # by design, not worth a warning

    table = make_model(
        [helper.make_node("Gather", ["T", "ids"], ["Y"])],
        [tensor("ids", [3], TensorProto.INT64)], [tensor("Y", [3, 64], TensorProto.INT64)],
        [np.arange(100 * 64, dtype=np.int64).reshape(100, 64)], names=["T"],
    )
    assert quantize(table).details["skipped"] == [{"name": "T", "reason": "has dtype INT64, not float16/float32/float64"}]


def test_non_constant_weights_stay(rng):
    """A weight fed at run time is not known; an activation (Q @ K^T) is not a weight at all."""
    proto = make_model(
        [helper.make_node("MatMul", ["X", "W"], ["H"]), helper.make_node("MatMul", ["H", "H2"], ["Y"])],
        [tensor("X", [64, 64]), tensor("W", [64, 64]), tensor("H2", [64, 64])], [tensor("Y", [64, 64])],
    )
    result = quantize(proto, min_elements=1)
    assert not result.modified
    assert result.details["skipped"] == [
        {"name": "W", "reason": "is a graph input, so its value is only known at run time"},
        {"name": "H2", "reason": "is a graph input, so its value is only known at run time"},
    ]


def test_constant_node_weight_asks_for_lift_constants(rng):
    w = rng.standard_normal((64, 96)).astype(np.float32)
    proto = make_model(
        [helper.make_node("Constant", [], ["W"], value=numpy_helper.from_array(w, "W")),
         helper.make_node("MatMul", ["X", "W"], ["Y"])],
        [tensor("X", ["N", 64])], [tensor("Y", ["N", 96])],
    )
    result = quantize(proto)
    assert not result.modified
    assert result.notes == ["weight 'W' left as float: is a Constant node's output, not an initializer (run lift-constants first)"]


def test_weight_with_a_non_weight_use_stays(rng):
    """Rebuilding W would change what the Add reads too."""
    w = rng.standard_normal((64, 64)).astype(np.float32)
    proto = make_model(
        [helper.make_node("MatMul", ["X", "W"], ["H"], name="matmul"), helper.make_node("Add", ["H", "W"], ["Y"], name="add")],
        [tensor("X", [64, 64])], [tensor("Y", [64, 64])], [w], names=["W"],
    )
    result = quantize(proto)
    assert not result.modified
    assert result.details["skipped"][0]["reason"] == "is also read by node 'add' (Add input 1), not as a weight"


def test_weights_read_inside_subgraphs_stay(rng):
    w = rng.standard_normal((64, 64)).astype(np.float32)
    then_branch = helper.make_graph([helper.make_node("MatMul", ["X", "W"], ["t"], name="inner")], "then", [], [tensor("t", [2, 64])])
    else_branch = helper.make_graph([helper.make_node("Neg", ["X"], ["e"])], "else", [], [tensor("e", [2, 64])])
    proto = make_model(
        [helper.make_node("MatMul", ["X", "W"], ["H"], name="outer"),
         helper.make_node("If", ["cond"], ["Y"], then_branch=then_branch, else_branch=else_branch)],
        [tensor("cond", [], TensorProto.BOOL), tensor("X", [2, 64])], [tensor("Y", [2, 64]), tensor("H", [2, 64])],
        [w], names=["W"],
    )
    result = quantize(proto)
    assert not result.modified
    assert "is read inside a subgraph (node 'inner')" in result.details["skipped"][0]["reason"]
    assert "If/Loop/Scan bodies are left untouched" in result.notes


def test_excluded_weights_stay_for_a_second_step_with_more_bits(rng):
    proto = make_model(
        [helper.make_node("MatMul", ["X", "A"], ["H"], name="layer0/matmul"),
         helper.make_node("MatMul", ["H", "B"], ["Y"], name="layer1/matmul")],
        [tensor("X", ["N", 64])], [tensor("Y", ["N", 64])],
        [rng.standard_normal((64, 64)).astype(np.float32) for _ in range(2)], names=["A", "B"],
    )
    model = ir.serde.deserialize_model(proto)
    first = quantize(model, exclude=("layer1/*",))
    assert [d["name"] for d in first.details["weights"]] == ["A"]
    assert first.details["skipped"] == [{"name": "B", "reason": "matches exclude pattern 'layer1/*'"}]
    second = quantize(model, bits=6)
    assert [(d["name"], d["bits"]) for d in second.details["weights"]] == [("B", 6)]


def test_an_encoding_larger_than_the_weight_is_refused(rng):
    """8-bit per-channel codebooks of 64 values per channel would outweigh the weight."""
    w = rng.standard_normal((64, 96)).astype(np.float32)
    result = quantize(matmul_model(w), bits=8, per_channel=True)
    assert not result.modified
    assert result.details["skipped"][0]["reason"].startswith("its encoding would take")
    assert len(result.notes) == 1


def test_opset_below_13_is_a_clear_input_error(rng):
    proto = matmul_model(rng.standard_normal((64, 96)).astype(np.float32))
    proto.opset_import[0].version = 12
    with pytest.raises(RecipeError, match="needs default-domain opset >= 13, the model has 12: put an 'upgrade-opset' step"):
        Pipeline([get_pass("quantize-codebook")()]).run(ir.serde.deserialize_model(proto))


# --------------------------------------------------------------------------- options and recipe


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"bits": 1}, "'bits' must be an integer from 2 to 8, got 1"),
        ({"bits": 9}, "'bits' must be an integer from 2 to 8, got 9"),
        ({"bits": True}, "'bits' must be an integer from 2 to 8, got True"),
        ({"mode": "int4"}, "'mode' must be 'log2' or 'kmeans', got 'int4'"),
        ({"ops": ("Relu",)}, "'ops' must name some of Conv, ConvTranspose, Gather, Gemm, MatMul; got ['Relu']"),
        ({"min_elements": 0}, "'min_elements' must be a positive integer, got 0"),
    ],
)
def test_bad_options_name_the_option(options, message):
    with pytest.raises(RecipeError) as info:
        get_pass("quantize-codebook")(**options)
    assert message in str(info.value)


def test_recipe_options_are_type_checked():
    with pytest.raises(RecipeError, match="'bits' must be an integer from 2 to 8, got 12"):
        parse_recipe({"steps": [{"pass": "quantize-codebook", "bits": 12}]}, "r")
    with pytest.raises(RecipeError, match="'mode' must be one of 'log2', 'kmeans'"):
        parse_recipe({"steps": [{"pass": "quantize-codebook", "mode": "uniform"}]}, "r")
    (step,) = parse_recipe({"steps": [{"pass": "quantize-codebook", "ops": ["Conv"]}]}, "r").passes
    assert step.options.ops == ("Conv",)


def test_builtin_codebook4_recipe():
    recipe = load_recipe("codebook4")
    assert [p.name for p in recipe.passes] == ["simplify", "lift-constants", "cleanup", "upgrade-opset", "quantize-codebook"]
    assert recipe.min_cosine == 0.97 and recipe.never_larger
    options = recipe.passes[-1].options
    assert (options.mode, options.bits, options.per_channel) == ("kmeans", 4, True)
