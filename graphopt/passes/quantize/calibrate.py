"""Activation ranges for static quantization, from the streamed statistics of
``graphopt.passes.activations`` (running min/max, per-channel max|x| and histograms).

Range methods for static quantization (from the histogram of each tensor):
minmax, percentile (99.99% of |x| mass by default), entropy (KL divergence, TensorRT-style)
and mse (the clipping range minimizing the expected quantization error).
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Sequence
from typing import Literal

import numpy as np
import onnx_ir as ir

from graphopt.passes.activations import AbsHistogram, ActivationCollector, ChannelRange

logger = logging.getLogger(__name__)

RangeMethod = Literal["minmax", "percentile", "entropy", "mse"]
BINS = 2048


@dataclasses.dataclass
class TensorStats:
    minimum: float = np.inf
    maximum: float = -np.inf
    channel_absmax: np.ndarray | None = None  # per channel: axis 1 of 4-D (NCHW) tensors, else the last axis
    channel_sumsq: np.ndarray | None = None
    count: int = 0  # elements per channel seen so far
    histogram: np.ndarray | None = None  # of |x| over [0, absmax], BINS bins
    shape: tuple[int, ...] = ()

    @property
    def channel_meansq(self) -> np.ndarray | None:
        """E[x²] per channel: how much each input channel contributes to a layer's output."""
        return None if self.channel_sumsq is None else self.channel_sumsq / max(self.count, 1)

    @property
    def absmax(self) -> float:
        return float(max(abs(self.minimum), abs(self.maximum)))


def collect(model: ir.Model, names: Sequence[str], feeds: Sequence[dict[str, np.ndarray]],
            *, histograms: bool = False, threads: int | None = None) -> dict[str, TensorStats]:
    """Statistics of the float tensors ``names`` over ``feeds``.

    One pass gives min/max and per-channel max|x|; ``histograms=True`` adds a second pass
    binning |x| into fixed ranges known from the first."""
    collector = ActivationCollector(model, names, threads=threads)
    ranges = {name: ChannelRange() for name in collector.names}
    collector.stream(feeds, ranges)
    stats = {name: TensorStats(r.minimum, r.maximum, r.channel_absmax, r.channel_sumsq, r.count, shape=r.shape)
             for name, r in ranges.items()}
    if histograms:
        bins = {name: AbsHistogram(s.absmax, BINS) for name, s in stats.items()}
        collector.stream(feeds, bins)
        for name, histogram in bins.items():
            stats[name].histogram = histogram.counts
    logger.debug("calibrated %d tensors on %d feeds", len(stats), len(feeds))
    return stats


def activation_range(stats: TensorStats, method: RangeMethod, *, percentile: float = 99.99) -> tuple[float, float]:
    """(low, high) to quantize this tensor with; always contains 0."""
    low, high = min(stats.minimum, 0.0), max(stats.maximum, 0.0)
    if method == "minmax" or stats.histogram is None or stats.histogram.sum() == 0:
        return low, high
    edges = np.linspace(0.0, stats.absmax, BINS + 1)
    if method == "percentile":
        cumulative = np.cumsum(stats.histogram) / stats.histogram.sum()
        clip = float(edges[1 + int(np.searchsorted(cumulative, percentile / 100.0))])
    elif method == "entropy":
        clip = float(edges[_kl_threshold_bin(stats.histogram)])
    else:
        clip = _mse_clip(stats.histogram, edges)
    return max(low, -clip), min(high, clip)


def _mse_clip(histogram: np.ndarray, edges: np.ndarray, levels: int = 255) -> float:
    """The clip value minimizing E[(x - q(x))^2] over the histogram of |x|."""
    centers = (edges[:-1] + edges[1:]) / 2
    best, best_error = edges[-1], np.inf
    for index in range(BINS // 16, BINS + 1, 8):
        clip = edges[index]
        step = 2 * clip / levels
        inside = centers <= clip
        error = np.sum(histogram[inside]) * step**2 / 12 + np.sum(histogram[~inside] * (centers[~inside] - clip) ** 2)
        if error < best_error:
            best, best_error = clip, error
    return float(best)


def _kl_threshold_bin(histogram: np.ndarray, levels: int = 128) -> int:
    """The bin index whose clipping keeps the quantized distribution closest in KL."""
    histogram = histogram.astype(np.float64)
    best_index, best_kl = len(histogram), np.inf
    for index in range(levels, len(histogram) + 1, 16):
        reference = histogram[:index].copy()
        reference[-1] += histogram[index:].sum()
        if reference.sum() == 0:
            continue
        chunks = np.array_split(histogram[:index], levels)
        quantized = np.concatenate([
            np.where(chunk > 0, chunk.sum() / max(np.count_nonzero(chunk), 1), 0.0) for chunk in chunks
        ])
        p = reference / reference.sum()
        q = quantized / quantized.sum() if quantized.sum() else quantized
        mask = p > 0
        kl = float(np.sum(p[mask] * np.log(p[mask] / np.maximum(q[mask], 1e-12))))
        if kl < best_kl:
            best_index, best_kl = index, kl
    return best_index
