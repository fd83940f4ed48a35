"""Integer arithmetic of quantization, in numpy: per-channel symmetric int8 weights and
int32 biases. No graph code here."""

from __future__ import annotations

import dataclasses

import numpy as np

INT8_MAX = 127
# Weight codes of the "s7" form (onnxruntime's reduce_range): 2 · 255 · 63 fits in int16.
INT7_MAX = 63


@dataclasses.dataclass(frozen=True)
class QuantizedWeight:
    values: np.ndarray  # int8, same shape as the float weight
    scale: np.ndarray  # float32, one per channel along ``axis`` (shape [C])
    axis: int

    def dequantize(self) -> np.ndarray:
        return self.values.astype(np.float32) * _broadcast(self.scale, self.values.ndim, self.axis)

    def broadcast_scale(self) -> np.ndarray:
        """The scale shaped to multiply the int8 tensor directly (e.g. [M,1,1,1] for Conv)."""
        return _broadcast(self.scale, self.values.ndim, self.axis).astype(np.float32)


def _broadcast(scale: np.ndarray, ndim: int, axis: int) -> np.ndarray:
    shape = [1] * ndim
    shape[axis] = scale.size
    return scale.reshape(shape)


# Candidate clipping ratios for the per-channel scale search (1.0 = plain max|w|).
_CLIP_RATIOS = np.linspace(0.2, 1.0, 41)


def quantize_symmetric(
    weight: np.ndarray,
    axis: int,
    *,
    max_int: int = INT8_MAX,
    search: bool = True,
    importance: np.ndarray | None = None,
) -> QuantizedWeight:
    """Symmetric int8 per channel along ``axis``: q = round(w / s).

    With ``search`` each channel's scale is the clipped max|w|/max_int (ratio 0.2…1.0) that
    minimises the channel's squared error, weighted by ``importance`` when given (one
    non-negative value per element of a channel, e.g. E[x²] of the input channel each
    weight multiplies: activation-aware). Heavy-tailed channels trade a few clipped
    outliers for finer steps where it matters. A channel of zeros gets scale 1 (any scale
    reproduces it, and DequantizeLinear forbids 0)."""
    weight = np.asarray(weight, dtype=np.float32)
    moved = np.moveaxis(weight, axis, 0).reshape(weight.shape[axis], -1)
    absmax = np.abs(moved).max(axis=1) if moved.size else np.zeros(weight.shape[axis], np.float32)
    scale = np.where(absmax > 0, absmax / max_int, 1.0).astype(np.float32)
    if search and moved.size:
        columns = np.ones(moved.shape[1], np.float32) if importance is None else np.asarray(importance).reshape(-1)
        scale = _mse_scales(moved, scale, max_int, columns)
    values = np.clip(np.rint(weight / _broadcast(scale, weight.ndim, axis)), -max_int, max_int).astype(np.int8)
    return QuantizedWeight(values, scale, axis)


def quantize_rows(weight: np.ndarray, *, max_int: int = INT8_MAX) -> QuantizedWeight:
    """``quantize_symmetric`` with one scale per row of the last axis, every leading axis a
    channel: a recurrent weight [directions, gates·hidden, k] gets one per direction and gate
    row. The result is over the 2-D view [rows, k] (axis 0); reshape it to the weight's."""
    weight = np.asarray(weight, dtype=np.float32)
    return quantize_symmetric(weight.reshape(-1, weight.shape[-1]), 0, max_int=max_int)


def _mse_scales(rows: np.ndarray, scale: np.ndarray, max_int: int, columns: np.ndarray) -> np.ndarray:
    best, best_error = scale.copy(), np.full(scale.shape, np.inf)
    for ratio in _CLIP_RATIOS[::-1]:  # ties keep the larger, unclipped scale
        candidate = (scale * ratio)[:, None]
        error = (np.square(np.clip(np.rint(rows / candidate), -max_int, max_int) * candidate - rows) * columns).sum(axis=1)
        better = error < best_error
        best[better], best_error[better] = scale[better] * ratio, error[better]
    return best.astype(np.float32)


def quantize_bias(bias: np.ndarray, input_scale: float, weight_scale: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """int32 bias with scale input_scale * weight_scale (what QLinearConv/ MatMul expect).

    Where the int32 range would overflow (a tiny input or weight scale with a large bias),
    the weight scale is raised for that channel instead: returns (bias_int32, weight_scale),
    the caller requantizes that channel's weights with the returned scale."""
    bias = np.asarray(bias, dtype=np.float64)
    weight_scale = np.asarray(weight_scale, dtype=np.float64).copy()
    limit = np.iinfo(np.int32).max // 2  # headroom for the accumulator adding products
    needed = np.abs(bias) / (input_scale * limit)
    weight_scale = np.maximum(weight_scale, needed)
    quantized = np.rint(bias / (input_scale * weight_scale)).astype(np.int32)
    return quantized, weight_scale.astype(np.float32)


def relative_error(reference: np.ndarray, approx: np.ndarray) -> float:
    """||ref - approx|| / ||ref||, 0 for an all-zero reference."""
    norm = float(np.linalg.norm(reference))
    return float(np.linalg.norm(reference - approx)) / norm if norm > 0 else 0.0


def weight_max_int(form: str) -> int:
    """The largest weight code of an int8 weight form (``graphopt.cpu.WeightForm``)."""
    return INT7_MAX if form == "s7" else INT8_MAX


def stored_weight(weight: QuantizedWeight, form: str) -> tuple[np.ndarray, np.ndarray]:
    """The codes as written and their per-channel zero points: int8 around 0 ("s8", "s7"), or
    uint8 around 128 ("u8": the same grid, served by onnxruntime's exact U8U8 kernels)."""
    if form == "u8":
        return (weight.values.astype(np.int16) + 128).astype(np.uint8), np.full(weight.scale.shape, 128, np.uint8)
    return weight.values, np.zeros(weight.scale.shape, np.int8)
