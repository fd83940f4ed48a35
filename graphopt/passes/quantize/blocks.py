"""Blockwise weight codes along K, and three ways to choose them.

A weight W [K, N] (``Y = A @ W``) is cut, per output column n, into blocks of ``block_size``
consecutive rows; block b of column n holds codes q ∈ [0, 2^bits) and is rebuilt as

    Ŵ[k, n] = s[n, b] · (q[k, n] − z[n, b])

**Grids** (``form``):

* ``symmetric``: z = 2^(bits−1), no zero point stored (the kernel's default). 4 bits: all 16
  codes serve, q − z ∈ [−8, 7]: s = max(−min/8, max/7), or the negative s = −max(max/8, −min/7)
  where that is finer (the longer side of the block gets the 8 steps; nothing is clipped);
  8 bits: s = max|W| / 127, ±max on codes 1 and 255 (the int8 convention, and GGUF's Q8_0);
* ``integer``: s = (max − min) / (2^bits − 1) over a range stretched to include 0,
  z = round(−min / s), a packed unsigned integer per block (what onnxruntime's quantizer does);
* ``float``: z is a real number, so the grid runs exactly from the block's min (code 0) to its
  max (code 2^bits − 1), as GGUF's Q4_1 stores. How it is served is the pass's business
  (a float zero-point input, or a symmetric kernel plus an offset term).

**Methods** — what each one minimises:

* ``rtn``: the min–max grid above, each code rounded to nearest.
* ``hqq`` (data-free, after Badri & Shaji's half-quadratic quantization): for the grid's scale
  s, the zero point minimising the sparsity-promoting error  Σ_k |W − s·(q(z) − z)|^p, p = 0.7,
  solved by half-quadratic splitting: E ← shrink_p(W − Ŵ(z), β);  z ← mean_k(q − (W − E)/s);
  β ← 1.01·β, for 20 rounds, keeping per block the z of least mean |error| (HQQ's own stopping
  rule). Symmetric and integer grids have no free zero point: there each block's scale is picked
  among 8 shrink factors of the min–max scale (1.0 down to 0.72), zero point kept, for the least
  squared error.
* ``awq`` scales (needs calibration; after Lin et al.'s activation-aware weight quantization):
  input channels that carry large activations get finer steps. With a_k = √E[x_k²] and
  s = a^α / √(max a^α · min a^α), the layer computes (x / s) · Q(diag(s)·W), and α ∈ {0, 0.1, …, 1}
  is the one minimising the output error tr(Δᵀ H Δ), Δ = W − diag(1/s)·Q(diag(s)·W), summed over
  the layers that read the same input (they share s, which the pass folds into the norm before
  them or divides out with a Mul). α = 0 is plain rounding. Each block's scale is then picked
  among the shrink factors for the least error weighted by E[x_k²] / s_k² (activation-aware
  clipping).
* ``gptq`` (needs calibration; Frantar et al.): the output error on the calibration inputs,
  ‖X·(W − Ŵ)‖² = tr((W − Ŵ)ᵀ H (W − Ŵ)) with H = E[x xᵀ], rows k quantized in order, each
  row's rounding error fed forward onto the rows not yet quantized through the upper Cholesky
  factor U of H⁻¹:  W[j] −= U[k, j] · (W[k] − Ŵ[k]) / U[k, k]  (j > k). Rows go in order of
  decreasing E[x_k²] ("act order") with every block's grid fixed beforehand from the original
  weight ("static groups"; symmetric and integer grids: each scale searched among shrink factors
  as ``hqq`` does, GPTQ's "mse" grid).

Storage, as onnxruntime's kernels read it: ``codes`` packed low bits first along K (for 4 bits
the even k in the low nibble) into uint8 [N, blocks, block_size·bits/8]; integer zero points
packed the same way per column. A K that is not a multiple of the block size is padded with
codes at the zero point (they rebuild to 0 and multiply nothing).
"""

