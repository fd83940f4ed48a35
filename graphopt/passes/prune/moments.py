"""Per-channel mean and mean square of intermediate tensors on calibration data, streamed
(one onnxruntime session with the tensors exposed as outputs). Pruning needs the mean, which
the quantizers' statistics do not keep: a removed channel's mean contribution goes into the
consumer's bias, and what is lost is its variance."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np
import onnx
import onnx_ir as ir


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
    from graphopt.verify.runtime import make_session

    names = sorted(axes)
    proto = ir.serde.serialize_model(model)
    existing = {o.name for o in proto.graph.output}
    for name in names:
        if name not in existing:
            proto.graph.output.append(onnx.helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None))
    session = make_session(proto.SerializeToString(), optimize=False, threads=threads)
    sums: dict[str, list] = {name: [0.0, 0.0, 0, 0.0] for name in names}
    for feed in feeds:
        for name, value in zip(names, session.run(names, feed)):
            rows = np.moveaxis(np.asarray(value, dtype=np.float64), axes[name], -1)
            rows = rows.reshape(-1, rows.shape[-1])
            entry = sums[name]
            entry[0] = entry[0] + rows.sum(axis=0)
            entry[1] = entry[1] + np.square(rows).sum(axis=0)
            entry[2] += rows.shape[0]
            if name in gram:
                entry[3] = entry[3] + rows.T @ rows
    return {name: ChannelMoments(s[0] / s[2], s[1] / s[2], s[3] / s[2] if name in gram else None)
            for name, s in sums.items() if s[2]}
