"""The forms onnxruntime (or a standard runtime) reads block codes in, written into the graph.

* ``encode_matmul``: a MatMul's weight → ``com.microsoft.MatMulNBits`` (packed codes, scales,
  packed integer zero points, or float zero points as the kernel's input, or as the separate
  offset term ``(A·P)·O`` served by the fast symmetric kernel: see ``quantize/blockwise.py``);
* ``encode_table``: an embedding table → ``GatherBlockQuantized``, and a tied LM head reading it
  transposed → ``MatMulNBits`` on the same codes;
* ``encode_standard``: ``DequantizeLinear`` with ``block_size`` (opset 21) before the float op;
* ``divide_input``: an AWQ input scale, folded into the norm that writes the input or a ``Mul``.

``Encoded`` keeps what one weight became, so a search can swap its codes for another bit width
without rebuilding the graph. The codes themselves are ``blocks.py``'s.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from graphopt.passes.quantize.blocks import BlockQuantized
from graphopt.passes.naming import unique_value_name
from graphopt.passes.weights import WeightUse, first_consumer, initializer, replace_output

NORM_WEIGHTS = {"SimplifiedLayerNormalization": (1, None), "SkipSimplifiedLayerNormalization": (2, None),
                 "RMSNormalization": (1, None), "LayerNormalization": (1, 2), "SkipLayerNormalization": (2, 3)}
"""Norms whose output an AWQ scale can be folded into: (weight input, bias input)."""


class Encoded:
    """The initializers and nodes one layer was encoded into; ``swap`` re-points them at other
    codes of the same form (another bit width) without touching the graph's structure."""

    def __init__(self, node: ir.Node, codes: ir.Value, scales: ir.Value, zero_points: ir.Value | None,
                 offsets: ir.Value | None, readers: tuple[ir.Node, ...] = (), added: tuple[ir.Node, ...] = ()) -> None:
        self.node, self.codes, self.scales = node, codes, scales
        self.zero_points, self.offsets, self.readers = zero_points, offsets, readers
        self.added = added or (node,)  # every node the encoding added, the one giving the result last

    def set_level(self, level: int) -> None:
        for node in (self.node, *self.readers):
            if node.op_type == "MatMulNBits":
                node.attributes["accuracy_level"] = ir.AttrInt64("accuracy_level", level)

    def swap(self, quantized: BlockQuantized, level: int) -> None:
        self.codes.const_value = ir.tensor(quantized.packed_codes(), name=self.codes.name)
        self.scales.const_value = ir.tensor(quantized.scales, name=self.scales.name)
        if self.zero_points is not None:
            self.zero_points.const_value = ir.tensor(quantized.packed_zero_points(), name=self.zero_points.name)
        if self.offsets is not None:  # symmetric codes (8 bits) add nothing: zeros of the term's own shape
            shape = self.offsets.const_value.shape.numpy()
            offsets = np.zeros(shape, np.float16) if quantized.symmetric else quantized.offsets().astype(np.float16)
            self.offsets.const_value = ir.tensor(offsets, name=self.offsets.name)
        for node in (self.node, *self.readers):
            node.attributes["bits"] = ir.AttrInt64("bits", quantized.bits)
            node.attributes["block_size"] = ir.AttrInt64("block_size", quantized.block_size)
        self.set_level(level)


def drop_zero_terms(graph: ir.Graph, encoded: Encoded) -> None:
    """A layer whose codes ended symmetric (8 bits, after a search swapped widths in place) reads
    no zero points and adds no offset term: both leave the graph (they were exact no-ops)."""
    node = encoded.node
    if encoded.zero_points is not None:
        node.resize_inputs(3)
        if not encoded.zero_points.uses():
            graph.initializers.pop(encoded.zero_points.name, None)
        encoded.zero_points = None
    if encoded.offsets is not None:
        inputs = {id(v): v for n in encoded.added[1:] for v in n.inputs if v is not None and v.is_initializer()}
        take_over(graph, encoded.added[-1], node.outputs[0])  # removes the Add that gave the result
        for extra in reversed(encoded.added[1:-1]):
            graph.remove(extra, safe=True)
        for value in inputs.values():
            if not value.uses():
                graph.initializers.pop(value.name, None)
        encoded.offsets, encoded.added = None, (node,)


