"""llama.cpp's K-quant encodings (Q4_K, Q5_K, Q6_K) in numpy, for writing test GGUFs.

gguf-py reads these types (its dequantizers are what transformers loads GGUFs with) but cannot
write them (``NotImplementedError``), so a K-quant file of a model could not be made here. These
encoders write the byte layouts gguf-py's dequantizers read: super-blocks of 256 values, each

* Q4_K / Q5_K: 8 sub-blocks of 32, ``w = d·sc_j·q − dmin·m_j`` with q in [0, 15] / [0, 31] and
  6-bit sub-block scales ``sc_j`` and mins ``m_j`` packed in 12 bytes (fp16 ``d``, ``dmin``);
* Q6_K: 16 sub-blocks of 16, ``w = d·sc_j·q`` with q in [−32, 31] and int8 ``sc_j`` (fp16 ``d``).

The fit is plain min–max per sub-block (llama.cpp searches for better scales; any valid encoding
dequantizes the same way), so a file written here is a real K-quant file, if a slightly coarser one.
``roundtrip_error`` checks an encoding against gguf-py's own dequantizer.
"""

from __future__ import annotations

import numpy as np

QK_K = 256


def _fp16(values: np.ndarray) -> np.ndarray:
    return values.astype(np.float16)


def _safe_divide(numerator: np.ndarray, denominator: np.ndarray) -> np.ndarray:
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(denominator == 0, 0.0, numerator / np.where(denominator == 0, 1.0, denominator))


def _pack_scales_mins(sc: np.ndarray, m: np.ndarray) -> np.ndarray:
    """8 six-bit scales and mins per super-block → the 12 bytes ``Q4_K.get_scale_min`` unpacks."""
    sc, m = sc.astype(np.uint8), m.astype(np.uint8)
    low = sc[:, :4] | ((sc[:, 4:] >> 4) << 6)
    mid = m[:, :4] | ((m[:, 4:] >> 4) << 6)
    high = (sc[:, 4:] & 0x0F) | ((m[:, 4:] & 0x0F) << 4)
    return np.concatenate([low, mid, high], axis=1)


def _nibbles(q: np.ndarray) -> np.ndarray:
    """[n, 8, 32] 4-bit values → 128 bytes: sub-blocks 2g and 2g+1 share bytes 32g.. (low, high)."""
    q = q.astype(np.uint8).reshape(q.shape[0], 4, 2, 32)
    return (q[:, :, 0] | (q[:, :, 1] << 4)).reshape(q.shape[0], 128)


def _affine(blocks: np.ndarray, levels: int) -> tuple[np.ndarray, ...]:
    """Min–max fit of 8 sub-blocks of 32: fp16 d and dmin, 6-bit scales and mins, codes."""
    sub = blocks.reshape(-1, 8, 32)
    low = np.minimum(sub.min(axis=-1), 0.0)
    step = (sub.max(axis=-1) - low) / levels
    d = _fp16(step.max(axis=-1) / 63)
    dmin = _fp16(-low.min(axis=-1) / 63)
    sc = np.clip(np.rint(_safe_divide(step, d.astype(np.float32)[:, None])), 0, 63)
    m = np.clip(np.rint(_safe_divide(-low, dmin.astype(np.float32)[:, None])), 0, 63)
    scale = (d.astype(np.float32)[:, None] * sc)[..., None]
    offset = (dmin.astype(np.float32)[:, None] * m)[..., None]
    q = np.clip(np.rint(_safe_divide(sub + offset, scale)), 0, levels)
    return d, dmin, sc, m, q


def quantize_q4_k(blocks: np.ndarray) -> np.ndarray:
    d, dmin, sc, m, q = _affine(blocks, 15)
    return np.concatenate([d[:, None].view(np.uint8), dmin[:, None].view(np.uint8),
                           _pack_scales_mins(sc, m), _nibbles(q)], axis=1)


def quantize_q5_k(blocks: np.ndarray) -> np.ndarray:
    d, dmin, sc, m, q = _affine(blocks, 31)
    q = q.astype(np.uint8)
    high = (q >> 4) & 1  # bit j of byte i: the fifth bit of sub-block j's value i
    qh = np.bitwise_or.reduce(high << np.arange(8, dtype=np.uint8)[None, :, None], axis=1).astype(np.uint8)
    return np.concatenate([d[:, None].view(np.uint8), dmin[:, None].view(np.uint8),
                           _pack_scales_mins(sc, m), qh, _nibbles(q & 0x0F)], axis=1)


def quantize_q6_k(blocks: np.ndarray) -> np.ndarray:
    sub = blocks.reshape(-1, 16, 16)
    step = np.abs(sub).max(axis=-1) / 31
    d = _fp16(step.max(axis=-1) / 127)
    sc = np.clip(np.rint(_safe_divide(step, d.astype(np.float32)[:, None])), -128, 127)
    scale = (d.astype(np.float32)[:, None] * sc)[..., None]
    q = (np.clip(np.rint(_safe_divide(sub, scale)), -32, 31) + 32).astype(np.uint8).reshape(-1, 2, 128)
    # value r of each half of 128: low nibble in byte (r % 64), nibble r // 64; high 2 bits in
    # byte (r % 32), bit pair r // 32
    low = (q & 0x0F).reshape(-1, 2, 2, 64)
    ql = (low[:, :, 0] | (low[:, :, 1] << 4)).reshape(-1, 128)
    high = (q >> 4).reshape(-1, 2, 4, 32)
    qh = (high[:, :, 0] | (high[:, :, 1] << 2) | (high[:, :, 2] << 4) | (high[:, :, 3] << 6)).reshape(-1, 64)
    return np.concatenate([ql, qh, sc.astype(np.int8).view(np.uint8), d[:, None].view(np.uint8)], axis=1)


ENCODERS = {"Q4_K": quantize_q4_k, "Q5_K": quantize_q5_k, "Q6_K": quantize_q6_k}


def quantize(values: np.ndarray, kind: str) -> np.ndarray:
    """``values`` [..., K] (K a multiple of 256) → the GGUF bytes of ``kind``, [..., K / 256 · size]."""
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

    if values.shape[-1] % QK_K:
        raise ValueError(f"{kind} needs rows of a multiple of {QK_K} values, got {values.shape[-1]}")
    encoded = ENCODERS[kind](np.asarray(values, np.float32).reshape(-1, QK_K))
    size = GGML_QUANT_SIZES[GGMLQuantizationType[kind]][1]
    assert encoded.shape[1] == size, (kind, encoded.shape)
    return encoded.reshape(*values.shape[:-1], values.shape[-1] // QK_K * size)


def roundtrip_error(values: np.ndarray, kind: str) -> float:
    """Largest |w − dequantize(quantize(w))| relative to max |w|, through gguf-py's dequantizer."""
    from gguf import GGMLQuantizationType, quants

    back = quants.dequantize(quantize(values, kind), GGMLQuantizationType[kind])
    return float(np.abs(back - values).max() / max(float(np.abs(values).max()), 1e-12))
