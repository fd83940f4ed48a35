"""`quantize-blockwise`: MatMul weights → onnxruntime's ``com.microsoft.MatMulNBits`` (4 or 8 bits
in blocks along K), the embedding table → ``GatherBlockQuantized``, a tied LM head at its own
precision; bits per layer chosen under a text budget when calibration text is given.

The codes and the methods that choose them (round to nearest, HQQ, AWQ scales, GPTQ) are in
``blocks.py``. Here: which weights, which form the runtime reads, how many bits each layer gets,
and where calibration is measured and judged.

**Calibration** (``method`` awq, gptq, or auto with calibration): E[x xᵀ] of each layer's input
on the calibration windows fits the methods; a second one, on the windows set aside for judging
(a decoder's calibration text), decides between them, so that a method only wins where it also
wins on text it was not fitted to: AWQ scales only where their held-out output error is lower
than plain rounding's, GPTQ only where it beats rounding to nearest on held-out text. The AWQ
scales of the layers reading one input are folded into the norm that writes it (its weight, and
bias, divided by s) when that norm feeds nothing else; otherwise a ``Mul`` by 1/s is inserted.

**Smoothing** (``smoothing``, with any calibration, where a width the layers may take reads int8
activations, ``accuracy_level`` 4): onnxruntime then rounds each row's blocks of the input to 255
levels of their own largest |x|, and an LLM's few outlier channels take those levels from the rest
of their block. SmoothQuant's per-channel scales s = max|x|^α / max|W|^(1−α) move that range into
the weights; per input, α (or none) is chosen by the output error both roundings give on a sample
of calibration rows, for every width the layers may end at (the product of their errors), and kept
only if it also wins on held-out rows. Folded like AWQ's; for a tied LM head, the table holds
E·diag(s) and each row the Gather reads is divided back by s (one Mul).

**Forms of an asymmetric grid** (``zero_points``):

* ``integer``: packed unsigned zero points, onnxruntime's fast kernels;
* ``offset``: a float zero point per block, served fast: the kernel runs the codes as symmetric
  and a separate term adds what that misses, ``Ŵ = s·(q − 2^(bits−1)) + o`` with
  ``o[b, n] = s·(2^(bits−1) − z)``, so ``A·Ŵ = MatMulNBits(A) + (A·P)·O`` where P [K, blocks]
  sums each block of A (shared by every layer of that K) and O [blocks, N] is stored in float16
  (the runtime widens it once, at load). Costs 2 bytes per block and two small MatMuls;
* ``float``: the float zero points as the kernel's own input (onnxruntime has no fast path for
  it: several times slower per token; kept for runtimes that have one);
* ``auto``: each weight kept on the grid it lies on already, rebuilt exactly: the symmetric one
  (a GGUF Q4_0 import: no zero point, no offset term), else float zero points as ``offset`` (a
  Q4_1 import); ``integer`` for the rest (a float checkpoint's).

At 8 bits the codes are symmetric whatever ``zero_points`` says (a zero point buys under one bit
of 256 levels; the int8 kernel then needs no offset term), in blocks of ``eight_bit_block_size``
when set (smaller blocks also round int8 activations finer). A layer a search moved to 8 bits
leaves its zero points and offset term behind once settled.

**The LM head and the embedding table.** A table read by a Gather and, transposed, by the head's
(Fused)MatMul is one set of codes: ``GatherBlockQuantized`` and ``MatMulNBits`` both read it (the
table's [V, H] is the head's [N, K]), at ``head_bits`` (8 by default: never silently 4-bit).
An untied embedding table gets ``head_bits`` too; an untied head likewise (the MatMul computing
``logits``, behind a bias, a logit scale or a soft-cap: ``passes.weights.lm_head``).

**Bits per layer** (``search``): with calibration text (``PassContext.text``) and a text budget,
every layer starts at ``bits``; if the calibration windows set aside for judging miss the budget,
the ladder of ``bit_search.py`` is climbed (float compute per weight shape, 8 bits per layer, then
float weights per layer), fewest rungs first; where even the top misses, the pass says so and the
final verification decides.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any, Literal

import numpy as np
import onnx_ir as ir

from graphopt.passes.base import GraphoptPass, PassContext, PassResult
from graphopt.passes.quantize.block_encodings import (Encoded, divide_input, encode_matmul, encode_standard,
                                                      encode_table, fold_divisions, reads_transposed, table_block)
from graphopt.passes.quantize.bit_search import search_bits
from graphopt.passes.quantize.blocks import (BlockQuantized, activation_loss, awq_scales, on_grid, output_error,
                                             quantize_blocks, relative_loss, smoothing_scales)
from graphopt.passes.quantize.precision import BlockLayer
from graphopt.passes.registry import register
from graphopt.passes.weights import WeightUse, gemm_bias, initializer, lm_head, weight_uses

logger = logging.getLogger(__name__)

# Rows of each layer input kept for SmoothQuant's search (half as many held out).
_SAMPLE_ROWS = 512



@dataclasses.dataclass
class _Layer:
    """One weight to encode: a MatMul's right-hand side, or a tied/untied table."""

    name: str
    use: WeightUse
    tensor: ir.TensorProtocol  # the float weight, in memory or external data (read when needed)
    role: str  # "linear", "head" (untied), "tied" (table + head), "embedding" (untied table)
    bits: int
    hessian: np.ndarray | None = None  # E[x xᵀ] of the input on the calibration windows (fits the methods)
    held_out_hessian: np.ndarray | None = None  # the same on held-out windows (chooses between methods)
    input_scales: np.ndarray | None = None  # AWQ: the codes are of diag(s)·W, the input is divided by s
    alpha: float = 0.0
    heads: tuple[ir.Node, ...] = ()  # tied: the FusedMatMul nodes reading the table transposed
    encoded: dict[int, BlockQuantized] = dataclasses.field(default_factory=dict)
    sensitivity: float = 0.0
    activation_loss: float = 0.0  # what int8 activations cost its output on calibration rows (measured with rows)
    level: int | None = None  # accuracy_level chosen by the search (None: the fastest for its bits)
    methods: dict[int, str] = dataclasses.field(default_factory=dict)  # per bit width, the method that won
    relative_error: float = 0.0
    block_size: int | None = None  # a table's own block (it must divide the table's width), else the pass's
    kept_float: bool = False  # the search kept its float weight (the end of the ladder)
    smoothed: bool = False  # input_scales are SmoothQuant's (int8 activations), not AWQ's
    grid: str | None = None  # zero_points 'auto': the form whose grid the weight lies on already ('' none)
    finer_block: int | None = None  # a head or table kept at its own grid's block: head_block_size (a search rung)

    @property
    def shape(self) -> tuple[int, int]:
        """[K, N] as Y = A @ W reads it."""
        rows, columns = self.tensor.shape
        return (columns, rows) if self.role in ("tied", "embedding") else (rows, columns)

    @property
    def weight(self) -> np.ndarray:
        """The weight [K, N] as float32, read from its tensor each time (a table is transposed):
        only the layer being worked on is in memory."""
        values = np.asarray(self.tensor.numpy(), np.float32)
        return values.T if self.role in ("tied", "embedding") else values

    def release(self) -> None:
        """Unmap an external tensor's file (it was read; nothing keeps its pages resident)."""
        if isinstance(self.tensor, ir.ExternalTensor):
            self.tensor.release()