def table_block(width: int, block_size: int) -> int | None:
    """The largest power-of-two block from 16 up to ``block_size`` that divides a table's width:
    GatherBlockQuantized returns whole blocks, so a table's rows must hold whole blocks."""
    block = block_size
    while block >= 16:
        if width % block == 0:
            return block
        block //= 2
    return None


def matmul_nbits(inputs: list[ir.Value | None], quantized: BlockQuantized, n: int, level: int, name: str) -> ir.Node:
    return ir.node("MatMulNBits", inputs, {"K": quantized.k, "N": n, "bits": quantized.bits,
                                           "block_size": quantized.block_size, "accuracy_level": level},
                   domain="com.microsoft", name=name)


def encode_matmul(graph: ir.Graph, use: WeightUse, quantized: BlockQuantized, level: int, zero_points: str) -> Encoded:
    """Replace the MatMul of ``use`` by MatMulNBits reading ``quantized`` (plus the offset term)."""
    node = use.node
    name = use.weight.name or "weight"
    n = quantized.scales.shape[0]
    codes = initializer(graph, f"{name}_q", quantized.packed_codes())
    scales = initializer(graph, f"{name}_scales", quantized.scales)
    inputs: list[ir.Value | None] = [node.inputs[0], codes, scales]
    zp = offsets = None
    float_zero = quantized.zero_points.dtype != np.uint8
    if zero_points == "float" and float_zero or not float_zero and not quantized.symmetric:
        zp = initializer(graph, f"{name}_zero_points", quantized.packed_zero_points())
        inputs.append(zp)
    fused = matmul_nbits(inputs, quantized, n, level, node.name or f"{name}_matmul_nbits")
    added = [fused]
    result = fused.outputs[0]
    if zero_points == "offset" and float_zero:
        offsets = initializer(graph, f"{name}_offsets", quantized.offsets().astype(np.float16))
        sums = ir.node("MatMul", [node.inputs[0], block_sums(graph, quantized.k, quantized.block_size)],
                       name=f"{fused.name}_block_sums")
        widened = ir.node("Cast", [offsets], {"to": ir.DataType.FLOAT}, name=f"{fused.name}_offsets_f32")
        term = ir.node("MatMul", [sums.outputs[0], widened.outputs[0]], name=f"{fused.name}_offset_term")
        total = ir.node("Add", [result, term.outputs[0]], name=f"{fused.name}_plus_offsets")
        added += [sums, widened, term, total]
        result = total.outputs[0]
    for new in added:
        graph.insert_before(node, new)
    take_over(graph, node, result)
    if not use.weight.uses():
        graph.initializers.pop(use.weight.name, None)
    return Encoded(fused, codes, scales, zp, offsets, added=tuple(added))