from __future__ import annotations

import dataclasses

import numpy as np

FORMS = ("symmetric", "integer", "float")
# Weights are quantized in slices of output columns of about this many values, so that the
# temporaries stay near 100 MB whatever the layer's size.
_CHUNK_ELEMENTS = 1 << 22
METHODS = ("rtn", "hqq", "gptq")  # how codes are rounded; AWQ scales come before any of them


@dataclasses.dataclass(frozen=True)
class BlockQuantized:
    codes: np.ndarray  # uint8 [N, blocks, block_size], one code per value (unpacked)
    scales: np.ndarray  # float32 [N, blocks]
    zero_points: np.ndarray  # uint8 [N, blocks], or float32 for the float grid
    bits: int
    block_size: int
    k: int
    input_scales: np.ndarray | None = None  # float32 [K]: the codes are of diag(s)·W, the input comes divided by s

    @property
    def half(self) -> int:
        return 1 << (self.bits - 1)

    @property
    def symmetric(self) -> bool:
        return self.zero_points.dtype == np.uint8 and bool(np.all(self.zero_points == self.half))

    def dequantize(self, columns: slice = slice(None), *, effective: bool = True) -> np.ndarray:
        """Ŵ [K, N] as the kernel rebuilds it (or those of its ``columns``); with input scales,
        ``effective`` divides them out: the weight the layer applies to its original input."""
        values = (self.codes[columns].astype(np.float32) - self.zero_points[columns, :, None]) \
            * self.scales[columns, :, None]
        rebuilt = values.reshape(values.shape[0], -1)[:, : self.k].T
        if effective and self.input_scales is not None:
            rebuilt /= self.input_scales[:, None]
        return rebuilt

    def packed_codes(self) -> np.ndarray:
        """uint8 [N, blocks, block_size · bits / 8], low bits first along K."""
        return pack(self.codes, self.bits)

    def packed_zero_points(self) -> np.ndarray:
        """Integer zero points: uint8 [N · ceil(blocks · bits / 8)], each column packed like the
        codes; float ones as they are, float32 [N · blocks]."""
        if self.zero_points.dtype != np.uint8:
            return self.zero_points.reshape(-1).astype(np.float32)
        n, blocks = self.zero_points.shape
        per_byte = 8 // self.bits
        padded = np.zeros((n, -(-blocks // per_byte) * per_byte), np.uint8)
        padded[:, :blocks] = self.zero_points
        return pack(padded, self.bits).reshape(-1)

    def offsets(self) -> np.ndarray:
        """float32 [blocks, N]: s · (2^(bits−1) − z), what a symmetric kernel reading these codes
        misses per block: Ŵ = s·(q − 2^(bits−1)) + offset."""
        return (self.scales * (self.half - self.zero_points.astype(np.float32))).T.astype(np.float32)


def pack(codes: np.ndarray, bits: int) -> np.ndarray:
    """Pack the last axis ``8 // bits`` codes per byte, the first code in the lowest bits."""
    per_byte = 8 // bits
    grouped = codes.astype(np.uint8).reshape(*codes.shape[:-1], codes.shape[-1] // per_byte, per_byte)
    shifts = (np.arange(per_byte, dtype=np.uint8) * bits).astype(np.uint8)
    return np.bitwise_or.reduce(grouped << shifts, axis=-1).astype(np.uint8)


def split_blocks(weight: np.ndarray, block_size: int) -> tuple[np.ndarray, np.ndarray]:
    """(values [N, blocks, block_size] float32, zero-padded along K; mask [blocks, block_size]
    of the real rows)."""
    k, n = weight.shape
    blocks = -(-k // block_size)
    columns = np.zeros((n, blocks * block_size), np.float32)
    columns[:, :k] = weight.T
    mask = np.zeros(blocks * block_size, bool)
    mask[:k] = True
    return columns.reshape(n, blocks, block_size), mask.reshape(blocks, block_size)


def grid(values: np.ndarray, mask: np.ndarray, bits: int, form: str) -> tuple[np.ndarray, np.ndarray]:
    """The min–max grid of each block: (scales [..., blocks] float32, zero points)."""
    levels = (1 << bits) - 1
    if form == "symmetric":
        half = 1 << (bits - 1)
        if bits == 4:  # all 16 codes: q - z in [-8, 7], the longer side of the block on the 8 steps
            low = np.minimum(np.where(mask, values, np.inf).min(axis=-1), 0.0)
            high = np.maximum(np.where(mask, values, -np.inf).max(axis=-1), 0.0)
            positive = np.maximum(-low / half, high / (half - 1))  # [-8s, 7s] covers [low, high]
            negative = np.maximum(high / half, -low / (half - 1))  # a negative scale: [-7|s|, 8|s|]
            scales = np.where(positive <= negative, positive, -negative)
        else:  # ±(2^(bits-1) - 1), the int8 convention (GGUF's Q8_0 too)
            scales = np.where(mask, np.abs(values), 0).max(axis=-1) / (half - 1)
        zero: np.ndarray = np.full(scales.shape, half, np.uint8)
    else:
        low = np.where(mask, values, np.inf).min(axis=-1)
        high = np.where(mask, values, -np.inf).max(axis=-1)
        if form == "integer":
            low, high = np.minimum(low, 0.0), np.maximum(high, 0.0)
            scales = (high - low) / levels
            zero = np.clip(np.rint(-low / np.where(scales > 0, scales, 1.0)), 0, levels).astype(np.uint8)
        else:
            scales = np.where(high > low, (high - low) / levels, 1.0)
            zero = (-low / scales).astype(np.float32)
    scales = np.where(scales != 0, scales, 1.0).astype(np.float32)
    return scales, zero


def round_codes(values: np.ndarray, mask: np.ndarray, scales: np.ndarray, zero: np.ndarray, bits: int) -> np.ndarray:
    levels = (1 << bits) - 1
    codes = np.clip(np.rint(values / scales[..., None] + zero[..., None]), 0, levels)
    return np.where(mask, codes, np.clip(np.rint(zero), 0, levels)[..., None]).astype(np.uint8)


def quantize_blocks(weight: np.ndarray, *, bits: int, block_size: int, form: str = "symmetric",
                    method: str = "rtn", hessian: np.ndarray | None = None,
                    input_scales: np.ndarray | None = None) -> BlockQuantized:
    """Blockwise codes of ``weight`` [K, N] along K (see the module's docstring). ``hessian``
    [K, K] (E[x xᵀ] of the layer's input) is needed by ``gptq``; given to ``hqq`` on a symmetric or
    integer grid, it weighs each row's error by E[x_k²]. With ``input_scales`` s [K] the codes are
    of diag(s)·W (AWQ; see ``awq_scales``) and the result says so."""
    if form not in FORMS or method not in METHODS:
        raise ValueError(f"unknown form {form!r} or method {method!r}")
    k, n = weight.shape
    columns = max(1, _CHUNK_ELEMENTS // max(k, 1))
    if n > columns:  # output columns are independent: a large weight goes a slice at a time
        parts = [quantize_blocks(weight[:, start:start + columns], bits=bits, block_size=block_size, form=form,
                                 method=method, hessian=hessian, input_scales=input_scales)
                 for start in range(0, n, columns)]
        return BlockQuantized(np.concatenate([p.codes for p in parts]), np.concatenate([p.scales for p in parts]),
                              np.concatenate([p.zero_points for p in parts]), bits, block_size, k, input_scales)
    weight = np.asarray(weight, np.float32)
    if input_scales is not None:  # the codes of diag(s)·W against the input x / s: the same output
        weight = weight * input_scales[:, None]
        if hessian is not None:
            hessian = hessian / np.outer(input_scales, input_scales)
    if method == "gptq":
        if hessian is None:
            raise ValueError("gptq needs the layer's input second moment")
        quantized = _gptq(weight, hessian, bits=bits, block_size=block_size, form=form)
        return dataclasses.replace(quantized, input_scales=input_scales)
    values, mask = split_blocks(weight, block_size)
    scales, zero = grid(values, mask, bits, form)
    if method == "hqq":
        importance = None
        if hessian is not None:
            rows = np.zeros(mask.size, np.float32)
            rows[:k] = np.maximum(np.diag(hessian), 0)
            importance = rows.reshape(mask.shape)
        scales, zero = _hqq(values, mask, scales, zero, bits, form, importance=importance)
    codes = round_codes(values, mask, scales, zero, bits)
    return BlockQuantized(codes, scales, zero, bits, block_size, k, input_scales)


def output_error(quantized: BlockQuantized, weight: np.ndarray,
                 hessian: np.ndarray | None = None) -> tuple[float, float]:
    """(Σ error², Σ weight²), or with ``hessian`` H: (tr(Eᵀ H E), tr(Wᵀ H W)), E = Ŵ − W the
    effective error; by slices of output columns, so that no temporary is larger than a slice."""
    k, n = weight.shape
    step = max(1, _CHUNK_ELEMENTS // max(k, 1))
    error = total = 0.0
    for start in range(0, n, step):
        columns = slice(start, start + step)
        w = np.asarray(weight[:, columns], np.float32)
        e = quantized.dequantize(columns) - w
        if hessian is None:
            error += float(np.einsum("ij,ij->", e, e))
            total += float(np.einsum("ij,ij->", w, w))
        else:
            error += float(((hessian @ e) * e).sum())
            total += float(((hessian @ w) * w).sum())
    return error, total


AWQ_ALPHAS = tuple(round(a, 2) for a in np.linspace(0.1, 1.0, 10))


def relative_loss(quantized: BlockQuantized, weight: np.ndarray, hessian: np.ndarray | None) -> float:
    """The relative output error tr(Eᵀ H E) / tr(Wᵀ H W) on the inputs H measures (without H, the
    weight's own relative squared error)."""
    error, total = output_error(quantized, weight, None if hessian is None else hessian.astype(np.float32))
    return error / max(total, 1e-30)


def awq_scales(weights: list[np.ndarray], hessian: np.ndarray, *, bits: int, block_size: int, form: str,
               alphas: tuple[float, ...] = AWQ_ALPHAS) -> tuple[np.ndarray | None, float, float]:
    """AWQ's per-input-channel scales for the layers ``weights`` (each [K, N]) that read one input
    of second moment ``hessian``: (s, α, loss) with the least Σ tr(Δᵀ H Δ) over α ∈ {0} ∪ ``alphas``
    (see the module's docstring); s is None when α = 0, plain rounding, is best."""
    h = np.asarray(hessian, np.float32)
    rms = np.sqrt(np.maximum(np.diag(hessian), 0.0))
    floor = rms[rms > 0].min() if np.any(rms > 0) else 1.0
    rms = np.maximum(rms, floor)

    def loss(scales: np.ndarray | None) -> tuple[float, float]:
        errors = [output_error(quantize_blocks(w, bits=bits, block_size=block_size, form=form,
                                               input_scales=scales), w, h) for w in weights]
        return sum(e for e, _ in errors), sum(t for _, t in errors)

    plain, total = loss(None)
    best: tuple[np.ndarray | None, float, float] = (None, 0.0, plain)
    if plain <= 1e-12 * total:
        return best  # the weights lie on the grid already (a GGUF checkpoint's blocks): nothing to gain
    for alpha in alphas:
        scales = rms ** alpha
        scales = (scales / np.sqrt(scales.max() * scales.min())).astype(np.float32)
        trial, _ = loss(scales)
        if trial < best[2]:
            best = (scales, float(alpha), trial)
    return best


def on_grid(weight: np.ndarray, bits: int, block_size: int, form: str = "float") -> bool:
    """Whether ``weight`` [K, N] lies on a ``bits`` grid of ``block_size`` blocks of ``form``
    already: rounding to it changes nothing beyond float32 noise. A GGUF Q4_0 import's weights lie
    on the symmetric 4-bit grid (llama.cpp also gives the block's largest |w| the 8 steps, with the
    sign of that value), a Q4_1 import's on the float one; a float checkpoint's on neither."""
    error, total = output_error(quantize_blocks(weight, bits=bits, block_size=block_size, form=form), weight)
    return error <= 1e-10 * max(total, 1e-30)


def activation_loss(quantized: BlockQuantized, rows: np.ndarray, block_size: int,
                    input_scales: np.ndarray | None = None) -> float:
    """What int8 activations (accuracy level 4, blocks of ``block_size``) cost the layer on
    ``rows`` [T, K] of its input: ‖(int8(x) − x)·Ŵ‖² / ‖x·Ŵ‖², Ŵ its codes dequantized (with
    ``input_scales``, the codes are of diag(s)·W and the kernel reads x / s)."""
    x = np.asarray(rows, np.float32)
    if input_scales is not None:
        x = x / input_scales.astype(np.float32)
    codes = quantized.dequantize()
    error = (int8_activations(x, block_size) - x) @ codes
    total = x @ codes
    return float(np.einsum("ij,ij->", error, error) / max(float(np.einsum("ij,ij->", total, total)), 1e-30))


SMOOTHING_ALPHAS = (0.2, 0.35, 0.5, 0.65, 0.8, 0.9, 1.0)


def int8_activations(x: np.ndarray, block_size: int) -> np.ndarray:
    """``x`` [T, K] as onnxruntime's int8-activation kernels (MatMulNBits, accuracy level 4) read
    it: each row's blocks of ``block_size`` along K rounded to 255 symmetric levels of their own
    largest |x|."""
    t, k = x.shape
    blocks = np.pad(x, ((0, 0), (0, -k % block_size))).reshape(t, -1, block_size)
    scales = np.abs(blocks).max(axis=2, keepdims=True) / 127.0
    scales[scales == 0] = 1.0
    return (np.clip(np.rint(blocks / scales), -127, 127) * scales).reshape(t, -1)[:, :k]


def smoothing_scales(weights: list[np.ndarray], rows: np.ndarray, absmax: np.ndarray, *,
                     widths: list[tuple[int, bool, str, int]], held_out: np.ndarray | None = None,
                     alphas: tuple[float, ...] = SMOOTHING_ALPHAS) -> tuple[np.ndarray | None, float]:
    """Input scales s [K] for layers ``weights`` (each [K, N]) that read one input, so that the
    codes of diag(s)·W against x / s lose least: SmoothQuant's s = max|x|^α / max|W|^(1−α), α from
    ``alphas`` or none. Each of ``widths`` (bits, whether the kernel reads int8 activations, the
    grid's form, its block along K: every form the layers may take) gives an output error on
    ``rows`` (a sample of the calibration input; ``absmax`` its channels' largest |x| over all of
    it); the scales with the least product of those errors win, kept only if they also beat no
    scales on ``held_out`` rows. (s, α); s is None when no scales win, and always for weights a
    width rebuilds exactly (on its grid already)."""
    peak = np.max([np.abs(w).max(axis=1) for w in weights], axis=0)
    # at most ~2^31 multiply-adds per trial: a wide layer (an LM head) is judged on fewer rows
    keep = max(32, (1 << 31) // max(1, rows.shape[1] * sum(w.shape[1] for w in weights)))
    rows = rows[::-(-len(rows) // keep)]
    held_out = held_out[::-(-len(held_out) // keep)] if held_out is not None and len(held_out) else None
    products = {id(sample): [sample @ w for w in weights] for sample in (rows, held_out) if sample is not None}
    energy = sum(float(np.square(y).sum()) for y in products[id(rows)])

    def errors(sample: np.ndarray, scales: np.ndarray | None, *, activations: bool = True) -> list[float]:
        inputs = sample if scales is None else sample / scales
        found = []
        for bits, int8, form, block_size in widths:
            x = int8_activations(inputs, block_size) if int8 and activations else inputs
            found.append(sum(float(np.square(x @ quantize_blocks(w, bits=bits, block_size=block_size, form=form,
                                                                  input_scales=scales).dequantize(effective=False)
                                             - y).sum()) for w, y in zip(weights, products[id(sample)])))
        return found

    def loss(sample: np.ndarray, scales: np.ndarray | None) -> float:
        return float(sum(np.log(error + 1e-30) for error in errors(sample, scales)))

    if min(errors(rows, None, activations=False)) <= 1e-10 * energy:
        return None, 0.0  # a width rebuilds these weights exactly (on its grid): keep them there
    best: tuple[np.ndarray | None, float, float] = (None, 0.0, loss(rows, None))
    floor = np.maximum(absmax, absmax[absmax > 0].min() if np.any(absmax > 0) else 1.0)
    weight_floor = np.maximum(peak, peak[peak > 0].min() if np.any(peak > 0) else 1.0)
    for alpha in alphas:
        scales = floor ** alpha / weight_floor ** (1 - alpha)
        scales = (scales / np.exp(np.log(scales).mean())).astype(np.float32)
        trial = loss(rows, scales)
        if trial < best[2]:
            best = (scales, float(alpha), trial)
    scales, alpha, _ = best
    if scales is not None and held_out is not None and len(held_out) and loss(held_out, scales) >= loss(held_out, None):
        return None, 0.0
    return scales, alpha


def _block_error(values: np.ndarray, mask: np.ndarray, scales: np.ndarray, zero: np.ndarray, bits: int,
                 p: float = 2.0, importance: np.ndarray | None = None) -> np.ndarray:
    codes = round_codes(values, mask, scales, zero, bits).astype(np.float32)
    codes -= zero[..., None]
    codes *= scales[..., None]
    error = np.abs(values - codes)
    if p == 2.0:
        error *= error
    elif p != 1.0:
        error **= p
    return (error * (mask if importance is None else mask * importance)).sum(axis=-1)


def _hqq(values: np.ndarray, mask: np.ndarray, scales: np.ndarray, zero: np.ndarray, bits: int,
         form: str, *, p: float = 0.7, beta: float = 10.0, kappa: float = 1.01, rounds: int = 20,
         importance: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    levels = (1 << bits) - 1
    if form != "float":  # no free zero point: search each block's scale (the zero point stays)
        best_scales, best = scales, _block_error(values, mask, scales, zero, bits, importance=importance)
        for factor in np.linspace(1.0, 0.72, 8)[1:]:
            trial = (scales * factor).astype(np.float32)
            error = _block_error(values, mask, trial, zero, bits, importance=importance)
            better = error < best
            best_scales, best = np.where(better, trial, best_scales), np.where(better, error, best)
        return best_scales.astype(np.float32), zero
    s = scales[..., None].astype(np.float32)
    z = zero.astype(np.float32)
    weight = mask.astype(np.float32)
    count = np.maximum(weight.sum(axis=-1), 1.0)
    # Rounds are kept by their mean |error| per block, as HQQ's own early stopping does.
    best_z, best = z.copy(), _block_error(values, mask, scales, z, bits, 1.0)
    for _ in range(rounds):
        q = values / s
        q += z[..., None]
        np.clip(np.rint(q, out=q), 0, levels, out=q)
        residual = values - s * (q - z[..., None])
        magnitude = np.abs(residual)
        np.maximum(magnitude, 1e-12, out=magnitude)
        shrink = magnitude ** np.float32(p - 1)
        shrink /= np.float32(beta)
        np.subtract(magnitude, shrink, out=shrink)
        np.maximum(shrink, 0, out=shrink)
        shrunk = np.copysign(shrink, residual)
        q -= (values - shrunk) / s
        z = ((q * weight).sum(axis=-1) / count).astype(np.float32)
        beta *= kappa
        error = _block_error(values, mask, scales, z, bits, 1.0)
        better = error < best
        best_z, best = np.where(better, z, best_z), np.where(better, error, best)
    return scales, best_z.astype(np.float32)


def _gptq(weight: np.ndarray, hessian: np.ndarray, *, bits: int, block_size: int, form: str,
          damp: float = 0.01, act_order: bool = True) -> BlockQuantized:
    k, n = weight.shape
    blocks = -(-k // block_size)
    levels = (1 << bits) - 1
    h = np.array(hessian, np.float64, copy=True)
    w = np.array(weight, np.float64, copy=True)
    dead = np.diag(h) <= 0
    h[dead, dead] = 1.0
    w[dead] = 0.0
    zeros_dtype = np.uint8 if form != "float" else np.float32
    scales = np.zeros((n, blocks), np.float32)
    zeros = np.zeros((n, blocks), zeros_dtype)
    if act_order:  # static groups: every block's grid from the original weight, then rows by importance
        values, mask = split_blocks(weight, block_size)
        scales, zeros = grid(values, mask, bits, form)
        if form != "float":
            scales, zeros = _hqq(values, mask, scales, zeros, bits, form)
        order = np.argsort(-np.diag(h), kind="stable")
    else:
        order = np.arange(k)
    h = h[order][:, order]
    w = w[order]
    h += np.eye(k) * damp * float(np.mean(np.diag(h)))
    try:
        upper = np.linalg.cholesky(np.linalg.inv(h)).T  # H⁻¹ = Uᵀ U
    except np.linalg.LinAlgError:
        h += np.eye(k) * float(np.mean(np.diag(h)))
        upper = np.linalg.cholesky(np.linalg.inv(h)).T
    codes = np.zeros((n, blocks, block_size), np.uint8)
    lazy = max(128 // block_size, 1) * block_size
    for start in range(0, k, lazy):
        stop = min(start + lazy, k)
        chunk = w[start:stop].copy()
        errors = np.zeros_like(chunk)
        for i in range(stop - start):
            row = int(order[start + i])
            b, j = divmod(row, block_size)
            if not act_order and j == 0:  # the block's grid from its rows as updated so far
                rows = chunk[i:i + block_size]
                values = np.zeros((n, 1, block_size), np.float32)
                values[:, 0, : len(rows)] = rows.T
                block_mask = (np.arange(block_size) < len(rows))[None, :]
                s_, z_ = grid(values, block_mask, bits, form)
                if form != "float":  # the scale by least squared error among shrink factors
                    s_, z_ = _hqq(values, block_mask, s_, z_, bits, form)
                scales[:, b], zeros[:, b] = s_[:, 0], z_[:, 0]
            s, z = scales[:, b].astype(np.float64), zeros[:, b].astype(np.float64)
            q = np.clip(np.rint(chunk[i] / s + z), 0, levels)
            codes[:, b, j] = q.astype(np.uint8)
            error = (chunk[i] - s * (q - z)) / upper[start + i, start + i]
            chunk[i + 1:] -= np.outer(upper[start + i, start + i + 1:stop], error)
            errors[i] = error
        w[stop:] -= upper[start:stop, stop:].T @ errors
    if k % block_size:  # the tail block's padding: codes at the zero point (they rebuild to 0)
        codes[:, -1, k % block_size:] = np.clip(np.rint(zeros[:, -1]), 0, levels).astype(np.uint8)[:, None]
    return BlockQuantized(codes, scales, zeros.astype(zeros_dtype), bits, block_size, k)
