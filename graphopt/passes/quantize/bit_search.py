"""``quantize-blockwise``'s search of bits per layer under a text budget: the house's search
(``verify.search``) over one ladder, judged by ``verify.text.TextJudge`` on the calibration
windows set aside for judging.

The ladder, from the most compressed model back towards the original:

0. every layer at the pass's ``bits``, with the faster compute type for its width on this CPU
   (``accuracy_level``: int8 activations or float, measured once per machine);
1. float compute for one layer (4 bits with int8 activations only): the shapes whose int8
   activations cost the most text, each judged once (alone, one layer's gain can be lost in the
   noise), first; within a shape the layers whose output int8 activations change most on
   calibration rows first. Float compute is the slower kernel (3–7× per layer on onnxruntime
   1.32's CPU kernels), so each layer left on int8 activations is time saved; all of them
   together are the 4-bit model on float activations: for weights on the grid, such as a GGUF's,
   that is the exact one;
2. the LM head and table in ``head_block_size`` blocks where they were kept at a coarser block of
   their own grid (a GGUF's Q8_0 table at 32): finer int8 activation blocks for the weight text
   feels most, for a little decode time;
3. 8 bits for one layer, the most sensitive first (GPTQ's output loss where measured);
4. float weights for one layer (its MatMul as it was), the largest output loss at 8 bits per
   byte it costs first: the end of the ladder is the original's linear layers, so a budget that
   any mix can meet is never refused (only the LM head and embedding table stay at ``head_bits``).

A size target that rung 0 misses takes the LM head and embedding table from 8 to 4 bits first
(only then: their 8 bits are the recipe's choice for fidelity).

A decode-speed target (``max_decode_ratio`` with no text bound) times rung 0 and then the 8-bit
and float-weight rungs against the float model, and takes the most rungs within it.

The top of each part (1 to 4) is judged in turn, and the fewest rungs meeting the target are
taken within the first part whose top meets it (bisection: a part is taken to be monotone; across
parts it need not be: 8-bit codes lose the exact 4-bit grid of a GGUF import that float compute
keeps); each retreat halves the rungs left. Float weights are restored on a copy of the model for each
trial (tensors shared) and in place once chosen.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import onnx_ir as ir

from graphopt.io import model_bytes, weights_nbytes
from graphopt.passes.base import PassContext
from graphopt.passes.quantize.block_encodings import Encoded, drop_zero_terms, restore_float
from graphopt.passes.quantize.blocks import BlockQuantized, relative_loss
from graphopt.passes.quantize.precision import BitSearch, BitTrial
from graphopt.verify.search import fewest_rungs, most_rungs, retreat

if TYPE_CHECKING:
    from graphopt.verify.text import TextJudge, TextVerdict

logger = logging.getLogger(__name__)

Encode = Callable[[Any, int], BlockQuantized]  # (layer, bits) → its codes at that width

# What a decode-speed target keeps of itself for the timing noise between the search's
# measurement and the final check's (interleaved medians on a quiet machine vary by ~5–10%).
SPEED_RESERVE = 0.05


def search_bits(model: ir.Model, layers: list[Any], nodes: dict[int, Encoded], reference: str, context: PassContext,
                *, bits: int, levels: dict[int, int], encode: Encode, write: Callable[[ir.Model], str]
                ) -> BitSearch | None:
    """Choose bits, compute type and float weights per linear layer (see the module); ``write``
    puts a model where onnxruntime reads it. None without a text budget."""
    from graphopt.verify.text import TextJudge

    text = context.text
    thresholds = text.thresholds
    size_target, decode_target = thresholds.max_size_ratio, thresholds.max_decode_ratio
    budget = thresholds.max_ppl_ratio is not None or thresholds.min_token_agree is not None
    if not budget and size_target is None and decode_target is None:
        return None
    judge = TextJudge(reference, text.judge_windows, thresholds=thresholds, threads=context.threads)
    ladder = BitLadder(model, layers, nodes, judge, write=write, encode=encode, levels=levels,
                       reference_file_bytes=model_bytes(reference))
    search = BitSearch(windows=len(text.judge_windows),
                       target_ppl_ratio=None if thresholds.max_ppl_ratio is None
                       else 1 + (thresholds.max_ppl_ratio - 1) * judge.allowed,
                       target_token_agree=None if thresholds.min_token_agree is None
                       else 1 - (1 - thresholds.min_token_agree) * judge.allowed, trials=ladder.trials,
                       max_size_ratio=size_target, max_decode_ratio=None if budget else decode_target)
    if size_target is not None:
        return _within_size(ladder, search, bits, levels, size_target)
    if search.max_decode_ratio is not None:  # no text budget: the most faithful model within the speed
        return _within_decode(ladder, search, bits, levels, search.max_decode_ratio,
                              _DecodeTimer(reference, text.judge_windows[0], context.threads))
    first = ladder.judge(0, f"all {bits}-bit")
    if first.meets_target:
        return search
    ladder.add_quantized_rungs(bits, levels)
    # The top of each part of the ladder in turn (float compute, the head's finer block, 8 bits,
    # float weights), and the fewest rungs within the first part whose top meets the target: across
    # parts the ladder need not be monotone (8-bit codes lose a GGUF's exact 4-bit grid that float
    # compute keeps).
    shapes = sum(kind == "level" for kind, _ in ladder.rungs)
    heads = sum(kind == "head" for kind, _ in ladder.rungs)
    ends = [(shapes, f"all {bits}-bit, float compute for every shape")] if shapes else []
    if heads:
        ends.append((shapes + heads, "the LM head and table in their finer blocks"))
    ends.append((len(ladder.rungs), "every layer at 8 bits"))
    low, high, top = 0, 0, first  # rung 0 missed
    for end, step in ends:
        if end > low:
            high, top = end, ladder.judge(end, step)
            if top.meets_target:
                break
            low = end
    if not top.meets_target:  # float weights: the rest of the ladder
        low = len(ladder.rungs)
        ladder.rungs += [("float", layer) for layer in ladder.by_loss_per_byte()]
        high = len(ladder.rungs)
        top = ladder.judge(high, "every linear layer in float")
    total = search.rungs = len(ladder.rungs)
    if not top.meets_target:  # the end of the ladder: the final verification decides
        best = max(ladder.trials, key=lambda t: t.token_agreement - t.ppl_ratio)
        search.exhausted = (
            f"the text budget cannot be met on {len(text.judge_windows)} calibration windows: best reached "
            f"perplexity ratio {best.ppl_ratio:.4f} (target {_shown(search.target_ppl_ratio)}), token agreement "
            f"{best.token_agreement:.4f} (target {_shown(search.target_token_agree)}) with {best.step}")
        search.taken = total
    else:
        taken, _ = fewest_rungs(lambda n: ladder.judge(n), low, high, top)
        search.taken = retreat(taken, total, context.retreat)
    ladder.settle(search.taken)
    return search


def _within_size(ladder: BitLadder, search: BitSearch, bits: int, levels: dict[int, int],
                 size_target: float) -> BitSearch:
    """The most faithful model within ``size_target``: every rung the size allows (8 bits, then
    float weights; not float compute, which costs time rather than bytes). Judged there and at
    rung 0, the two ends of the frontier."""
    lowered = ""
    if ladder.size_ratio(0) > size_target and bits == 4 and ladder.lower_heads():
        lowered = ", LM head and table too"  # below the recipe's head_bits only when the size asks for it
    ladder.judge(0, f"all {bits}-bit{lowered}")
    if ladder.size_ratio(0) > size_target:  # no rung adds fewer bytes than rung 0 holds
        search.exhausted = (f"no model reaches the size target {size_target:g}: every layer at {bits} bits"
                            f"{lowered} is {ladder.size_ratio(0):.4f} of the original")
        ladder.settle(0)
        return search
    search.rungs = ladder.add_target_rungs(bits, levels)
    search.taken = max(n for n, ratio in enumerate(ladder.size_ratios()) if ratio <= size_target)  # rung 0 fits
    if search.taken:  # rung 0 is judged already
        ladder.judge(search.taken, f"the most rungs within size {size_target:g}")
    ladder.settle(search.taken)
    return search


def _within_decode(ladder: BitLadder, search: BitSearch, bits: int, levels: dict[int, int], target: float,
                   timer: _DecodeTimer) -> BitSearch:
    """The most faithful model whose decode ms/token stays within ``target`` times the
    original's, measured: rung 0, then the target rungs (``add_target_rungs``). Each rung
    adds work per token, so the most rungs within the target (less ``SPEED_RESERVE`` for the
    timing noise the final check meets) are found by bisection; rung 0 and the rung taken are
    judged on text."""
    within = target * (1 - SPEED_RESERVE)
    speed = timer(ladder.written(0))
    ladder.judge(0, f"all {bits}-bit", decode_ratio=speed)
    if speed > within:
        search.exhausted = (f"no model reaches the decode target {target:g}: every layer at {bits} bits decodes "
                            f"at {speed:.3f}x the original's time per token")
        ladder.settle(0)
        return search
    search.rungs = top = ladder.add_target_rungs(bits, levels)
    measured = {0: speed}

    def decode_ratio(rungs: int) -> float:
        measured[rungs] = timer(ladder.written(rungs))
        logger.info("blockwise search: %d of %d rungs decode at %.3fx the original's time (target %.3g)", rungs,
                    top, measured[rungs], within)
        return measured[rungs]

    low = search.taken = most_rungs(lambda rungs: decode_ratio(rungs) <= within, 0, top)
    if low:
        ladder.judge(low, f"the most rungs decoding within {target:g}", decode_ratio=measured[low])
    ladder.settle(low)
    return search


class _DecodeTimer:
    """Decode ms/token of a model file over the reference's: interleaved, median of rounds
    (``verify.latency.interleaved_latency``), after a prefill of ``prompt``."""

    def __init__(self, reference: str, prompt: Any, threads: int | None) -> None:
        from graphopt.verify.decoder import OrtDecoder

        self.base, self.prompt, self.threads = OrtDecoder(reference, threads=threads), list(prompt), threads

    def __call__(self, path: str) -> float:
        from graphopt.verify.decoder import OrtDecoder
        from graphopt.verify.latency import interleaved_latency

        candidate = OrtDecoder(path, threads=self.threads)
        return interleaved_latency(self.base, candidate, self.prompt, decode_tokens=32, rounds=7).decode_ratio


def _shown(value: float | None) -> str:
    return "none" if value is None else f"{value:.4f}"


class BitLadder:
    """The rungs of the bits search and the model's state on them."""

    def __init__(self, model: ir.Model, layers: list[Any], nodes: dict[int, Encoded], judge: TextJudge, *,
                 write: Callable[[ir.Model], str], encode: Encode, levels: dict[int, int],
                 reference_file_bytes: int = 0) -> None:
        self.model, self.nodes, self.judge_ = model, nodes, judge
        self.write, self.encode, self.levels = write, encode, levels
        self.linear = [layer for layer in layers if layer.role == "linear"]
        self.heads = [layer for layer in layers if layer.role != "linear"]
        self.base_bits = {id(layer): layer.bits for layer in self.linear}
        self._natural = {id(layer): layer.block_size for layer in self.heads}  # a head's block at rung 0
        self._head_codes: dict[int, dict[tuple[int, int], BlockQuantized]] = {}  # per head: (bits, block)
        self.rungs: list[tuple[str, Any]] = []  # ("level", [one layer]), ("head" | "bits" | "float", layer)
        self.floats: list[Any] = []  # the layers the rungs taken keep in float
        self.trials: list[BitTrial] = []
        # Sizes are the bytes the initializers hold, rung 0's as encoded and the float model's with
        # every encoded weight as it was, plus what the float model's file holds besides them (its
        # graph; alignment in external data): an estimate on the large side of the file's.
        self._stored: dict[tuple[int, int], int] = {}
        params = weights_nbytes(model)
        reference = params + sum(layer.tensor.nbytes - self._bytes(layer, layer.bits) for layer in layers)
        overhead = max(0, reference_file_bytes - reference)
        self.rung0_bytes, self.reference_bytes = params + overhead, reference + overhead

    def written(self, rungs: int) -> str:
        """The model with the first ``rungs`` rungs taken, written where onnxruntime reads it."""
        self.take(rungs)
        return self.write(self._with_floats(self.model.clone()) if self.floats else self.model)

    def judge(self, rungs: int, step: str | None = None, *, decode_ratio: float | None = None) -> TextVerdict:
        """The model at ``rungs`` judged on text (a trial; ``decode_ratio`` where it was timed)."""
        verdict = self.judge_.verdict(self.written(rungs))
        step = step or f"{rungs} of {len(self.rungs)} rungs"
        scores = verdict.scores
        self.trials.append(BitTrial(
            step=step, rungs=rungs, eight_bit_layers=sum(layer.bits == 8 for layer in self.linear),
            float_compute_layers=sum(layer.level == 1 for layer in self.linear), float_layers=len(self.floats),
            ppl_ratio=scores.ppl_ratio, token_agreement=scores.token_agreement, budget_used=verdict.error,
            noise=verdict.noise, meets=verdict.meets_target, size_ratio=self.size_ratio(rungs),
            decode_ratio=decode_ratio))
        logger.info("blockwise search: %s: perplexity ratio %.4f, agreement %.4f%s", step, scores.ppl_ratio,
                    scores.token_agreement, "" if verdict.meets_target else " (misses)")
        return verdict

    def lower_heads(self) -> bool:
        """The LM head and embedding table from 8 to 4 bits (a size target that rung 0 misses):
        rung 0's bytes shrink by what their codes shrink. False when there is none at 8 bits."""
        heads = [layer for layer in self.heads if layer.bits == 8]
        for layer in heads:
            before = self._count_bytes(layer, 8)
            layer.bits = 4
            self.nodes[id(layer)].swap(self.encode(layer, 4), self.levels[4])
            self.rung0_bytes -= before - self._count_bytes(layer, 4)
        return bool(heads)

    def add_quantized_rungs(self, bits: int, levels: dict[int, int], *, float_compute: bool = True) -> None:
        """The float-compute rungs (4 bits on int8 activations only; with ``float_compute``), the
        head and table at their finer block (with ``float_compute``: a text search's), then 8 bits
        per layer, the most sensitive first."""
        if float_compute and bits == 4 and levels[4] == 4:
            self.rank_shapes()
        if float_compute:
            self.rungs += [("head", layer) for layer in self.heads if layer.finer_block]
        self.rungs += [("bits", layer) for layer in
                       sorted((layer for layer in self.linear if layer.bits != 8), key=lambda layer: -layer.sensitivity)]

    def add_target_rungs(self, bits: int, levels: dict[int, int]) -> int:
        """The rungs a size or speed target climbs: 8 bits per layer, then float weights per
        layer (no float compute: it costs time, not bytes, and is the slower kernel where 4 bits
        read int8 activations). Returns the ladder's length."""
        self.add_quantized_rungs(bits, levels, float_compute=False)
        self.rungs += [("float", layer) for layer in self.by_loss_per_byte()]
        return len(self.rungs)

    def rank_shapes(self) -> None:
        """The float-compute rungs, a layer each: each shape's layers in float compute alone,
        judged once; the shapes whose agreement gained most against what their perplexity ratio
        lost first, and within a shape the layers of the largest ``activation_loss`` first (a
        shape's gain per ms it costs ranked worse on SmolLM2's GGUF: the shapes' gains do not add
        up, and 106 layers were needed instead of 45)."""
        groups: dict[tuple[int, int], list[Any]] = {}
        for layer in self.linear:
            groups.setdefault(layer.shape, []).append(layer)
        base = self.trials[0]
        gains = []
        for shape, group in groups.items():
            self.rungs = [("level", group)]
            trial = self.judge(1, f"float compute for the {len(group)} layers of shape {shape[0]}x{shape[1]}")
            gains.append((trial.scores.token_agreement - base.token_agreement
                          - (trial.scores.ppl_ratio - base.ppl_ratio), shape))
        self.rungs = [("level", [layer]) for gain, shape in sorted(gains, reverse=True)
                      for layer in sorted(groups[shape], key=lambda layer: -layer.activation_loss)]
        self.take(0)

    def size_ratios(self, rungs: int | None = None) -> list[float]:
        """The model's bytes over the float model's with 0, 1, … every rung taken: rung 0 as
        written, plus what each rung's layer gains (8 bits, or its float weight)."""
        total, ratios = self.rung0_bytes, []
        for kind, layer in [("", None), *self.rungs[:rungs]]:
            if kind == "bits":
                total += self._bytes(layer, 8) - self._bytes(layer, self.base_bits[id(layer)])
            elif kind == "float":
                total += layer.tensor.nbytes - self._bytes(layer, 8)
            elif kind == "head":  # more blocks: a float32 scale each
                elements = layer.shape[0] * layer.shape[1]
                total += 4 * (elements // layer.finer_block - elements // self._natural[id(layer)])
            ratios.append(total / self.reference_bytes)
        return ratios

    def size_ratio(self, rungs: int) -> float:
        return self.size_ratios(rungs)[-1]

    def _bytes(self, layer: Any, bits: int) -> int:
        """What the layer's encoding stores at ``bits``: codes, scales and its zero points or offsets."""
        key = (id(layer), bits)
        if key not in self._stored:
            self._stored[key] = self._count_bytes(layer, bits)
        return self._stored[key]

    def _count_bytes(self, layer: Any, bits: int) -> int:
        quantized = self.encode(layer, bits)
        encoded = self.nodes[id(layer)]
        total = quantized.packed_codes().nbytes + quantized.scales.nbytes
        if quantized.symmetric:  # no zero points or offsets once settled (drop_zero_terms)
            return total
        if encoded.zero_points is not None:
            total += quantized.packed_zero_points().nbytes
        if encoded.offsets is not None:
            total += 2 * quantized.scales.size  # float16, one per block
        return total

    def by_loss_per_byte(self) -> list[Any]:
        """The linear layers, the largest output loss at 8 bits per float byte it would cost first."""
        def per_byte(layer: Any) -> float:
            k, n = layer.shape
            return relative_loss(self.encode(layer, 8), layer.weight, layer.hessian) / (k * n)

        ranked = sorted(self.linear, key=per_byte, reverse=True)
        for layer in self.linear:
            layer.release()
        return ranked

    def take(self, rungs: int) -> None:
        """The model with the first ``rungs`` rungs taken and no other (float weights: listed in
        ``floats``, restored on a copy when judged)."""
        taken = self.rungs[:rungs]
        finer = {id(layer) for kind, layer in taken if kind == "head"}
        for layer in self.heads:
            if layer.finer_block:
                self._set_block(layer, layer.finer_block if id(layer) in finer else self._natural[id(layer)])
        float_compute = {id(layer) for kind, group in taken if kind == "level" for layer in group}
        eight = {id(layer) for kind, layer in taken if kind in ("bits", "float")}
        self.floats = [layer for kind, layer in taken if kind == "float"]
        for layer in self.linear:
            bits = 8 if id(layer) in eight else self.base_bits[id(layer)]
            level = 1 if id(layer) in float_compute and bits != 8 else None
            node = self.nodes[id(layer)]
            if layer.bits != bits:
                layer.bits = bits
                node.swap(self.encode(layer, bits), self.levels[bits])
            if layer.level != level:
                layer.level = level
                node.set_level(self.levels[layer.bits] if level is None else level)

    def _set_block(self, layer: Any, block: int) -> None:
        """A head or table re-pointed at its codes in ``block`` (each block's codes made once)."""
        codes = self._head_codes.setdefault(id(layer), {})
        if (layer.bits, layer.block_size) not in codes:
            codes[layer.bits, layer.block_size] = layer.encoded[layer.bits]
        if layer.block_size == block:
            return
        layer.block_size, key = block, (layer.bits, block)
        if key not in codes:
            layer.encoded.pop(layer.bits, None)
            codes[key] = self.encode(layer, layer.bits)
        layer.encoded[layer.bits] = codes[key]
        self.nodes[id(layer)].swap(codes[key], self.levels[layer.bits])

    def settle(self, rungs: int) -> None:
        """The chosen rungs, in place: float weights restored in the model itself."""
        self.take(rungs)
        self._with_floats(self.model)
        for layer in self.floats:
            layer.kept_float = True
        for layer in self.linear:
            if not layer.kept_float and layer.encoded[layer.bits].symmetric:
                drop_zero_terms(self.model.graph, self.nodes[id(layer)])

    def _with_floats(self, model: ir.Model) -> ir.Model:
        for layer in self.floats:
            weight = layer.tensor
            if layer.input_scales is not None:  # its input comes divided by s (AWQ, SmoothQuant): diag(s)·W
                weight = ir.tensor(layer.weight * layer.input_scales[:, None], name=weight.name)
                layer.release()
            restore_float(model.graph, self.nodes[id(layer)], weight, layer.use.weight.name or layer.name)
        return model


__all__ = ["BitLadder", "search_bits"]