@register
class QuantizeBlockwisePass(GraphoptPass, name="quantize-blockwise",
                            summary="weights → 4/8-bit blocks (MatMulNBits, GatherBlockQuantized); RTN, HQQ or GPTQ; "
                                    "bits per layer under a text budget; ~6× smaller"):
    role = "compress"

    class Options:
        bits: Literal[4, 8] = 4
        """4 or 8 bits per weight (the layers' starting point when searching)."""
        block_size: Literal[16, 32, 64, 128, 256] = 32
        """Values per block along K (16, 32, 64, 128 or 256); each block has its own scale."""
        eight_bit_block_size: Literal[0, 16, 32, 64, 128, 256] = 0
        """The block of 8-bit layers (head, table, layers a search moves): 0 for ``block_size``.
        With int8 activations each block of the input is rounded to its own range too, so a
        smaller block keeps more of the activations."""
        symmetric: bool = True
        """A zero point of 2^(bits-1) for every block (none stored) instead of one fitted per block."""
        zero_points: Literal["integer", "offset", "float", "auto"] = "integer"
        """Asymmetric only: 'integer' (packed), 'offset' (float, served by a separate term),
        'float' (the kernel's float input: slow on onnxruntime's CPU), or 'auto': the grid a layer's
        weights lie on already, rebuilt exactly (symmetric: a GGUF Q4_0 import; 'offset': Q4_1),
        else 'integer'.
        8-bit layers are symmetric whatever this says."""
        operators: Literal["onnxruntime", "standard"] = "onnxruntime"
        """'onnxruntime' (MatMulNBits, GatherBlockQuantized) or 'standard': DequantizeLinear with
        block_size (opset 21; int4/uint4 codes) before the float op, for runtimes without contrib
        ops (onnxruntime turns DequantizeLinear + MatMul back into MatMulNBits at load)."""
        method: Literal["rtn", "hqq", "awq", "gptq", "auto"] = "auto"
        """'rtn', 'hqq' (data-free; ~10 s per 10M-element weight on 2 cores), 'awq' (activation-aware
        input scales, then rounding), 'gptq' (error-compensating rounding), or 'auto': gptq with
        calibration, else rtn. awq and gptq need calibration; each is kept per layer only where it
        loses less than rounding to nearest on held-out calibration text. Both fit the calibration's
        kind of text: calibrate on the text the model will read."""
        head_bits: Literal[0, 4, 8] = 8
        """The LM head and the embedding table (shared codes when tied): 8, 4, or 0 to keep them float."""
        head_block_size: Literal[0, 16, 32, 64, 128, 256] = 0
        """Their block (0: that of their width): the head is the weight whose rounding text feels
        most, and once a generation's prefill computes one row of logits it costs little time.
        With ``zero_points = "auto"``, a table or head lying exactly on the 8-bit grid of the
        8-bit block already (a GGUF's Q8_0 table) keeps that block, rebuilt exactly, and a text
        search may move it to this block (a rung after float compute, before 8-bit layers): on
        SmolLM2's Q4_1 GGUF the exact table decoded 0.450× fp32 vs 0.479× re-rounded at 16, with
        perplexity 1.0016× vs 1.0027× and agreement 0.972 vs 0.969 on held-out prose; on its
        Q5_0/Q6_K requantization every layer at 8 bits met the search's agreement only with the
        table at 16 (0.9769 vs 0.9729 on the judging windows)."""
        search: bool = True
        """With calibration text and a text budget: 8 bits for the layers that need it, fewest first."""
        eight_bit: tuple[str, ...] = ()
        """MatMul nodes held at 8 bits whatever else is chosen."""
        accuracy_level: Literal[-1, 0, 1, 2, 3, 4] = -1
        """onnxruntime's compute type: 0 default, 1 fp32, 2 fp16, 3 bf16, 4 int8 activations; -1:
        per bit width, the faster of 0 and 4 on this CPU (measured once, cached). A stated level
        is that of the layers at ``bits``; 8-bit ones (head, table, layers a search moves) take
        the faster of 0 and 4."""
        smoothing: bool = True
        """With int8 activations (accuracy level 4) and calibration: per input channel scales that
        move activation outliers into the weights (SmoothQuant), chosen per input by the output
        error of both roundings on calibration rows, kept only where they also win on held-out
        rows; folded into the norm writing the input, else divided out by a Mul."""
        min_elements: int = 1024
        """Weights with fewer elements stay float."""
        nodes: tuple[str, ...] = ()
        """Only these MatMul nodes (empty: all)."""

    def __init__(self, **options: Any) -> None:
        from graphopt.errors import RecipeError

        super().__init__(**options)  # each Literal option checked there
        o = self.options
        if o.operators == "standard" and not o.symmetric and o.zero_points != "integer":
            raise RecipeError(f"pass '{self.name}': standard operators hold integer zero points only "
                              f"(zero_points = 'integer'), got {o.zero_points!r}")

    def needs_calibration(self) -> bool:
        return self.options.method in ("gptq", "awq")

    def searches(self) -> bool:
        return self.options.search

    # -- the run ------------------------------------------------------------------------------

    def apply(self, model: ir.Model, context: PassContext) -> PassResult:
        o = self.options
        graph = model.graph
        # the Gemms this pass would encode (selection, exclusions, size as for MatMuls), as MatMuls
        gemm_uses, _ = weight_uses(graph, ("Gemm",), o.min_elements, context.exclude)
        gemms = _gemms_as_matmuls(graph, [use.node for use in gemm_uses if not o.nodes or use.node.name in o.nodes])
        layers, skipped = self._layers(graph, context)
        rewritten = {"Gemm as MatMul": gemms} if gemms else {}
        if not layers:
            return PassResult(model, modified=bool(gemms), changes={"weights encoded": 0, **rewritten},
                              details={"skipped": skipped})
        method = o.method if o.method != "auto" else \
            ("gptq" if context.text is not None or context.calibration else "rtn")
        snapshots = _Snapshots()
        try:
            result = self._run(model, context, layers, skipped, method, snapshots)
        finally:
            snapshots.close()
        result.changes.update(rewritten)
        return result

    def _run(self, model: ir.Model, context: PassContext, layers: list[_Layer], skipped: dict[str, str], method: str,
             snapshots: _Snapshots) -> PassResult:
        from graphopt.progress import progress

        o = self.options
        graph = model.graph
        if o.operators == "standard" and model.opset_imports.get("", 1) < 21:
            from graphopt.errors import UnsupportedModelError

            raise UnsupportedModelError(f"pass '{self.name}': blocked DequantizeLinear needs opset 21; the model "
                                        f"has {model.opset_imports.get('', 1)} (run upgrade-opset with target = 21)")
        searching = context.text is not None and o.search and o.operators == "onnxruntime"
        reference = snapshots.write(model) if searching else None
        levels = {bits: max(o.accuracy_level, 0) for bits in (4, 8)}
        if o.operators == "onnxruntime" and (o.accuracy_level < 0 or o.bits != 8 and (searching or any(
                layer.bits == 8 for layer in layers))):
            # a stated level is the `bits` layers'; the 8-bit ones (head, table, layers the search
            # moves) take the faster on this CPU (8-bit float compute is ~100× slower per token here)
            levels = {**_accuracy_levels(context, o.block_size),
                      **({o.bits: o.accuracy_level} if o.accuracy_level >= 0 else {})}
        # the widths a layer may end at (the search moves layers to 8 bits), and whether each reads
        # int8 activations: SmoothQuant's scales serve where one does
        widths = sorted({o.bits, 8} if searching else {o.bits})
        smoothing = (o.smoothing and o.operators == "onnxruntime" and any(levels[bits] == 4 for bits in widths)
                     and (context.text is not None or context.calibration is not None))
        samples: dict[str, _InputSample] = {}
        if method in ("gptq", "awq") or smoothing:
            measured = [layer for layer in layers if layer.role == "linear" or smoothing and _input(layer)]
            samples = _measure_inputs(model, measured, context, self.name, reference or snapshots.write(model),
                                      moments=method in ("gptq", "awq"), rows=smoothing)
        readers = _readers(layers, smoothing) if method == "awq" or smoothing else {}
        # One weight at a time: read (external data is mapped, not loaded), quantized, encoded into
        # the graph, unmapped; only the codes stay. A search keeps the codes of each width it tried.
        nodes: dict[int, Encoded] = {}
        for layer in progress(layers, f"{method}: {len(layers)} weights", unit="weight"):
            source = _input(layer)
            group = readers.pop(source.name, None) if source is not None else None
            if group is not None and smoothing:
                head = layer.role != "linear"  # a head keeps its own width
                self._smooth_inputs(graph, group, samples[source.name],
                                    [(bits, levels[bits] == 4, self._form(layer, bits),
                                      layer.block_size or self._block(bits))
                                     for bits in ([layer.bits] if head else widths)])
            elif group is not None:
                self._scale_inputs(graph, group)
            quantized = self._encode_layer(layer, layer.bits, method)
            weight = layer.weight
            # the output loss on the calibration inputs when measured (else the weight's own error)
            layer.sensitivity = relative_loss(quantized, weight, layer.hessian)
            sample = samples.get(source.name) if source is not None and layer.role == "linear" else None
            if sample is not None and sample.rows is not None and sample.rows.rows is not None and quantized.bits == 4:
                layer.activation_loss = activation_loss(quantized, sample.rows.rows, quantized.block_size,
                                                        layer.input_scales)
            error, total = output_error(quantized, weight)
            layer.relative_error = float(np.sqrt(error / max(total, 1e-30)))
            del weight
            if o.operators == "standard":
                encode_standard(graph, layer.use, quantized, table=layer.role in ("tied", "embedding"))
            else:
                nodes[id(layer)] = self._encode(graph, layer, quantized, levels[quantized.bits])
            layer.release()
            if reference is None:  # no search will swap widths: the packed codes in the graph suffice
                layer.encoded.clear()
            del quantized
        if o.operators != "standard" and "com.microsoft" not in model.opset_imports:
            model.opset_imports["com.microsoft"] = 1
        search = None
        if reference is not None:
            search = search_bits(model, layers, nodes, reference, context, bits=o.bits, levels=levels,
                                 encode=lambda layer, bits: self._encode_layer(layer, bits, method),
                                 write=snapshots.write)
        # the codes are final: an input division behind a gated product goes into its up columns
        folded = fold_divisions(graph) if o.operators != "standard" else 0
        table = [BlockLayer(node=layer.name, role=layer.role, shape=layer.shape,
                            bits=32 if layer.kept_float else layer.bits,
                            accuracy_level=0 if layer.kept_float else
                            levels[layer.bits] if layer.level is None else layer.level,
                            block_size=layer.block_size or self._block(layer.bits),
                            method="float" if layer.kept_float else layer.methods[layer.bits],
                            awq_alpha=layer.alpha, relative_error=layer.relative_error,
                            sensitivity=layer.sensitivity) for layer in layers]
        kept = sum(layer.kept_float for layer in layers)
        changes = {"weights encoded": len(layers) - kept, "8-bit": sum(layer.bits == 8 and not layer.kept_float
                                                                      for layer in layers)}
        if kept:
            changes["kept float"] = kept
        if folded:
            changes["input divisions folded into up columns"] = folded
        exhausted = search.exhausted if search is not None else None
        return PassResult(model, modified=True, changes=changes, notes=[exhausted] if exhausted else [],
                          details={"layers": [row.to_dict() for row in table], "skipped": skipped, "method": method,
                                   "accuracy_level": levels, "search": search.to_dict() if search else {}},
                          searched=search is not None, exhausted=exhausted)

    def _layers(self, graph: ir.Graph, context: PassContext) -> tuple[list[_Layer], dict[str, str]]:
        o = self.options
        uses, skipped = weight_uses(graph, ("MatMul", "Gather"), o.min_elements, context.exclude)
        wanted, eight = set(o.nodes), set(o.eight_bit)
        layers: list[_Layer] = []
        head_node = lm_head(graph)
        for use in uses:
            if wanted and use.node.name not in wanted:
                skipped[use.name] = "not selected"
                continue
            table = use.weight.const_value
            if use.kind == "Gather":
                tied = tuple(user for user, index in use.weight.uses() if index == 1 and reads_transposed(user))
                others = [user for user, _ in use.weight.uses() if user.op_type != "Gather" and user not in tied]
                if o.head_bits == 0 or others:
                    skipped[use.name] = "kept float (head_bits = 0)" if o.head_bits == 0 else \
                        "the table has readers other than a Gather and a transposed head"
                    continue
                if any(layer.use.weight is use.weight for layer in layers):
                    continue  # a table read by two Gathers is encoded once
                wanted_block = self._head_block(use.weight.const_value, transposed=True)
                block = table_block(table.shape[1], wanted_block)
                if block is None:
                    skipped[use.name] = (f"table width {table.shape[1]} has no power-of-two block from 16 to "
                                         f"{wanted_block}")
                    continue
                layers.append(_Layer(use.name, use, table, "tied" if tied else "embedding", o.head_bits, heads=tied,
                                     block_size=block, finer_block=self._finer(block, table.shape[1])))
                continue
            if any(user.op_type == "Gather" for user, _ in use.weight.uses()):
                skipped[use.name] = "weight tied to an embedding table read untransposed: kept float"
                continue
            if use.input_index != 1 or len(table.shape) != 2:
                skipped[use.name] = "weight is not a 2-D right-hand MatMul input"
                continue
            head = use.node is head_node
            if head and o.head_bits == 0:
                skipped[use.name] = "LM head kept float (head_bits = 0)"
                continue
            bits = o.head_bits if head else (8 if use.node.name in eight else o.bits)
            block = self._head_block(table) if head else None
            layers.append(_Layer(use.name, use, table, "head" if head else "linear", bits, block_size=block,
                                 finer_block=self._finer(block, table.shape[0]) if head else None))
        return layers, skipped

    def _encode_layer(self, layer: _Layer, bits: int, method: str) -> BlockQuantized:
        """The layer's codes at ``bits`` (computed once per width)."""
        if bits not in layer.encoded:
            form = self._form(layer, bits)
            rounding = method if layer.role == "linear" and method in ("hqq", "gptq") else "rtn"
            if rounding == "gptq" and layer.hessian is None:
                rounding = "hqq"
            weight = layer.weight
            block = layer.block_size or self._block(bits)
            scales = layer.input_scales
            # AWQ's codes: each block's scale searched for the least activation-weighted error
            searched = rounding == "hqq" or scales is not None and not layer.smoothed and form != "float"
            nearest = quantize_blocks(weight, bits=bits, block_size=block, form=form,
                                      method="hqq" if searched else "rtn",
                                      hessian=layer.hessian if scales is not None else None, input_scales=scales)
            quantized, chosen = nearest, "hqq" if rounding == "hqq" else "rtn"
            if rounding == "gptq":  # GPTQ is greedy and fits its calibration: it is kept where it also loses
                # less on held-out text (weights already on the grid, as a GGUF checkpoint's are, stay)
                fitted = quantize_blocks(weight, bits=bits, block_size=block, form=form, method="gptq",
                                         hessian=layer.hessian, input_scales=scales)
                inputs = layer.held_out_hessian if layer.held_out_hessian is not None else layer.hessian
                if relative_loss(fitted, weight, inputs) < relative_loss(nearest, weight, inputs):
                    quantized, chosen = fitted, "gptq"
            layer.encoded[bits] = quantized
            prefix = ("smooth+" if layer.smoothed else "awq+") if scales is not None else ""
            layer.methods[bits] = prefix + chosen
        return layer.encoded[bits]

    def _encode(self, graph: ir.Graph, layer: _Layer, quantized: BlockQuantized, level: int) -> Encoded:
        if layer.role in ("tied", "embedding"):
            return encode_table(graph, layer.use, quantized, level, layer.heads)
        return encode_matmul(graph, layer.use, quantized, level,
                             "offset" if self.options.zero_points == "auto" else self.options.zero_points)

    def _finer(self, block: int | None, width: int) -> int | None:
        """``head_block_size`` where a head or table was kept at a coarser block of its own grid
        (and it divides the width): the search may take it (``bit_search``)."""
        finer = self.options.head_block_size
        return finer if block and finer and finer < block and width % finer == 0 else None

    def _head_block(self, tensor: ir.TensorProtocol, *, transposed: bool = False) -> int | None:
        """The block of a table ([V, H], ``transposed``) or an untied head ([K, N]): ``head_block_size``,
        unless that is another block than the 8-bit one and the weight lies exactly on the 8-bit
        grid of that block already (``zero_points = "auto"``: an import's grid is kept)."""
        o = self.options
        natural = self._block(o.head_bits)
        if not o.head_block_size or o.head_block_size == natural:
            return natural if transposed else o.head_block_size or None
        if o.zero_points == "auto" and o.head_bits == 8:
            weight = np.asarray(tensor.numpy(), np.float32)
            if weight.shape[1 if transposed else 0] % natural == 0 and \
                    on_grid(weight.T if transposed else weight, 8, natural, "symmetric"):
                return natural
        return o.head_block_size

    def _block(self, bits: int) -> int:
        o = self.options
        return o.eight_bit_block_size if bits == 8 and o.eight_bit_block_size else o.block_size

    def _form(self, layer: _Layer, bits: int) -> str:
        """The grid of ``layer`` at ``bits``: symmetric when asked, for tables, and at 8 bits
        (a zero point buys under one bit of 256 levels, and the int8 kernel then needs no
        offset term); else integer or float zero points as ``zero_points`` says ('auto': the grid
        the weights lie on already, symmetric or float, as a GGUF Q4_0 or Q4_1 import's do)."""
        o = self.options
        if o.symmetric or layer.role in ("tied", "embedding") or bits == 8:
            return "symmetric"
        if o.zero_points == "auto":
            if layer.grid is None:  # a GGUF import's own grid (Q4_0: symmetric, Q4_1: float), kept exactly
                weight, block = layer.weight, layer.block_size or self._block(bits)
                layer.grid = next((form for form in ("symmetric", "float") if on_grid(weight, bits, block, form)), "")
            return layer.grid or "integer"
        return "integer" if o.zero_points == "integer" else "float"

    def _smooth_inputs(self, graph: ir.Graph, group: list[_Layer], sample: _InputSample,
                       widths: list[tuple[int, bool, str, int]]) -> None:
        """SmoothQuant: the input scales shared by the layers reading one input, for the
        ``widths`` they may take (``smoothing_scales``), folded into the norm writing that input or
        divided out by a Mul."""
        if sample.rows is None or sample.rows.rows is None or not any(width[1] for width in widths):
            return
        weights = [layer.weight for layer in group]
        held_out = sample.held_out.rows if sample.held_out is not None else None
        scales, alpha = smoothing_scales(weights, sample.rows.rows, sample.rows.absmax, widths=widths,
                                         held_out=held_out)
        weights.clear()
        _take_scales(graph, group, scales, alpha, smoothed=True)

    def _scale_inputs(self, graph: ir.Graph, group: list[_Layer]) -> None:
        """AWQ: the input scales shared by the layers reading one input, chosen on the calibration
        windows, kept only if plain rounding loses more on the held-out ones; then folded into the
        norm writing that input, or divided out by a Mul."""
        first = group[0]
        if first.hessian is None:
            return
        o = self.options
        form = self._form(first, o.bits)
        weights = [layer.weight for layer in group]
        scales, alpha, _ = awq_scales(weights, first.hessian, bits=o.bits, block_size=o.block_size, form=form)
        if scales is not None and first.held_out_hessian is not None:
            def held_out(input_scales: np.ndarray | None) -> float:
                return sum(relative_loss(quantize_blocks(w, bits=o.bits, block_size=o.block_size, form=form,
                                                 input_scales=input_scales), w, first.held_out_hessian) for w in weights)

            if held_out(scales) >= held_out(None):
                scales, alpha = None, 0.0
        weights.clear()
        _take_scales(graph, group, scales, alpha, smoothed=False)


