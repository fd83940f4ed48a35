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

**Forms of an asymmetric grid** (``zero_points``):

* ``integer``: packed unsigned zero points, onnxruntime's fast kernels;
* ``offset``: a float zero point per block, served fast: the kernel runs the codes as symmetric
  and a separate term adds what that misses, ``Ŵ = s·(q − 2^(bits−1)) + o`` with
  ``o[b, n] = s·(2^(bits−1) − z)``, so ``A·Ŵ = MatMulNBits(A) + (A·P)·O`` where P [K, blocks]
  sums each block of A (shared by every layer of that K) and O [blocks, N] is stored in float16
  (the runtime widens it once, at load). Costs 2 bytes per block and two small MatMuls;
* ``float``: the float zero points as the kernel's own input (onnxruntime has no fast path for
  it: several times slower per token; kept for runtimes that have one).

**The LM head and the embedding table.** A table read by a Gather and, transposed, by the head's
(Fused)MatMul is one set of codes: ``GatherBlockQuantized`` and ``MatMulNBits`` both read it (the
table's [V, H] is the head's [N, K]), at ``head_bits`` (8 by default: never silently 4-bit).
An untied embedding table gets ``head_bits`` too; an untied head (the MatMul writing ``logits``)
likewise.

**Bits per layer** (``search``): with calibration text (``PassContext.text``) and a text budget,
every layer starts at ``bits``; if the calibration windows set aside for judging miss the budget,
layers move to 8 bits in order of sensitivity (GPTQ's output loss when measured, else the
weight's relative error), fewest first (a bisection over that order); if all of them at 8 bits
still miss it, the pass fails naming the best value reachable.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any

import numpy as np
import onnx_ir as ir

from graphopt.passes.base import GraphoptPass, PassContext, PassResult
from graphopt.passes.quantize.blocks import METHODS, BlockQuantized, awq_scales, output_error, quantize_blocks
from graphopt.passes.registry import register
from graphopt.passes.weights import WeightUse, first_consumer, initializer, replace_output, weight_uses

logger = logging.getLogger(__name__)

_BLOCK_SIZES = (16, 32, 64, 128, 256)
_ZERO_POINTS = ("integer", "offset", "float")
_METHODS = (*METHODS, "awq", "auto")
_NORM_WEIGHTS = {"SimplifiedLayerNormalization": (1, None), "SkipSimplifiedLayerNormalization": (2, None),
                 "RMSNormalization": (1, None), "LayerNormalization": (1, 2), "SkipLayerNormalization": (2, 3)}
"""Norms whose output an AWQ scale can be folded into: (weight input, bias input)."""


@dataclasses.dataclass
class _Layer:
    """One weight to encode: a MatMul's right-hand side, or a tied/untied table."""

    name: str
    use: WeightUse
    tensor: ir.TensorProtocol  # the float weight, in memory or external data (read when needed)
    role: str  # "linear", "head" (untied), "tied" (table + head), "embedding" (untied table)
    bits: int
    hessian: np.ndarray | None = None  # E[x xᵀ] of the input on the calibration windows (fits the methods)
    check: np.ndarray | None = None  # the same on held-out windows (chooses between them)
    input_scales: np.ndarray | None = None  # AWQ: the codes are of diag(s)·W, the input is divided by s
    alpha: float = 0.0
    heads: tuple[ir.Node, ...] = ()  # tied: the FusedMatMul nodes reading the table transposed
    encoded: dict[int, BlockQuantized] = dataclasses.field(default_factory=dict)
    sensitivity: float = 0.0
    level: int | None = None  # accuracy_level chosen by the search (None: the fastest for its bits)
    methods: dict[int, str] = dataclasses.field(default_factory=dict)  # per bit width, the method that won
    relative_error: float = 0.0
    block_size: int | None = None  # a table's own block (it must divide the table's width), else the pass's

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
        bits: int = 4
        """4 or 8 bits per weight (the layers' starting point when searching)."""
        block_size: int = 32
        """Values per block along K (16, 32, 64, 128 or 256); each block has its own scale."""
        symmetric: bool = True
        """A zero point of 2^(bits-1) for every block (none stored) instead of one fitted per block."""
        zero_points: str = "integer"
        """Asymmetric only: 'integer' (packed), 'offset' (float, served by a separate term) or
        'float' (the kernel's float input: slow on onnxruntime's CPU)."""
        operators: str = "onnxruntime"
        """'onnxruntime' (MatMulNBits, GatherBlockQuantized) or 'standard': DequantizeLinear with
        block_size (opset 21; int4/uint4 codes) before the float op, for runtimes without contrib
        ops (onnxruntime turns DequantizeLinear + MatMul back into MatMulNBits at load)."""
        method: str = "auto"
        """'rtn', 'hqq' (data-free; ~10 s per 10M-element weight on 2 cores), 'awq' (activation-aware
        input scales, then rounding), 'gptq' (error-compensating rounding), or 'auto': gptq with
        calibration, else rtn. awq and gptq need calibration; each is kept per layer only where it
        loses less than rounding to nearest on held-out calibration text. Both fit the calibration's
        kind of text: calibrate on the text the model will read."""
        head_bits: int = 8
        """The LM head and the embedding table (shared codes when tied): 8, 4, or 0 to keep them float."""
        search: bool = True
        """With calibration text and a text budget: 8 bits for the layers that need it, fewest first."""
        eight_bit: tuple[str, ...] = ()
        """MatMul nodes held at 8 bits whatever else is chosen."""
        accuracy_level: int = -1
        """onnxruntime's compute type: 0 default, 1 fp32, 2 fp16, 3 bf16, 4 int8 activations; -1:
        per bit width, the faster of 0 and 4 on this CPU (measured once, cached)."""
        min_elements: int = 1024
        """Weights with fewer elements stay float."""
        nodes: tuple[str, ...] = ()
        """Only these MatMul nodes (empty: all)."""

    def __init__(self, **options: Any) -> None:
        from graphopt.errors import RecipeError

        super().__init__(**options)
        o = self.options
        checks = [("bits", o.bits in (4, 8), "4 or 8"), ("block_size", o.block_size in _BLOCK_SIZES, str(_BLOCK_SIZES)),
                  ("accuracy_level", o.accuracy_level in range(-1, 5), "-1..4"),
                  ("zero_points", o.zero_points in _ZERO_POINTS, ", ".join(_ZERO_POINTS)),
                  ("method", o.method in _METHODS, ", ".join(_METHODS)),
                  ("head_bits", o.head_bits in (0, 4, 8), "0, 4 or 8"),
                  ("operators", o.operators in ("onnxruntime", "standard"), "'onnxruntime' or 'standard'")]
        for option, valid, allowed in checks:
            if not valid:
                raise RecipeError(f"pass '{self.name}': '{option}' must be {allowed}, got {getattr(o, option)!r}")
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
        layers, skipped = self._layers(graph, context)
        if not layers:
            return PassResult(model, modified=False, changes={"weights encoded": 0}, details={"skipped": skipped})
        method = o.method if o.method != "auto" else \
            ("gptq" if context.text is not None or context.calibration else "rtn")
        snapshots = _Snapshots()
        try:
            return self._run(model, context, layers, skipped, method, snapshots)
        finally:
            snapshots.close()

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
        if method in ("gptq", "awq"):
            _measure_hessians(model, [layer for layer in layers if layer.role == "linear"], context, self.name,
                              reference or snapshots.write(model))
        readers = _readers(layers) if method == "awq" else {}
        levels = {bits: max(o.accuracy_level, 0) for bits in (4, 8)}
        if o.accuracy_level < 0 and o.operators == "onnxruntime":
            levels = _accuracy_levels(context, o.block_size)
        # One weight at a time: read (external data is mapped, not loaded), quantized, encoded into
        # the graph, unmapped; only the codes stay. A search keeps the codes of each width it tried.
        nodes: dict[int, _Encoded] = {}
        for layer in progress(layers, f"{method}: {len(layers)} weights", unit="weight"):
            group = readers.pop(layer.use.node.inputs[0].name, None)
            if group is not None:
                self._scale_inputs(graph, group)
            quantized = self._encode_layer(layer, layer.bits, method)
            weight = layer.weight
            # the output loss on the calibration inputs when measured (else the weight's own error)
            layer.sensitivity = _loss(quantized, weight, layer.hessian)
            error, total = output_error(quantized, weight)
            layer.relative_error = float(np.sqrt(error / max(total, 1e-30)))
            del weight
            if o.operators == "standard":
                _encode_standard(graph, layer, quantized)
            else:
                nodes[id(layer)] = _encode(graph, layer, quantized, levels, o.zero_points)
            layer.release()
            if reference is None:  # no search will swap widths: the packed codes in the graph suffice
                layer.encoded.clear()
            del quantized
        if o.operators != "standard" and "com.microsoft" not in model.opset_imports:
            model.opset_imports["com.microsoft"] = 1
        search: dict[str, Any] = {}
        if reference is not None:
            search = self._search(model, layers, nodes, reference, context, method, snapshots, levels)
        table = [{"node": layer.name, "role": layer.role, "shape": list(layer.shape), "bits": layer.bits,
                  "accuracy_level": levels[layer.bits] if layer.level is None else layer.level,
                  "block_size": layer.block_size or o.block_size, "method": layer.methods[layer.bits],
                  "awq_alpha": layer.alpha,
                  "relative_error": layer.relative_error, "sensitivity": layer.sensitivity} for layer in layers]
        changes = {"weights encoded": len(layers), "8-bit": sum(layer.bits == 8 for layer in layers)}
        exhausted = search.pop("exhausted", None)
        return PassResult(model, modified=True, changes=changes, notes=[exhausted] if exhausted else [],
                          details={"layers": table, "skipped": skipped, "method": method, "accuracy_level": levels,
                                   "search": search},
                          searched=bool(search), exhausted=exhausted)

    def _layers(self, graph: ir.Graph, context: PassContext) -> tuple[list[_Layer], dict[str, str]]:
        o = self.options
        uses, skipped = weight_uses(graph, ("MatMul", "Gather"), o.min_elements, context.exclude)
        wanted, eight = set(o.nodes), set(o.eight_bit)
        layers: list[_Layer] = []
        heads = {id(node): node for node in _logits_producers(graph)}
        for use in uses:
            if wanted and use.node.name not in wanted:
                skipped[use.name] = "not selected"
                continue
            table = use.weight.const_value
            if use.kind == "Gather":
                tied = tuple(user for user, index in use.weight.uses() if index == 1 and _reads_transposed(user))
                others = [user for user, _ in use.weight.uses() if user.op_type != "Gather" and user not in tied]
                if o.head_bits == 0 or others:
                    skipped[use.name] = "kept float (head_bits = 0)" if o.head_bits == 0 else \
                        "the table has readers other than a Gather and a transposed head"
                    continue
                if any(layer.use.weight is use.weight for layer in layers):
                    continue  # a table read by two Gathers is encoded once
                block = _table_block(table.shape[1], o.block_size)
                if block is None:
                    skipped[use.name] = f"table width {table.shape[1]} has no power-of-two block from 16 to {o.block_size}"
                    continue
                layers.append(_Layer(use.name, use, table, "tied" if tied else "embedding", o.head_bits, heads=tied,
                                     block_size=block))
                continue
            if any(user.op_type == "Gather" for user, _ in use.weight.uses()):
                skipped[use.name] = "weight tied to an embedding table read untransposed: kept float"
                continue
            if use.input_index != 1 or len(table.shape) != 2:
                skipped[use.name] = "weight is not a 2-D right-hand MatMul input"
                continue
            head = id(use.node) in heads
            if head and o.head_bits == 0:
                skipped[use.name] = "LM head kept float (head_bits = 0)"
                continue
            bits = o.head_bits if head else (8 if use.node.name in eight else o.bits)
            layers.append(_Layer(use.name, use, table, "head" if head else "linear", bits))
        return layers, skipped

    def _encode_layer(self, layer: _Layer, bits: int, method: str) -> BlockQuantized:
        """The layer's codes at ``bits`` (computed once per width)."""
        if bits not in layer.encoded:
            o = self.options
            form = self._form(layer)
            rounding = method if layer.role == "linear" and method in ("hqq", "gptq") else "rtn"
            if rounding == "gptq" and layer.hessian is None:
                rounding = "hqq"
            weight = layer.weight
            block = layer.block_size or o.block_size
            scales = layer.input_scales
            # AWQ's codes: each block's scale searched for the least activation-weighted error
            searched = rounding == "hqq" or scales is not None and form != "float"
            nearest = quantize_blocks(weight, bits=bits, block_size=block, form=form,
                                      method="hqq" if searched else "rtn",
                                      hessian=layer.hessian if scales is not None else None, input_scales=scales)
            quantized, chosen = nearest, "hqq" if rounding == "hqq" else "rtn"
            if rounding == "gptq":  # GPTQ is greedy and fits its calibration: it is kept where it also loses
                # less on held-out text (weights already on the grid, as a GGUF checkpoint's are, stay)
                fitted = quantize_blocks(weight, bits=bits, block_size=block, form=form, method="gptq",
                                         hessian=layer.hessian, input_scales=scales)
                judge = layer.check if layer.check is not None else layer.hessian
                if _loss(fitted, weight, judge) < _loss(nearest, weight, judge):
                    quantized, chosen = fitted, "gptq"
            layer.encoded[bits] = quantized
            layer.methods[bits] = ("awq+" if scales is not None else "") + chosen
        return layer.encoded[bits]

    def _form(self, layer: _Layer) -> str:
        o = self.options
        if o.symmetric or layer.role in ("tied", "embedding"):
            return "symmetric"
        return "integer" if o.zero_points == "integer" else "float"

    def _scale_inputs(self, graph: ir.Graph, group: list[_Layer]) -> None:
        """AWQ: the input scales shared by the layers reading one input, chosen on the calibration
        windows, kept only if plain rounding loses more on the held-out ones; then folded into the
        norm writing that input, or divided out by a Mul."""
        first = group[0]
        if first.hessian is None:
            return
        o = self.options
        form = self._form(first)
        weights = [layer.weight for layer in group]
        scales, alpha, _ = awq_scales(weights, first.hessian, bits=o.bits, block_size=o.block_size, form=form)
        if scales is not None and first.check is not None:
            def held_out(input_scales: np.ndarray | None) -> float:
                return sum(_loss(quantize_blocks(w, bits=o.bits, block_size=o.block_size, form=form,
                                                 input_scales=input_scales), w, first.check) for w in weights)

            if held_out(scales) >= held_out(None):
                scales, alpha = None, 0.0
        weights.clear()
        for layer in group:
            layer.release()
        if scales is None:
            return
        for layer in group:
            layer.input_scales, layer.alpha = scales, alpha
        _divide_input(graph, first.use.node.inputs[0], [layer.use.node for layer in group], scales)

    def _search(self, model: ir.Model, layers: list[_Layer], nodes: dict[int, _Encoded], reference: str,
                context: PassContext, method: str, snapshots: _Snapshots, levels: dict[int, int]) -> dict[str, Any]:
        from graphopt.verify.text import TextJudge

        text = context.text
        thresholds = text.thresholds
        judge_ = TextJudge(reference, text.judge_windows, threads=context.threads)
        # Half the slack is kept for unseen text (8 windows measure agreement to about ±0.01, and prose
        # of another kind moves it by more); each retreat keeps a quarter more.
        margin = min(0.5 + 0.25 * context.retreat, 0.95)
        target_ppl = None if thresholds.max_ppl_ratio is None else 1 + (thresholds.max_ppl_ratio - 1) * (1 - margin)
        target_agree = None if thresholds.min_token_agree is None else \
            thresholds.min_token_agree + (1 - thresholds.min_token_agree) * margin
        if target_ppl is None and target_agree is None:
            return {}
        linear = [layer for layer in layers if layer.role == "linear"]
        trials: list[dict[str, Any]] = []
        summary = {"windows": len(text.judge_windows), "target_ppl_ratio": target_ppl,
                   "target_token_agree": target_agree, "trials": trials}

        def judge(step: str) -> bool:
            scores = judge_.score(snapshots.write(model))
            ok = (target_ppl is None or scores["ppl_ratio"] <= target_ppl) and \
                 (target_agree is None or scores["token_agreement"] >= target_agree)
            trials.append({"step": step, "eight_bit_layers": sum(layer.bits == 8 for layer in linear),
                           "float_compute_layers": sum(layer.level == 1 for layer in linear), **scores, "meets": ok})
            logger.info("blockwise search: %s: perplexity ratio %.4f, agreement %.4f%s", step, scores["ppl_ratio"],
                        scores["token_agreement"], "" if ok else " (misses)")
            return ok

        def set_level(group: list[_Layer], level: int | None) -> None:
            for layer in group:
                layer.level = level
                nodes[id(layer)].set_level(levels[layer.bits] if level is None else level)

        if judge(f"all {self.options.bits}-bit"):
            return summary
        # Rung 1: float compute (accuracy_level 1) for the layer groups (one weight shape: one role
        # in every block) whose int8 activations cost the most, measured one group at a time.
        if self.options.bits == 4 and levels[4] == 4:
            groups: dict[tuple[int, ...], list[_Layer]] = {}
            for layer in linear:
                groups.setdefault(tuple(layer.shape), []).append(layer)
            gains = []
            for shape, group in groups.items():
                set_level(group, 1)
                judge(f"float compute for the {len(group)} layers of shape {shape[0]}x{shape[1]}")
                set_level(group, None)
                gains.append((trials[-1]["token_agreement"] - trials[0]["token_agreement"]
                              - (trials[-1]["ppl_ratio"] - trials[0]["ppl_ratio"]), shape))
            for gain, shape in sorted(gains, reverse=True):
                if gain <= 0:
                    break
                set_level(groups[shape], 1)
                if judge(f"+ float compute for shape {shape[0]}x{shape[1]}"):
                    return summary
        # Rung 2: 8 bits, in order of sensitivity, fewest first (bisection over that order).
        movable = sorted((layer for layer in linear if layer.bits != 8), key=lambda layer: -layer.sensitivity)

        def with_eight_bits(count: int) -> bool:
            for index, layer in enumerate(movable):
                bits = 8 if index < count else self.options.bits
                if layer.bits != bits:
                    layer.bits = bits
                    nodes[id(layer)].swap(self._encode_layer(layer, bits, method),
                                          levels[bits] if layer.level is None or bits == 8 else layer.level)
            return judge(f"{count} of {len(movable)} layers at 8 bits")

        if not with_eight_bits(len(movable)):  # the end of the ladder: the final verification decides
            best = max(trials, key=lambda t: t["token_agreement"] - t["ppl_ratio"])
            summary["exhausted"] = (
                f"the text budget cannot be met on {len(text.judge_windows)} calibration windows: best reached "
                f"perplexity ratio {best['ppl_ratio']:.4f} (target {_shown(target_ppl)}), token agreement "
                f"{best['token_agreement']:.4f} (target {_shown(target_agree)}) with {best['step']}")
            return summary
        low, high = 0, len(movable)
        while high - low > 1:
            middle = (low + high) // 2
            if with_eight_bits(middle):
                high = middle
            else:
                low = middle
        if trials[-1]["eight_bit_layers"] != high:
            with_eight_bits(high)
        return summary


def _shown(value: float | None) -> str:
    return "none" if value is None else f"{value:.4f}"


# -- encoding --------------------------------------------------------------------------------


class _Encoded:
    """The initializers and nodes one layer was encoded into; ``swap`` re-points them at other
    codes of the same form (another bit width) without touching the graph's structure."""

    def __init__(self, node: ir.Node, codes: ir.Value, scales: ir.Value, zero_points: ir.Value | None,
                 offsets: ir.Value | None, readers: tuple[ir.Node, ...] = ()) -> None:
        self.node, self.codes, self.scales = node, codes, scales
        self.zero_points, self.offsets, self.readers = zero_points, offsets, readers

    def set_level(self, level: int) -> None:
        for node in (self.node, *self.readers):
            if node.op_type == "MatMulNBits":
                node.attributes["accuracy_level"] = ir.AttrInt64("accuracy_level", level)

    def swap(self, quantized: BlockQuantized, level: int) -> None:
        self.codes.const_value = ir.tensor(quantized.packed_codes(), name=self.codes.name)
        self.scales.const_value = ir.tensor(quantized.scales, name=self.scales.name)
        if self.zero_points is not None:
            self.zero_points.const_value = ir.tensor(quantized.packed_zero_points(), name=self.zero_points.name)
        if self.offsets is not None:
            self.offsets.const_value = ir.tensor(quantized.offsets().astype(np.float16), name=self.offsets.name)
        for node in (self.node, *self.readers):
            node.attributes["bits"] = ir.AttrInt64("bits", quantized.bits)
        self.set_level(level)


def _table_block(width: int, block_size: int) -> int | None:
    """The largest power-of-two block from 16 up to ``block_size`` that divides a table's width:
    GatherBlockQuantized returns whole blocks, so a table's rows must hold whole blocks."""
    block = block_size
    while block >= 16:
        if width % block == 0:
            return block
        block //= 2
    return None


def _encode(graph: ir.Graph, layer: _Layer, quantized: BlockQuantized, levels: dict[int, int],
            zero_points: str) -> _Encoded:
    if layer.role in ("tied", "embedding"):
        return _encode_table(graph, layer, quantized, levels[quantized.bits])
    return _encode_matmul(graph, layer.use, quantized, levels[quantized.bits], zero_points)


def _matmul_nbits(inputs: list[ir.Value | None], quantized: BlockQuantized, n: int, level: int, name: str) -> ir.Node:
    return ir.node("MatMulNBits", inputs, {"K": quantized.k, "N": n, "bits": quantized.bits,
                                           "block_size": quantized.block_size, "accuracy_level": level},
                   domain="com.microsoft", name=name)


def _encode_matmul(graph: ir.Graph, use: WeightUse, quantized: BlockQuantized, level: int, zero_points: str) -> _Encoded:
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
    fused = _matmul_nbits(inputs, quantized, n, level, node.name or f"{name}_matmul_nbits")
    added = [fused]
    result = fused.outputs[0]
    if zero_points == "offset" and float_zero:
        offsets = initializer(graph, f"{name}_offsets", quantized.offsets().astype(np.float16))
        sums = ir.node("MatMul", [node.inputs[0], _block_sums(graph, quantized.k, quantized.block_size)],
                       name=f"{fused.name}_block_sums")
        widened = ir.node("Cast", [offsets], {"to": ir.DataType.FLOAT}, name=f"{fused.name}_offsets_f32")
        term = ir.node("MatMul", [sums.outputs[0], widened.outputs[0]], name=f"{fused.name}_offset_term")
        total = ir.node("Add", [result, term.outputs[0]], name=f"{fused.name}_plus_offsets")
        added += [sums, widened, term, total]
        result = total.outputs[0]
    for new in added:
        graph.insert_before(node, new)
    _take_over(graph, node, result)
    if not use.weight.uses():
        graph.initializers.pop(use.weight.name, None)
    return _Encoded(fused, codes, scales, zp, offsets)


def _encode_standard(graph: ir.Graph, layer: _Layer, quantized: BlockQuantized) -> None:
    """DequantizeLinear(codes, scales[, zero points], axis, block_size) in front of the weight's
    readers: int4/int8 codes when symmetric, uint4/uint8 with zero points otherwise."""
    import ml_dtypes

    use = layer.use
    name = use.weight.name or "weight"
    codes = quantized.codes.reshape(quantized.codes.shape[0], -1)[:, : quantized.k]  # [N, K]
    symmetric = quantized.symmetric
    signed = {4: ml_dtypes.int4, 8: np.int8}[quantized.bits]
    unsigned = {4: ml_dtypes.uint4, 8: np.uint8}[quantized.bits]
    if symmetric:
        values = (codes.astype(np.int16) - quantized.half).astype(signed)
    else:
        values = codes.astype(unsigned)
    table = layer.role in ("tied", "embedding")
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


def _block_sums(graph: ir.Graph, k: int, block_size: int) -> ir.Value:
    """P [K, blocks]: 1 where row k lies in block b (shared by every layer with this K)."""
    name = f"blockwise_sums_{k}x{block_size}"
    if name in graph.initializers:
        return graph.initializers[name]
    blocks = -(-k // block_size)
    matrix = np.zeros((k, blocks), np.float32)
    matrix[np.arange(k), np.arange(k) // block_size] = 1.0
    return initializer(graph, name, matrix)


def _encode_table(graph: ir.Graph, layer: _Layer, quantized: BlockQuantized, level: int) -> _Encoded:
    """The embedding table → GatherBlockQuantized on its [V, H] codes; a tied head's
    FusedMatMul(transB) → MatMulNBits on the same codes and scales."""
    use = layer.use
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
        _take_over(graph, gather, new.outputs[0])
        readers.append(new)
    main = readers[0]
    for head in layer.heads:
        fused = _matmul_nbits([head.inputs[0], codes, scales], quantized, vocab, level, head.name or f"{name}_head")
        graph.insert_before(head, fused)
        _take_over(graph, head, fused.outputs[0])
        readers.append(fused)
    graph.initializers.pop(use.weight.name, None)
    return _Encoded(main, codes, scales, None, None, tuple(readers[1:]))


def _take_over(graph: ir.Graph, node: ir.Node, result: ir.Value) -> None:
    """``result`` replaces ``node``'s output (its readers, name and type where it had one)."""
    output = node.outputs[0]
    if output.dtype is not None:  # an intermediate value may carry no type: leave the new one untyped too
        result.dtype = output.dtype
    if output.shape is not None:
        result.shape = output.shape
    replace_output(graph, node, result, "replaced")


def _reads_transposed(node: ir.Node) -> bool:
    """A FusedMatMul(A, T, transB=1) with nothing else set: A · Tᵀ, the tied LM head."""
    if node.op_type != "FusedMatMul" or node.domain != "com.microsoft":
        return False
    attrs = node.attributes
    return (attrs.get_int("transB", 0) == 1 and attrs.get_int("transA", 0) == 0
            and attrs.get_int("transBatchA", 0) == 0 and attrs.get_int("transBatchB", 0) == 0
            and attrs.get_float("alpha", 1.0) == 1.0)


def _logits_producers(graph: ir.Graph) -> list[ir.Node]:
    return [output.producer() for output in graph.outputs
            if output.name == "logits" and output.producer() is not None]


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


def _loss(quantized: BlockQuantized, weight: np.ndarray, hessian: np.ndarray | None) -> float:
    """The relative output error tr(Eᵀ H E) / tr(Wᵀ H W) on the inputs H measures (without H, the
    weight's own relative squared error)."""
    error, total = output_error(quantized, weight, None if hessian is None else hessian.astype(np.float32))
    return error / max(total, 1e-30)


def _readers(layers: list[_Layer]) -> dict[str, list[_Layer]]:
    """The linear layers grouped by the input they read (they share AWQ scales)."""
    groups: dict[str, list[_Layer]] = {}
    for layer in layers:
        if layer.role == "linear":
            groups.setdefault(layer.use.node.inputs[0].name, []).append(layer)
    return groups


def _divide_input(graph: ir.Graph, value: ir.Value, nodes: list[ir.Node], scales: np.ndarray) -> None:
    """Make ``nodes`` read ``value`` / ``scales`` (along its last axis): the norm that writes it
    takes the division into its weight (and bias) when it feeds nothing else; else a Mul by 1/s."""
    producer = value.producer()
    inputs = _NORM_WEIGHTS.get(producer.op_type) if producer is not None and value.index() == 0 else None
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


def _measure_hessians(model: ir.Model, layers: list[_Layer], context: PassContext, pass_name: str,
                      snapshot: str) -> None:
    """E[x xᵀ] of each layer's input on the calibration feeds (decoder: the calibration text;
    ``snapshot`` is the float model on disk), and on a decoder's held-out judge windows."""
    from graphopt.passes.activations import ActivationCollector, SecondMoment

    feeds: Any
    if context.text is not None:
        from graphopt.verify.decoder import OrtDecoder

        decoder = OrtDecoder(snapshot, threads=context.threads)  # read for its inputs; opened once
        feeds = context.text.feeds(decoder)
    else:
        feeds = context.calibration_feeds(pass_name).feeds
    names = sorted({layer.use.node.inputs[0].name for layer in layers})
    moments = {name: SecondMoment() for name in names}
    collector = ActivationCollector(model, names, threads=context.threads)
    collector.stream(feeds, moments)
    held_out = {name: SecondMoment() for name in names}
    if context.text is not None and context.text.judge_windows:
        collector.stream(context.text.feeds(decoder, held_out=True), held_out)
    for layer in layers:
        value = moments[layer.use.node.inputs[0].name].value
        layer.hessian = None if value is None else value.astype(np.float64)
        value = held_out[layer.use.node.inputs[0].name].value
        layer.check = None if value is None else value.astype(np.float64)


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
