"""Per-channel mean and mean square of intermediate tensors on calibration data, streamed
(``graphopt.passes.activations``). Pruning needs the mean, which
the quantizers' statistics do not keep: a removed channel's mean contribution goes into the
consumer's bias, and what is lost is its variance."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np
import onnx_ir as ir

from graphopt.passes.activations import ActivationCollector
from graphopt.passes.activations import ChannelMoments as Accumulated


@dataclasses.dataclass
class ChannelMoments:
    mean: np.ndarray
    meansq: np.ndarray
    gram: np.ndarray | None = None  # E[x xᵀ] over channels, when asked for

    @property
    def covariance(self) -> np.ndarray | None:
        return None if self.gram is None else self.gram - np.outer(self.mean, self.mean)

    @property
    def variance(self) -> np.ndarray:
        return np.maximum(self.meansq - np.square(self.mean), 0.0)


def channel_moments(model: ir.Model, axes: dict[str, int], feeds: Sequence[dict[str, np.ndarray]],
                    *, threads: int | None = None, gram: frozenset[str] = frozenset()) -> dict[str, ChannelMoments]:
    """Moments of each tensor in ``axes`` (name -> negative channel axis) over ``feeds``; for
    the names in ``gram`` also E[x xᵀ] between channels."""
    sums = {name: Accumulated(axis=axes[name], gram=name in gram) for name in sorted(axes)}
    ActivationCollector(model, sums, threads=threads).stream(feeds, sums)
    return {name: ChannelMoments(s.mean, s.meansq, s.second_moment) for name, s in sums.items() if s.count}