# -- measurements ------------------------------------------------------------------------------


class _Snapshots:
    """The model as onnxruntime reads it, written to a scratch folder (external data, so that
    weights left on disk are read from there and any size works); removed on close."""

    def __init__(self) -> None:
        import tempfile

        self._folder = tempfile.TemporaryDirectory(prefix="graphopt-blockwise-")
        self._count = 0

    def write(self, model: ir.Model) -> str:
        import os

        self._count += 1
        path = os.path.join(self._folder.name, f"trial{self._count}.onnx")
        ir.save(model, path, external_data=os.path.basename(path) + ".data")
        return path

    def close(self) -> None:
        self._folder.cleanup()


def _take_scales(graph: ir.Graph, group: list[_Layer], scales: np.ndarray | None, alpha: float, *,
                 smoothed: bool) -> None:
    """The layers of ``group`` (their weights read and released) take the input scales chosen for
    them, if any: their codes will be of diag(s)·W, and the input they share comes divided by s
    (folded into the norm writing it, else a Mul; a tied table's head reads it)."""
    for layer in group:
        layer.release()
    if scales is None:
        return
    for layer in group:
        layer.input_scales, layer.alpha, layer.smoothed = scales, alpha, smoothed
    first = group[0]
    readers = list(first.heads) if first.role == "tied" else [layer.use.node for layer in group]
    divide_input(graph, _input(first), readers, scales)


