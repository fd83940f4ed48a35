"""`quantize/numeric.py` and `quantize/calibrate.py`: symmetric int8 grids, scale search, bias
overflow, activation ranges."""

from __future__ import annotations

import numpy as np
import pytest

from graphopt.passes.quantize.calibrate import TensorStats, activation_range
from graphopt.passes.quantize.numeric import quantize_bias, quantize_symmetric


def test_values_on_the_grid_round_trip_exactly():
    scale = np.array([0.5, 0.25], np.float32)
    grid = np.array([[-127, 3, 0, 127], [64, -127, 5, 1]], np.float32) * scale[:, None]
    quantized = quantize_symmetric(grid, axis=0)
    np.testing.assert_array_equal(quantized.dequantize(), grid)
    assert quantized.values.dtype == np.int8


def test_zero_channel_gets_a_valid_scale():
    weight = np.zeros((2, 3), np.float32)
    weight[1] = [1.0, -2.0, 0.5]
    quantized = quantize_symmetric(weight, axis=0)
    assert quantized.scale[0] == 1.0 and np.all(quantized.values[0] == 0)


@pytest.mark.parametrize("max_int", [127, 7])
def test_scale_search_is_never_worse_than_plain_max(rng, max_int):
    """At 8 bits clipping rarely pays (rounding error is tiny); at 4 bits it clearly does."""
    weight = rng.standard_normal((32, 256)).astype(np.float32)
    plain = quantize_symmetric(weight, axis=0, search=False, max_int=max_int)
    searched = quantize_symmetric(weight, axis=0, max_int=max_int)
    per_channel = lambda q: np.square(q.dequantize() - weight).sum(axis=1)  # noqa: E731
    assert np.all(per_channel(searched) <= per_channel(plain) + 1e-9)
    if max_int == 7:
        assert per_channel(searched).sum() < 0.9 * per_channel(plain).sum()


def test_activation_aware_search_protects_important_columns(rng):
    """Column 0 multiplies an input 100× louder than the others: weighting the error by the
    input energy must shrink that column's error."""
    weight = rng.standard_normal((16, 64)).astype(np.float32)
    weight[:, 0] *= 0.2
    importance = np.ones(64, np.float32)
    importance[0] = 1e4
    plain = quantize_symmetric(weight, axis=0, max_int=7)
    aware = quantize_symmetric(weight, axis=0, max_int=7, importance=importance)
    column_error = lambda q: np.abs(q.dequantize()[:, 0] - weight[:, 0]).sum()  # noqa: E731
    assert column_error(aware) < column_error(plain)


def test_bias_overflow_raises_the_weight_scale():
    bias, weight_scale = quantize_bias(np.array([1e6, 0.1]), input_scale=1e-6, weight_scale=np.array([1e-6, 1e-3]))
    assert np.all(np.abs(bias.astype(np.int64)) <= np.iinfo(np.int32).max // 2)
    assert weight_scale[0] > 1e-6 and weight_scale[1] == np.float32(1e-3)


@pytest.mark.parametrize("method", ["minmax", "percentile", "entropy", "mse"])
def test_activation_ranges_contain_zero_and_clip_outliers(method, rng):
    values = np.concatenate([rng.standard_normal(100_000), [400.0]]).astype(np.float32)
    from graphopt.passes.activations import AbsHistogram, ChannelRange
    from graphopt.passes.quantize.calibrate import BINS

    seen = ChannelRange()
    seen.update(values[None])
    stats = TensorStats(seen.minimum, seen.maximum)
    histogram = AbsHistogram(stats.absmax, BINS)
    histogram.update(values[None])
    stats.histogram = histogram.counts
    low, high = activation_range(stats, method)
    assert low <= 0.0 <= high
    if method == "minmax":
        assert high == pytest.approx(400.0)
    else:
        assert high < 400.0  # the single outlier is clipped