def encode_standard(graph: ir.Graph, use: WeightUse, quantized: BlockQuantized, *, table: bool) -> None:
    """DequantizeLinear(codes, scales[, zero points], axis, block_size) in front of the weight's
    readers: int4/int8 codes when symmetric, uint4/uint8 with zero points otherwise. A ``table``
    (an embedding table, or one shared with the head) is [V, H] with blocks along H."""
    import ml_dtypes

    name = use.weight.name or "weight"
    codes = quantized.codes.reshape(quantized.codes.shape[0], -1)[:, : quantized.k]  # [N, K]
    symmetric = quantized.symmetric
    signed = {4: ml_dtypes.int4, 8: np.int8}[quantized.bits]
    unsigned = {4: ml_dtypes.uint4, 8: np.uint8}[quantized.bits]
    if symmetric:
        values = (codes.astype(np.int16) - quantized.half).astype(signed)
    else:
        values = codes.astype(unsigned)
    # A table is [V, H] with blocks along H (axis 1); a MatMul weight is [K, N], blocks along K (axis 0).
    data = values if table else values.T
    scales = quantized.scales if table else quantized.scales.T
    inputs = [initializer(graph, f"{name}_q", np.ascontiguousarray(data)),
              initializer(graph, f"{name}_scales", np.ascontiguousarray(scales))]
    if not symmetric:
        zero = quantized.zero_points if table else quantized.zero_points.T
        inputs.append(initializer(graph, f"{name}_zero_points", np.ascontiguousarray(zero.astype(unsigned))))
    dequantized = ir.node("DequantizeLinear", inputs, {"axis": 1 if table else 0, "block_size": quantized.block_size},
                          name=f"{name}_dequantize")
    dequantized.outputs[0].name = f"{name}_dequantized"
    graph.insert_before(first_consumer(use.weight, graph), dequantized)
    use.weight.replace_all_uses_with(dequantized.outputs[0])
    graph.initializers.pop(use.weight.name, None)