def _gemms_as_matmuls(graph: ir.Graph, nodes: list[ir.Node]) -> int:
    """Each of the Gemm ``nodes`` with a constant 2-D weight (GPT-2's Conv1D, a linear layer on a
    flattened input) as the MatMul it computes, ``MatMul(A, B or Bᵀ)`` plus ``Add(β·C)``, so that
    its weight is encoded like any other (transA or α ≠ 1: left alone). Returns how many."""
    from graphopt.passes.quantize.block_encodings import take_over

    count = 0
    for node in nodes:
        if node.domain not in ("", "ai.onnx") or len(node.inputs) < 2:
            continue
        weight = node.inputs[1]
        if (weight is None or weight.const_value is None or len(weight.const_value.shape) != 2
                or node.attributes.get_int("transA", 0) or node.attributes.get_float("alpha", 1.0) != 1.0):
            continue
        name = node.name or weight.name or "gemm"
        if node.attributes.get_int("transB", 0):
            values = weight.const_value.numpy().T.copy()
            weight = initializer(graph, f"{weight.name}_t", values)
        matmul = ir.node("MatMul", [node.inputs[0], weight], name=name)
        bias, result = gemm_bias(graph, node, matmul.outputs[0], name)
        graph.insert_before(node, [matmul, *bias])
        old_weight = node.inputs[1]
        take_over(graph, node, result)
        if not old_weight.uses() and not old_weight.is_graph_input():
            graph.initializers.pop(old_weight.name, None)
        count += 1
    return count


