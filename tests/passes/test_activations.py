"""`passes.activations`: the one streaming collector and its accumulators, checked against numpy
on the values onnxruntime computes."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import pytest
from onnx import TensorProto, helper

from graphopt.passes.activations import (
    AbsHistogram,
    ActivationCollector,
    ChannelMoments,
    ChannelRange,
    RowFrequency,
    SecondMoment,
)
from tests.conftest import make_model, tensor


def relu_model() -> ir.Model:
    """X float[N,2,3,3] → Relu → R; ids int64[N] → Cast → C (an index tensor)."""
    return ir.serde.deserialize_model(make_model(
        [helper.make_node("Relu", ["X"], ["R"]), helper.make_node("Identity", ["ids"], ["I"]),
         helper.make_node("Cast", ["I"], ["C"], to=TensorProto.FLOAT)],
        [tensor("X", ["N", 2, 3, 3]), tensor("ids", ["N"], TensorProto.INT64)],
        [tensor("R", ["N", 2, 3, 3]), tensor("C", ["N"])]))


@pytest.fixture
def feeds(rng):
    return [{"X": rng.standard_normal((n, 2, 3, 3)).astype(np.float32), "ids": rng.integers(0, 5, n)}
            for n in (1, 4, 2)]


def test_ranges_and_histograms_match_numpy_and_reuse_one_session(feeds):
    collector = ActivationCollector(relu_model(), ["R", "X"], threads=1)
    ranges = {"R": ChannelRange(), "X": ChannelRange()}
    collector.stream(feeds, ranges)
    relu = np.concatenate([np.maximum(f["X"], 0) for f in feeds])
    assert ranges["R"].minimum == 0.0 and ranges["R"].maximum == pytest.approx(relu.max())
    np.testing.assert_allclose(ranges["R"].channel_absmax, np.abs(relu).max(axis=(0, 2, 3)))  # NCHW: axis 1
    assert ranges["R"].count == relu.size // 2
    raw = np.concatenate([f["X"] for f in feeds])  # a graph input: read from the feed
    assert ranges["X"].minimum == pytest.approx(raw.min())
    session = collector._session
    histogram = AbsHistogram(ranges["R"].maximum, 16)
    collector.stream(feeds, {"R": histogram})
    assert collector._session is session
    assert histogram.counts.sum() == relu.size


def test_moments_second_moments_and_row_frequencies(feeds):
    moments = {"R": ChannelMoments(axis=-3, gram=True)}
    second = SecondMoment(diagonal=True)
    frequency = RowFrequency(rows=5)
    collector = ActivationCollector(relu_model(), ["R", "I"], threads=1)
    collector.stream(feeds, {"R": [moments["R"], second], "I": frequency})
    rows = np.moveaxis(np.concatenate([np.maximum(f["X"], 0) for f in feeds]), 1, -1).reshape(-1, 2).astype(np.float64)
    np.testing.assert_allclose(moments["R"].mean, rows.mean(axis=0))
    np.testing.assert_allclose(moments["R"].second_moment, rows.T @ rows / len(rows))
    last = np.concatenate([np.maximum(f["X"], 0) for f in feeds]).astype(np.float64).reshape(-1, 3)
    np.testing.assert_allclose(second.value, np.square(last).mean(axis=0))
    ids = np.concatenate([f["ids"] for f in feeds])
    np.testing.assert_allclose(frequency.value, np.bincount(ids, minlength=5) / ids.size)


def test_a_tensor_not_collected_is_refused(feeds):
    with pytest.raises(KeyError, match="not collected: Y"):
        ActivationCollector(relu_model(), ["R"]).stream(feeds, {"Y": ChannelRange()})