def block_sums(graph: ir.Graph, k: int, block_size: int) -> ir.Value:
    """P [K, blocks]: 1 where row k lies in block b (shared by every layer with this K)."""
    name = f"blockwise_sums_{k}x{block_size}"
    if name in graph.initializers:
        return graph.initializers[name]
    blocks = -(-k // block_size)
    matrix = np.zeros((k, blocks), np.float32)
    matrix[np.arange(k), np.arange(k) // block_size] = 1.0
    return initializer(graph, name, matrix)


def encode_table(graph: ir.Graph, use: WeightUse, quantized: BlockQuantized, level: int,
                 heads: tuple[ir.Node, ...]) -> Encoded:
    """The embedding table → GatherBlockQuantized on its [V, H] codes; a tied head's
    FusedMatMul(transB) (``heads``) → MatMulNBits on the same codes and scales."""
    name = use.weight.name or "table"
    vocab = use.weight.const_value.shape[0]
    codes = initializer(graph, f"{name}_q", quantized.packed_codes())
    scales = initializer(graph, f"{name}_scales", quantized.scales)
    flat_shape = initializer(graph, f"{name}_q_shape", np.array([vocab, -1], np.int64))
    flat = ir.node("Reshape", [codes, flat_shape], name=f"{name}_q_rows")
    graph.insert_before(first_consumer(use.weight, graph), flat)
    readers = []
    for gather, index in list(use.weight.uses()):
        if gather.op_type != "Gather":
            continue
        new = ir.node("GatherBlockQuantized", [flat.outputs[0], gather.inputs[1], scales],
                      {"gather_axis": 0, "quantize_axis": 1, "block_size": quantized.block_size,
                       "bits": quantized.bits}, domain="com.microsoft", name=gather.name or f"{name}_gather")
        graph.insert_before(gather, new)
        rows = new.outputs[0]
        if quantized.input_scales is not None:  # codes of E·diag(s): each row read is divided back by s
            inverse = initializer(graph, f"{name}_inverse_scales", (1.0 / quantized.input_scales).astype(np.float32))
            divide = ir.node("Mul", [rows, inverse], name=f"{new.name}_unscaled")
            graph.insert_before(gather, divide)
            rows = divide.outputs[0]
        take_over(graph, gather, rows)
        readers.append(new)
    main = readers[0]
    for head in heads:
        fused = matmul_nbits([head.inputs[0], codes, scales], quantized, vocab, level, head.name or f"{name}_head")
        graph.insert_before(head, fused)
        take_over(graph, head, fused.outputs[0])
        readers.append(fused)
    graph.initializers.pop(use.weight.name, None)
    return Encoded(main, codes, scales, None, None, tuple(readers[1:]))


def take_over(graph: ir.Graph, node: ir.Node, result: ir.Value) -> None:
    """``result`` replaces ``node``'s output (its readers, name and type where it had one)."""
    output = node.outputs[0]
    if output.dtype is not None:  # an intermediate value may carry no type: leave the new one untyped too
        result.dtype = output.dtype
    if output.shape is not None:
        result.shape = output.shape
    replace_output(graph, node, result, "replaced")


def reads_transposed(node: ir.Node) -> bool:
    """A FusedMatMul(A, T, transB=1) with nothing else set: A · Tᵀ, the tied LM head."""
    if node.op_type != "FusedMatMul" or node.domain != "com.microsoft":
        return False
    attrs = node.attributes
    return (attrs.get_int("transB", 0) == 1 and attrs.get_int("transA", 0) == 0
            and attrs.get_int("transBatchA", 0) == 0 and attrs.get_int("transBatchB", 0) == 0
            and attrs.get_float("alpha", 1.0) == 1.0)


def divide_input(graph: ir.Graph, value: ir.Value, nodes: list[ir.Node], scales: np.ndarray) -> None:
    """Make ``nodes`` read ``value`` / ``scales`` (along its last axis): the norm that writes it
    takes the division into its weight (and bias) when it feeds nothing else; else a Mul by 1/s."""
    producer = value.producer()
    inputs = NORM_WEIGHTS.get(producer.op_type) if producer is not None and value.index() == 0 else None
    if inputs is not None and {id(node) for node, _ in value.uses()} == {id(node) for node in nodes}:
        params = [producer.inputs[i] if i is not None and i < len(producer.inputs) else None for i in inputs]
        if params[0] is not None and all(
                p is None or p.const_value is not None and len(p.uses()) == 1
                and tuple(p.const_value.shape.numpy()) == (scales.size,) for p in params):
            for param in params:
                if param is not None:
                    values = param.const_value.numpy()
                    param.const_value = ir.tensor((values / scales).astype(values.dtype), name=param.name)
            return
    dtype = value.dtype.numpy() if value.dtype is not None else np.float32
    factors = initializer(graph, f"{value.name}_awq_inverse_scales", (1.0 / scales).astype(dtype))
    divide = ir.node("Mul", [value, factors], name=f"{value.name}_awq_scaled")
    graph.insert_before(first_consumer(value, graph), divide)
    for node in nodes:
        node.replace_input_with(0, divide.outputs[0])


def restore_float(graph: ir.Graph, encoded: Encoded, weight: ir.TensorProtocol, weight_name: str) -> None:
    """A MatMul ``encode_matmul`` replaced, back in float: ``MatMul(A, weight)`` takes over the
    result, and the nodes and initializers only the encoding used are removed. ``encoded`` may
    be of another copy of ``graph`` (``ir.Model.clone``): its nodes are found here by name."""
    by_name = {node.name: node for node in graph}
    added = [by_name[node.name] for node in encoded.added]
    fused, last = added[0], added[-1]
    # what only the encoding read (codes, scales, zero points, offsets), before removing its nodes
    # detaches them from their inputs
    inputs = {id(v): v for node in added for v in node.inputs if v is not None and v.is_initializer()}
    value = ir.Value(name=unique_value_name(graph, weight_name), const_value=weight)
    graph.register_initializer(value)
    matmul = ir.node("MatMul", [fused.inputs[0], value], name=fused.name)
    graph.insert_before(fused, matmul)
    take_over(graph, last, matmul.outputs[0])
    for node in reversed(added[:-1]):
        graph.remove(node, safe=True)
    for value in inputs.values():
        if not value.uses():
            graph.initializers.pop(value.name, None)


def fold_divisions(graph: ir.Graph) -> int:
    """Each ``divide_input`` Mul by 1/s whose input is a gated product ``act(gate) · up`` (a SwiGLU's
    down projection reads one) goes into the layer computing ``up``: its output columns scaled by
    1/s (a MatMulNBits' block scales and bias, or a float MatMul's weight columns; after a Split
    of packed gate/up, that part's columns), which is the same function with one op fewer per
    layer. Left where the producer's columns cannot take it alone (shared, an offset term after
    it, another reader). Returns how many were folded."""
    folded = 0
    for node in list(graph):
        if node.op_type != "Mul" or node.domain not in ("", "ai.onnx") or not node.name.endswith("_awq_scaled"):
            continue
        product, factors = node.inputs
        gate_up = product.producer() if product is not None else None
        if (factors is None or factors.const_value is None or len(factors.const_value.shape) != 1
                or gate_up is None or gate_up.op_type != "Mul" or len(product.uses()) != 1):
            continue
        for up in gate_up.inputs:
            if up is not None and len(up.uses()) == 1 and _scale_columns(graph, up, factors.const_value.numpy()):
                take_over(graph, node, product)  # the Mul goes
                if not factors.uses():
                    graph.initializers.pop(factors.name, None)
                folded += 1
                break
    return folded


def _scale_columns(graph: ir.Graph, value: ir.Value, factors: np.ndarray) -> bool:
    """Scale the columns of the linear layer whose output (or a Split part of it) is ``value`` by
    ``factors`` in place; False, with nothing changed, where that is not one layer's own columns."""
    producer, start, whole = value.producer(), 0, True
    if producer is not None and producer.op_type == "Split" and producer.domain in ("", "ai.onnx"):
        axis = producer.attributes.get_int("axis", 0)
        sizes = producer.inputs[1].const_value.numpy() if len(producer.inputs) > 1 and \
            producer.inputs[1] is not None and producer.inputs[1].const_value is not None else \
            np.asarray(producer.attributes.get_ints("split", ()) or (), np.int64)
        source = producer.inputs[0]
        rank = len(source.shape) if source is not None and source.shape is not None else None
        if not len(sizes) or axis != -1 and (rank is None or axis != rank - 1):
            return False
        start = int(sum(sizes[: value.index()]))
        if int(sizes[value.index()]) != factors.size:
            return False
        value, producer, whole = source, source.producer(), False
    if producer is None or len(value.uses()) != 1:
        return False
    width = slice(start, start + factors.size)
    columns = producer.attributes.get_int("N", 0) if producer.op_type == "MatMulNBits" else (
        producer.inputs[1].const_value.shape[-1] if producer.op_type == "MatMul" and producer.inputs[1] is not None
        and producer.inputs[1].const_value is not None else 0)
    if whole and factors.size != columns:  # not a Split part: the factors must cover every column
        return False
    if producer.op_type == "MatMulNBits" and producer.domain == "com.microsoft":
        scales, bias = producer.inputs[2], producer.inputs[5] if len(producer.inputs) > 5 else None
        n = producer.attributes.get_int("N")
        if scales is None or scales.const_value is None or len(scales.uses()) != 1 or start + factors.size > n:
            return False
        params = [p for p in (scales, bias) if p is not None]
        if any(p.const_value is None or len(p.uses()) != 1 for p in params):
            return False
        for param in params:
            values = param.const_value.numpy().copy()
            rows = values.reshape(n, -1)  # [N, blocks] (scales), [N] (bias)
            rows[width] *= factors.reshape(-1, 1).astype(values.dtype)
            param.const_value = ir.tensor(values, name=param.name)
        return True
    if producer.op_type == "MatMul" and producer.domain in ("", "ai.onnx"):
        weight = producer.inputs[1]
        if weight is None or weight.const_value is None or len(weight.uses()) != 1:
            return False
        values = weight.const_value.numpy()
        if values.ndim != 2 or start + factors.size > values.shape[1]:
            return False
        values = values.copy()
        values[:, width] *= factors.astype(values.dtype)
        weight.const_value = ir.tensor(values, name=weight.name)
        return True
    return False