def _input(layer: _Layer) -> ir.Value | None:
    """The activation a layer multiplies: its MatMul's left input; a tied table's head's (None:
    an embedding table alone)."""
    if layer.role in ("tied", "embedding"):
        return layer.heads[0].inputs[0] if layer.heads else None
    return layer.use.node.inputs[0]


def _readers(layers: list[_Layer], heads: bool = False) -> dict[str, list[_Layer]]:
    """The linear layers grouped by the input they read (they share input scales); with
    ``heads``, an LM head (tied or not) too, alone."""
    groups: dict[str, list[_Layer]] = {}
    for layer in layers:
        source = _input(layer)
        if layer.role == "linear" or heads and source is not None:
            groups.setdefault(source.name, []).append(layer)
    return groups


@dataclasses.dataclass
class _InputSample:
    """Rows of one layer input (SmoothQuant's search): on the calibration feeds and on the
    held-out judge windows."""

    rows: Any = None  # activations.RowSample
    held_out: Any = None


def _measure_inputs(model: ir.Model, layers: list[_Layer], context: PassContext, pass_name: str, snapshot: str, *,
                    moments: bool, rows: bool) -> dict[str, _InputSample]:
    """One pass over the calibration feeds (decoder: the calibration text; ``snapshot`` is the
    float model on disk), and one over a decoder's held-out judge windows, measuring each layer
    input: E[x xᵀ] (``moments``: set on the layers) and a sample of its rows (``rows``:
    returned by input name)."""
    from graphopt.passes.activations import ActivationCollector, RowSample, SecondMoment

    feeds: Any
    if context.text is not None:
        from graphopt.verify.decoder import OrtDecoder

        decoder = OrtDecoder(snapshot, threads=context.threads)  # read for its inputs; opened once
        feeds = context.text.feeds(decoder)
    else:
        feeds = context.calibration_feeds(pass_name).feeds
    names = sorted({_input(layer).name for layer in layers})

    def accumulators(limit: int) -> tuple[dict[str, SecondMoment], dict[str, RowSample]]:
        return ({name: SecondMoment() for name in names} if moments else {},
                {name: RowSample(limit) for name in names} if rows else {})

    def measure(stream: Any, wanted: tuple[dict[str, SecondMoment], dict[str, RowSample]]) -> None:
        collector.stream(stream, {name: [acc[name] for acc in wanted if name in acc] for name in names})

    collector = ActivationCollector(model, names, threads=context.threads)
    fitted = accumulators(_SAMPLE_ROWS)
    measure(feeds, fitted)
    judged = accumulators(_SAMPLE_ROWS // 2)
    if context.text is not None and context.text.judge_windows:
        measure(context.text.feeds(decoder, held_out=True), judged)
    if moments:
        for layer in (layer for layer in layers if layer.role == "linear"):
            value = fitted[0][_input(layer).name].value
            layer.hessian = None if value is None else value.astype(np.float64)
            value = judged[0][_input(layer).name].value
            layer.held_out_hessian = None if value is None else value.astype(np.float64)
    def held_out(name: str) -> Any:  # no judging windows (tensor calibration): no rows held out
        sample = judged[1].get(name)
        return sample if sample is not None and sample.rows is not None else None

    return {name: _InputSample(fitted[1].get(name), held_out(name)) for name in names}


def _accuracy_levels(context: PassContext, block_size: int) -> dict[int, int]:
    """For 4 and 8 bits, the faster of onnxruntime's default compute (0) and int8 activations (4)
    on this CPU, timed on a 1024×1024 weight (one token and 128 rows), once per machine and
    cached (8-bit codes have no fast float path here: level 0 is ~100× slower per token)."""
    from pathlib import Path

    from graphopt.passes.quantize.profile import BlockwiseProfile, default_cache_dir
    from graphopt.verify.runtime import default_threads

    cache = Path(context.cache_dir) if context.cache_dir else default_cache_dir()
    profile = BlockwiseProfile(cache, context.threads or default_threads())
    levels = {bits: profile.fastest_level(1024, 1024, bits=bits, block_size=block_size) for bits in (4, 8)}
    profile.save()
    return levels
