"""Tiny models and helpers shared by the quantization tests."""

from __future__ import annotations

import functools

import numpy as np
import onnx
from onnx import helper

from graphopt.passes.base import PassContext
from graphopt.verify.feeds import FeedSet
from tests.conftest import make_model, tensor


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.reshape(-1).astype(np.float64), b.reshape(-1).astype(np.float64)
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


def conv_model(rng: np.random.Generator, *, opset: int = 17) -> onnx.ModelProto:
    """X[1,8,16,16] → Conv(16×8×3×3, bias) → Relu → Conv(16×16×1×1) → Y."""
    w1 = rng.standard_normal((16, 8, 3, 3)).astype(np.float32) * 0.2
    b1 = rng.standard_normal(16).astype(np.float32) * 0.1
    w2 = rng.standard_normal((16, 16, 1, 1)).astype(np.float32) * 0.3
    return make_model(
        [
            helper.make_node("Conv", ["X", "W1", "B1"], ["c1"], pads=[1, 1, 1, 1], name="conv1"),
            helper.make_node("Relu", ["c1"], ["r1"], name="relu"),
            helper.make_node("Conv", ["r1", "W2"], ["Y"], name="conv2"),
        ],
        [tensor("X", [1, 8, 16, 16])], [tensor("Y", [1, 16, 16, 16])],
        [w1, b1, w2], names=["W1", "B1", "W2"], opset=opset,
    )


def calibrated(pass_, rng: np.random.Generator, shape=(1, 8, 16, 16), name="X", count=8):
    feeds = [{name: rng.standard_normal(shape).astype(np.float32)} for _ in range(count)]
    return functools.partial(pass_, context=PassContext(calibration=FeedSet(feeds, "test", False), threads=1))


def sensitive_model(rng: np.random.Generator) -> onnx.ModelProto:
    """X[N,64] → MatMul W1 → h → MatMul W2 → features[N,64].

    W1 is an ordinary layer, except that its columns 0 and 1 are equal, so h0 == h1. W2 reads
    them with +100 and -100, which cancel exactly, and carries the signal in weights of
    ~0.01: any per-channel int8 scale wide enough for ±100 rounds those to zero, in int8
    compute and weight-only alike. So W2 must stay float; W1 need not."""
    w1 = rng.standard_normal((64, 64)).astype(np.float32) * 0.2
    w1[:, 1] = w1[:, 0]
    w2 = rng.standard_normal((64, 64)).astype(np.float32) * 0.01
    w2[0], w2[1] = 100.0, -100.0
    return make_model(
        [helper.make_node("MatMul", ["X", "W1"], ["h"], name="ordinary"),
         helper.make_node("MatMul", ["h", "W2"], ["features"], name="sensitive")],
        [tensor("X", ["N", 64])], [tensor("features", ["N", 64])], [w1, w2], names=["W1", "W2"],
    )
