"""`quantize-blockwise`: MatMul weights → onnxruntime's ``com.microsoft.MatMulNBits``, 4 or 8
bits in blocks of ``block_size`` values along K, round to nearest (RTN).

For a weight W [K, N] (``Y = A @ W``), each output column n and block b of ``block_size``
rows holds codes q ∈ [0, 2^bits) with

    W[k, n] ≈ (q[k, n] - z[b, n]) · s[b, n]

* symmetric: z = 2^(bits-1) and s = max|W_block| / (2^(bits-1) − 1), so that ±max land on codes
  (for 4 bits codes 1..15 are used, −max on 1 and +max on 15);
* asymmetric: s = (max − min) / (2^bits − 1), z = round(−min / s), clipped to the code range;
  the grid then holds min and max up to rounding; with ``float_zero_points`` z is a float
  and the grid runs exactly from the block's min (code 0) to its max (code 2^bits − 1).

The stored layout is what onnxruntime's kernel reads: ``B`` uint8 [N, blocks, block_size·bits/8]
with codes packed low bits first along K (for 4 bits: the even k in the low nibble), ``scales``
[N · blocks] float, ``zero_points`` uint8 [N · ceil(blocks·bits/8)] packed the same way (absent
when symmetric: the kernel's default is 2^(bits-1)). A K that is not a multiple of the block
size is padded with zero codes at the zero point (they dequantize to 0 and multiply nothing).

This is the foundation of issue #21 (the LM head, the embedding table, better-than-RTN scales and
bits per layer under a budget are the next steps).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np
import onnx_ir as ir

from graphopt.passes.base import GraphoptPass, PassContext, PassResult
from graphopt.passes.registry import register
from graphopt.passes.weights import WeightUse, initializer, weight_uses

_BLOCK_SIZES = (16, 32, 64, 128, 256)


@dataclasses.dataclass(frozen=True)
class BlockQuantized:
    codes: np.ndarray  # uint8 [N, blocks, block_size], one code per value (unpacked)
    scales: np.ndarray  # float32 [N, blocks]
    zero_points: np.ndarray  # uint8 [N, blocks], or float32 (a float offset per block)
    bits: int
    block_size: int
    k: int

    def dequantize(self) -> np.ndarray:
        """W [K, N] as the kernel rebuilds it."""
        values = (self.codes.astype(np.float32) - self.zero_points[..., None]) * self.scales[..., None]
        return values.reshape(values.shape[0], -1)[:, : self.k].T

    def packed_codes(self) -> np.ndarray:
        """B: uint8 [N, blocks, block_size · bits / 8], low bits first along K."""
        return pack(self.codes, self.bits)

    def packed_zero_points(self) -> np.ndarray:
        """uint8 [N · ceil(blocks · bits / 8)]: each column's zero points packed like the codes;
        float zero points are stored as they are, [N · blocks]."""
        if self.zero_points.dtype != np.uint8:
            return self.zero_points.reshape(-1).astype(np.float32)
        n, blocks = self.zero_points.shape
        per_byte = 8 // self.bits
        padded = np.full((n, -(-blocks // per_byte) * per_byte), 0, np.uint8)
        padded[:, :blocks] = self.zero_points
        return pack(padded, self.bits).reshape(-1)


def pack(codes: np.ndarray, bits: int) -> np.ndarray:
    """Pack the last axis ``8 // bits`` codes per byte, the first code in the lowest bits."""
    per_byte = 8 // bits
    grouped = codes.astype(np.uint8).reshape(*codes.shape[:-1], codes.shape[-1] // per_byte, per_byte)
    shifts = (np.arange(per_byte, dtype=np.uint8) * bits).astype(np.uint8)
    return np.bitwise_or.reduce(grouped << shifts, axis=-1).astype(np.uint8)


def quantize_blocks(weight: np.ndarray, *, bits: int, block_size: int, symmetric: bool,
                    float_zero_points: bool = False) -> BlockQuantized:
    """Round-to-nearest blockwise codes of ``weight`` [K, N] along K. ``float_zero_points``
    (asymmetric only): each block's grid runs exactly from its min to its max (a float offset, as
    GGUF's Q4_1 stores), instead of an integer zero point on a range that includes 0."""
    k, n = weight.shape
    blocks = -(-k // block_size)
    columns = np.zeros((n, blocks * block_size), np.float32)
    columns[:, :k] = weight.T
    values = columns.reshape(n, blocks, block_size)
    if k % block_size:  # the tail block's padding must not widen its range
        tail = np.zeros(block_size, bool)
        tail[: k - (blocks - 1) * block_size] = True
        mask = np.ones((blocks, block_size), bool)
        mask[-1] = tail
    else:
        mask = np.ones((blocks, block_size), bool)
    levels = (1 << bits) - 1
    if symmetric:
        half = 1 << (bits - 1)
        magnitude = np.where(mask, np.abs(values), 0).max(axis=-1)
        scales = magnitude / (half - 1)
        zero = np.full((n, blocks), half, np.uint8)
    elif float_zero_points:
        low = np.where(mask, values, np.inf).min(axis=-1)
        high = np.where(mask, values, -np.inf).max(axis=-1)
        scales = np.where(high > low, (high - low) / levels, 1.0).astype(np.float32)
        zero = (-low / scales).astype(np.float32)  # code 0 is the block's min, code 2^bits - 1 its max
    else:
        low = np.minimum(np.where(mask, values, np.inf).min(axis=-1), 0.0)
        high = np.maximum(np.where(mask, values, -np.inf).max(axis=-1), 0.0)
        scales = (high - low) / levels
        zero = np.clip(np.rint(-low / np.where(scales > 0, scales, 1.0)), 0, levels).astype(np.uint8)
    scales = np.where(scales > 0, scales, 1.0).astype(np.float32)
    codes = np.clip(np.rint(values / scales[..., None] + zero[..., None]), 0, levels)
    codes = np.where(mask, codes, np.clip(np.rint(zero), 0, levels)[..., None]).astype(np.uint8)
    return BlockQuantized(codes, scales, zero, bits, block_size, k)


def encode_matmul_nbits(graph: ir.Graph, use: WeightUse, quantized: BlockQuantized, accuracy_level: int) -> None:
    """Replace the MatMul of ``use`` by MatMulNBits reading ``quantized``."""
    node = use.node
    name = use.weight.name or "weight"
    n = quantized.scales.shape[0]
    inputs = [node.inputs[0], initializer(graph, f"{name}_q{quantized.bits}", quantized.packed_codes()),
              initializer(graph, f"{name}_scales", quantized.scales.reshape(-1))]
    if quantized.zero_points.dtype != np.uint8 or not np.all(quantized.zero_points == 1 << (quantized.bits - 1)):
        inputs.append(initializer(graph, f"{name}_zero_points", quantized.packed_zero_points()))
    fused = ir.node("MatMulNBits", inputs, {"K": quantized.k, "N": n, "bits": quantized.bits,
                                             "block_size": quantized.block_size, "accuracy_level": accuracy_level},
                    domain="com.microsoft", name=node.name or f"{name}_matmul_nbits")
    graph.insert_before(node, fused)
    output, result = node.outputs[0], fused.outputs[0]
    if output.dtype is not None:  # an intermediate value may carry no type: leave the new one untyped too
        result.dtype = output.dtype
    if output.shape is not None:
        result.shape = output.shape
    output.replace_all_uses_with(result, replace_graph_outputs=True)
    graph.remove(node, safe=True)
    result.name = output.name  # the tensor keeps its name (a graph output's is its contract)
    if not use.weight.uses():
        graph.initializers.pop(name, None)


@register
class QuantizeBlockwisePass(GraphoptPass, name="quantize-blockwise",
                            summary="MatMul weights → MatMulNBits: 4 or 8 bits in blocks along K (round to nearest), ~7× smaller at 4 bits"):
    class Options:
        bits: int = 4
        """4 or 8 bits per weight."""
        block_size: int = 32
        """Values per block along K (16, 32, 64, 128 or 256); each block has its own scale."""
        symmetric: bool = True
        """A zero point of 2^(bits-1) for every block (none stored) instead of one fitted per block."""
        float_zero_points: bool = False
        """Asymmetric: a float offset per block, so the grid spans exactly the block's min to max
        (exact on GGUF Q4_1 weights; 4 more bytes per block than a packed integer zero point)."""
        accuracy_level: int = 0
        """onnxruntime's compute type: 0 the kernel's default, 1 fp32, 2 fp16, 3 bf16, 4 int8 activations."""
        min_elements: int = 1024
        """Weights with fewer elements stay float."""
        nodes: tuple[str, ...] = ()
        """Only these MatMul nodes (empty: all)."""

    def __init__(self, **options: Any) -> None:
        from graphopt.errors import RecipeError

        super().__init__(**options)
        if self.options.bits not in (4, 8):
            raise RecipeError(f"pass '{self.name}': 'bits' must be 4 or 8, got {self.options.bits}")
        if self.options.block_size not in _BLOCK_SIZES:
            raise RecipeError(f"pass '{self.name}': 'block_size' must be one of {_BLOCK_SIZES}, "
                              f"got {self.options.block_size}")
        if self.options.accuracy_level not in range(5):
            raise RecipeError(f"pass '{self.name}': 'accuracy_level' must be 0..4, got {self.options.accuracy_level}")

    def apply(self, model: ir.Model, context: PassContext) -> PassResult:
        graph = model.graph
        uses, skipped = weight_uses(graph, ("MatMul",), self.options.min_elements, context.exclude)
        wanted = set(self.options.nodes)
        layers = []
        for use in uses:
            if wanted and use.node.name not in wanted:
                continue
            if any(user.op_type == "Gather" for user, _ in use.weight.uses()):
                skipped[use.name] = "weight tied to an embedding table: kept float (a tied LM head is never silently 4-bit)"
                continue
            weight = use.weight.const_value.numpy()
            if use.input_index != 1 or weight.ndim != 2:
                skipped[use.name] = "weight is not a 2-D right-hand MatMul input"
                continue
            quantized = quantize_blocks(weight, bits=self.options.bits, block_size=self.options.block_size,
                                        symmetric=self.options.symmetric,
                                        float_zero_points=self.options.float_zero_points)
            error = np.linalg.norm(quantized.dequantize() - weight) / max(float(np.linalg.norm(weight)), 1e-12)
            encode_matmul_nbits(graph, use, quantized, self.options.accuracy_level)
            layers.append({"node": use.name, "weight": use.weight.name, "shape": list(weight.shape),
                           "bits": self.options.bits, "block_size": self.options.block_size,
                           "relative_error": float(error)})
        if layers and "com.microsoft" not in model.opset_imports:
            model.opset_imports["com.microsoft"] = 1
        return PassResult(model, modified=bool(layers), changes={"weights encoded": len(layers)},
                          details={"layers": layers, "skipped": skipped})
