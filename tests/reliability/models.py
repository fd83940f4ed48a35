"""Small valid models for the reliability tests: seeds for the fuzzer, and one per kind of
control flow (If, Loop, Scan) with weights inside and outside the subgraphs.

Weights have at least 1024 elements where a quantizer should consider them (its default
``min_elements``), so that every pass has something to do.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

OPSET = 17
WIDTH = 32


def _weight(rng: np.random.Generator, *shape: int, scale: float = 0.2) -> np.ndarray:
    return (rng.standard_normal(shape) * scale).astype(np.float32)


def _init(array: np.ndarray, name: str) -> onnx.TensorProto:
    return numpy_helper.from_array(array, name)


def _model(graph: onnx.GraphProto) -> onnx.ModelProto:
    model = helper.make_model(graph, ir_version=8, opset_imports=[helper.make_opsetid("", OPSET)],
                              producer_name="graphopt-reliability")
    onnx.checker.check_model(model, full_check=True)
    return model


def mlp() -> onnx.ModelProto:
    """X[N,32] → MatMul → Add → Relu → MatMul → Add → Y[N,16]."""
    rng = np.random.default_rng(1)
    nodes = [
        helper.make_node("MatMul", ["X", "W1"], ["h1"], name="fc1"),
        helper.make_node("Add", ["h1", "b1"], ["a1"], name="add1"),
        helper.make_node("Relu", ["a1"], ["r1"], name="relu1"),
        helper.make_node("MatMul", ["r1", "W2"], ["h2"], name="fc2"),
        helper.make_node("Add", ["h2", "b2"], ["Y"], name="add2"),
    ]
    inits = [_init(_weight(rng, WIDTH, 64), "W1"), _init(_weight(rng, 64), "b1"),
             _init(_weight(rng, 64, 16), "W2"), _init(_weight(rng, 16), "b2")]
    graph = helper.make_graph(nodes, "mlp", [helper.make_tensor_value_info("X", TensorProto.FLOAT, ["N", WIDTH])],
                              [helper.make_tensor_value_info("Y", TensorProto.FLOAT, ["N", 16])], inits)
    return _model(graph)


def conv() -> onnx.ModelProto:
    """X[1,8,8,8] → Conv 3×3 → BatchNormalization → Relu → GlobalAveragePool → Flatten → Gemm → Y[1,10]."""
    rng = np.random.default_rng(2)
    nodes = [
        helper.make_node("Conv", ["X", "Wc", "bc"], ["c"], name="conv", pads=[1, 1, 1, 1], kernel_shape=[3, 3]),
        helper.make_node("BatchNormalization", ["c", "gamma", "beta", "mean", "var"], ["n"], name="bn"),
        helper.make_node("Relu", ["n"], ["r"], name="relu"),
        helper.make_node("GlobalAveragePool", ["r"], ["p"], name="pool"),
        helper.make_node("Flatten", ["p"], ["f"], name="flatten"),
        helper.make_node("Gemm", ["f", "Wg", "bg"], ["Y"], name="gemm", transB=1),
    ]
    inits = [
        _init(_weight(rng, 16, 8, 3, 3), "Wc"), _init(_weight(rng, 16), "bc"),
        _init(1 + _weight(rng, 16, scale=0.1), "gamma"), _init(_weight(rng, 16), "beta"),
        _init(_weight(rng, 16), "mean"), _init(1 + np.abs(_weight(rng, 16)), "var"),
        _init(_weight(rng, 64, 16), "Wg"), _init(_weight(rng, 64), "bg"),
    ]
    graph = helper.make_graph(nodes, "conv", [helper.make_tensor_value_info("X", TensorProto.FLOAT, [1, 8, 8, 8])],
                              [helper.make_tensor_value_info("Y", TensorProto.FLOAT, [1, 64])], inits)
    return _model(graph)


def constants() -> onnx.ModelProto:
    """Weights in Constant nodes, an Identity, a dead branch: work for lift-constants and cleanup."""
    rng = np.random.default_rng(3)
    nodes = [
        helper.make_node("Constant", [], ["W"], name="w_const", value=_init(_weight(rng, WIDTH, WIDTH), "W")),
        helper.make_node("Identity", ["X"], ["x_id"], name="identity"),
        helper.make_node("MatMul", ["x_id", "W"], ["h"], name="fc"),
        helper.make_node("Sigmoid", ["h"], ["Y"], name="sigmoid"),
        helper.make_node("Neg", ["h"], ["dead"], name="dead_neg"),
    ]
    graph = helper.make_graph(nodes, "constants",
                              [helper.make_tensor_value_info("X", TensorProto.FLOAT, ["N", WIDTH])],
                              [helper.make_tensor_value_info("Y", TensorProto.FLOAT, ["N", WIDTH])])
    return _model(graph)


def if_model() -> onnx.ModelProto:
    """Y = MatMul(If(cond, then: Relu(X·W_then), else: Tanh(X·W_else)), W_out).

    The then-branch reads an outer-scope initializer, the else-branch has its weight in a
    Constant node inside the branch, so both kinds of subgraph weight are present."""
    rng = np.random.default_rng(4)
    then_branch = helper.make_graph(
        [helper.make_node("MatMul", ["X", "W_then"], ["t"], name="then_fc"),
         helper.make_node("Relu", ["t"], ["then_out"], name="then_relu")],
        "then", [], [helper.make_tensor_value_info("then_out", TensorProto.FLOAT, ["N", WIDTH])])
    else_branch = helper.make_graph(
        [helper.make_node("Constant", [], ["W_else"], name="else_w", value=_init(_weight(rng, WIDTH, WIDTH), "W_else")),
         helper.make_node("MatMul", ["X", "W_else"], ["e"], name="else_fc"),
         helper.make_node("Tanh", ["e"], ["else_out"], name="else_tanh")],
        "else", [], [helper.make_tensor_value_info("else_out", TensorProto.FLOAT, ["N", WIDTH])])
    return _if_around(then_branch, else_branch, "if_model", rng, weight="W_then")


def _if_around(then_branch: onnx.GraphProto, else_branch: onnx.GraphProto, name: str, rng: np.random.Generator, *,
               weight: str, before: Sequence[onnx.NodeProto] = ()) -> onnx.ModelProto:
    """X, cond → ``before`` → If(cond, then, else) → MatMul W_out → Y, with initializers
    ``weight`` and W_out (WIDTH×WIDTH)."""
    nodes = [*before,
             helper.make_node("If", ["cond"], ["branch"], name="if", then_branch=then_branch, else_branch=else_branch),
             helper.make_node("MatMul", ["branch", "W_out"], ["Y"], name="out_fc")]
    graph = helper.make_graph(
        nodes, name,
        [helper.make_tensor_value_info("X", TensorProto.FLOAT, ["N", WIDTH]),
         helper.make_tensor_value_info("cond", TensorProto.BOOL, [])],
        [helper.make_tensor_value_info("Y", TensorProto.FLOAT, ["N", WIDTH])],
        [_init(_weight(rng, WIDTH, WIDTH), weight), _init(_weight(rng, WIDTH, WIDTH), "W_out")])
    return _model(graph)


def loop_model() -> onnx.ModelProto:
    """h ← Relu(h·W_loop + b_loop) three times (a Loop with a carried state), then Y = h·W_out."""
    rng = np.random.default_rng(5)
    body = helper.make_graph(
        [helper.make_node("Identity", ["cond_in"], ["cond_out"], name="body_cond"),
         helper.make_node("MatMul", ["h_in", "W_loop"], ["m"], name="body_fc"),
         helper.make_node("Add", ["m", "b_loop"], ["a"], name="body_add"),
         helper.make_node("Relu", ["a"], ["h_out"], name="body_relu")],
        "body",
        [helper.make_tensor_value_info("i", TensorProto.INT64, []),
         helper.make_tensor_value_info("cond_in", TensorProto.BOOL, []),
         helper.make_tensor_value_info("h_in", TensorProto.FLOAT, ["N", WIDTH])],
        [helper.make_tensor_value_info("cond_out", TensorProto.BOOL, []),
         helper.make_tensor_value_info("h_out", TensorProto.FLOAT, ["N", WIDTH])])
    nodes = [
        helper.make_node("Loop", ["trips", "keep_going", "X"], ["h_final"], name="loop", body=body),
        helper.make_node("MatMul", ["h_final", "W_out"], ["Y"], name="out_fc"),
    ]
    graph = helper.make_graph(
        nodes, "loop_model",
        [helper.make_tensor_value_info("X", TensorProto.FLOAT, ["N", WIDTH])],
        [helper.make_tensor_value_info("Y", TensorProto.FLOAT, ["N", WIDTH])],
        [_init(np.array(3, dtype=np.int64), "trips"), _init(np.array(True), "keep_going"),
         _init(_weight(rng, WIDTH, WIDTH), "W_loop"), _init(_weight(rng, WIDTH), "b_loop"),
         _init(_weight(rng, WIDTH, WIDTH), "W_out")])
    return _model(graph)


def scan_model() -> onnx.ModelProto:
    """An RNN written as Scan over X[T,32]: s ← Tanh(x_t·W_in + s·W_rec); Y = all states, S = the last."""
    rng = np.random.default_rng(6)
    body = helper.make_graph(
        [helper.make_node("MatMul", ["x_t", "W_in"], ["u"], name="body_in"),
         helper.make_node("MatMul", ["s_in", "W_rec"], ["v"], name="body_rec"),
         helper.make_node("Add", ["u", "v"], ["z"], name="body_add"),
         helper.make_node("Tanh", ["z"], ["s_out"], name="body_tanh"),
         helper.make_node("Identity", ["s_out"], ["y_t"], name="body_copy")],
        "body",
        [helper.make_tensor_value_info("s_in", TensorProto.FLOAT, [1, WIDTH]),
         helper.make_tensor_value_info("x_t", TensorProto.FLOAT, [1, WIDTH])],
        [helper.make_tensor_value_info("s_out", TensorProto.FLOAT, [1, WIDTH]),
         helper.make_tensor_value_info("y_t", TensorProto.FLOAT, [1, WIDTH])])
    nodes = [helper.make_node("Scan", ["s0", "X"], ["S", "Y"], name="scan", body=body, num_scan_inputs=1)]
    graph = helper.make_graph(
        nodes, "scan_model",
        [helper.make_tensor_value_info("X", TensorProto.FLOAT, [4, 1, WIDTH])],
        [helper.make_tensor_value_info("S", TensorProto.FLOAT, [1, WIDTH]),
         helper.make_tensor_value_info("Y", TensorProto.FLOAT, [4, 1, WIDTH])],
        [_init(np.zeros((1, WIDTH), np.float32), "s0"), _init(_weight(rng, WIDTH, WIDTH), "W_in"),
         _init(_weight(rng, WIDTH, WIDTH), "W_rec")])
    return _model(graph)


def if_identity_model() -> onnx.ModelProto:
    """Branch outputs that are Identity copies of values from outside the branch, as a
    voice-activity model's ``If`` ends: the then-branch returns a copy of an outer-scope
    value computed before the If (h = X·W_in), the else-branch a copy of the graph input X.
    A cleanup that removes those Identities leaves the branch outputs dangling."""
    rng = np.random.default_rng(7)
    then_branch = helper.make_graph(
        [helper.make_node("Identity", ["h"], ["then_out"], name="then_copy")],
        "then", [], [helper.make_tensor_value_info("then_out", TensorProto.FLOAT, ["N", WIDTH])])
    else_branch = helper.make_graph(
        [helper.make_node("Identity", ["X"], ["else_out"], name="else_copy")],
        "else", [], [helper.make_tensor_value_info("else_out", TensorProto.FLOAT, ["N", WIDTH])])
    return _if_around(then_branch, else_branch, "if_identity_model", rng, weight="W_in",
                      before=[helper.make_node("MatMul", ["X", "W_in"], ["h"], name="in_fc")])


def loop_identity_model() -> onnx.ModelProto:
    """A Loop whose body passes one carried value through unchanged (Identity of a body
    input) and emits a per-iteration copy of an outer-scope value (Identity of ``h``)."""
    rng = np.random.default_rng(8)
    body = helper.make_graph(
        [helper.make_node("Identity", ["cond_in"], ["cond_out"], name="body_cond"),
         helper.make_node("Identity", ["keep_in"], ["keep_out"], name="body_pass"),
         helper.make_node("MatMul", ["s_in", "W_loop"], ["m"], name="body_fc"),
         helper.make_node("Tanh", ["m"], ["s_out"], name="body_tanh"),
         helper.make_node("Identity", ["h"], ["h_copy"], name="body_outer_copy")],
        "body",
        [helper.make_tensor_value_info("i", TensorProto.INT64, []),
         helper.make_tensor_value_info("cond_in", TensorProto.BOOL, []),
         helper.make_tensor_value_info("keep_in", TensorProto.FLOAT, ["N", WIDTH]),
         helper.make_tensor_value_info("s_in", TensorProto.FLOAT, ["N", WIDTH])],
        [helper.make_tensor_value_info("cond_out", TensorProto.BOOL, []),
         helper.make_tensor_value_info("keep_out", TensorProto.FLOAT, ["N", WIDTH]),
         helper.make_tensor_value_info("s_out", TensorProto.FLOAT, ["N", WIDTH]),
         helper.make_tensor_value_info("h_copy", TensorProto.FLOAT, ["N", WIDTH])])
    nodes = [
        helper.make_node("MatMul", ["X", "W_in"], ["h"], name="in_fc"),
        helper.make_node("Loop", ["trips", "keep_going", "h", "X"], ["kept", "s_final", "copies"], name="loop",
                         body=body),
        helper.make_node("Add", ["kept", "s_final"], ["sum"], name="join"),
        helper.make_node("MatMul", ["sum", "W_out"], ["Y"], name="out_fc"),
        helper.make_node("ReduceSum", ["copies"], ["C"], name="copies_sum", axes=[0], keepdims=0)
        if OPSET < 13 else helper.make_node("ReduceSum", ["copies", "axis0"], ["C"], name="copies_sum", keepdims=0),
    ]
    graph = helper.make_graph(
        nodes, "loop_identity_model",
        [helper.make_tensor_value_info("X", TensorProto.FLOAT, ["N", WIDTH])],
        [helper.make_tensor_value_info("Y", TensorProto.FLOAT, ["N", WIDTH]),
         helper.make_tensor_value_info("C", TensorProto.FLOAT, ["N", WIDTH])],
        [_init(np.array(3, dtype=np.int64), "trips"), _init(np.array(True), "keep_going"),
         _init(np.array([0], dtype=np.int64), "axis0"),
         _init(_weight(rng, WIDTH, WIDTH), "W_in"), _init(_weight(rng, WIDTH, WIDTH), "W_loop"),
         _init(_weight(rng, WIDTH, WIDTH), "W_out")])
    return _model(graph)


SEEDS: dict[str, Callable[[], onnx.ModelProto]] = {
    "mlp": mlp,
    "conv": conv,
    "constants": constants,
    "if": if_model,
    "loop": loop_model,
    "scan": scan_model,
}

CONTROL_FLOW: dict[str, Callable[[], onnx.ModelProto]] = {
    "if": if_model,
    "if-identity": if_identity_model,
    "loop": loop_model,
    "loop-identity": loop_identity_model,
    "scan": scan_model,
}
