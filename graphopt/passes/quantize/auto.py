"""`quantize-int8`: the best int8 form for each layer of this model on this CPU, within the
run's budget.

1. Each layer gets its int8 compute form — dynamic for MatMul/Gemm, DynamicQuantizeLSTM for
   LSTM, static QDQ for Conv/ConvTranspose — only where the machine's speed profile
   (measured once, cached, see profile.py) says that form is at least ``min_speedup``
   faster than float; every other float weight becomes weight-only int8 (float speed, 4×
   smaller): GRU and RNN, which have no int8 kernel in onnxruntime, always do (W and R both).
2. The mixed model is judged by ``verify.judge`` on the held-out part of the calibration data
   (never on the samples it was calibrated on), against the run's budget with its reserve.
3. If it misses, layers climb down a ladder to float, one rung at a time: first int8 compute →
   weight-only, the layers costing the most budget per millisecond saved first; then
   weight-only → float, the most budget per byte saved first. Each layer's cost is measured
   alone (only that layer quantized, the rest float); the smallest number of rungs that
   meets the target is found by bisection over the ladder.
4. ``context.retreat`` > 0 (the final verification missed the budget on unseen data) takes
   that many halvings of the rest of the ladder beyond what the search chose.
Evaluation sessions run single-threaded, so the same inputs give the same choices.
"""

from __future__ import annotations

import dataclasses
import logging
import re
from pathlib import Path
from typing import Any, Literal

import onnx_ir as ir

from graphopt.passes.base import GraphoptPass, PassContext, PassResult, check_fractions
from graphopt.passes.pipeline import Pipeline
from graphopt.passes.quantize.calibrate import collect
from graphopt.passes.quantize.dynamic import QuantizeDynamicPass, dynamic_refusal, weight_form
from graphopt.passes.quantize.profile import SpeedProfile, default_cache_dir
from graphopt.passes.quantize.recurrent import float_recurrent_notes
from graphopt.passes.quantize.static import StaticPlan, apply_static, calibrate_static, plan_static, static_refusal
from graphopt.passes.weights import RECURRENT_OPS, WEIGHT_OPS, WeightUse, weight_use, weight_uses
from graphopt.passes.quantize.weight_only import QuantizeWeightsPass
from graphopt.passes.registry import register
from graphopt.progress import progress
from graphopt.verify.judge import Judge, ParityVerdict, hold_out, run_budget
from graphopt.verify.search import fewest_rungs, retreat

logger = logging.getLogger(__name__)

# Held-out feeds judging one layer alone: a ranking needs less evidence than a choice.
PROBE_FEEDS = 8


@dataclasses.dataclass
class LayerChoice:
    node: str
    kind: str
    mode: str  # "dynamic", "static", "weight-only", "float"
    reason: str
    float_ms: float | None = None
    int8_ms: float | None = None
    weight_bytes: int = 0
    compute_alone: float | None = None  # budget share used with only this layer in int8 compute
    compute_measured: str = ""  # what the deciding metric read then
    weight_only_alone: float | None = None  # budget share used with only this layer weight-only
    weight_only_measured: str = ""
    label: str = ""  # a readable name: the node's, or its parameters' where the node's is generated


@dataclasses.dataclass(frozen=True)
class Rung:
    """One step down the ladder: ``layer`` goes to ``mode``."""

    layer: LayerChoice
    mode: Literal["weight-only", "float"]


def _label(use: WeightUse) -> str:
    """Optimizers rename nodes ("Gemm_91"); the parameters usually keep the framework's names
    ("bert.encoder.layer.4.attention.self.value.bias"), which say which layer it is."""
    name = use.node.name or ""
    if name and not re.fullmatch(r"[A-Za-z]+_\d+", name):
        return name
    for value in reversed(use.node.inputs[1:]):
        if value is not None and value.name and not value.name.startswith(("onnx::", "_v_")):
            return f"{re.sub(r'[._](weight|bias)$', '', value.name)} ({name or use.kind})"
    return name or use.weight.name or use.kind


def _int8_form(use: WeightUse) -> str | None:
    if use.kind in ("MatMul", "Gemm", "LSTM") and dynamic_refusal(use) is None:
        return "dynamic"
    if use.kind in ("Conv", "ConvTranspose") and static_refusal(use) is None:
        return "static"
    return None


def _no_compute_form(use: WeightUse) -> str:
    """Why a layer is weight-only without asking the profile: a recurrent layer names what
    its int8 kernel lacks."""
    reason = dynamic_refusal(use) if use.kind in RECURRENT_OPS else None
    return reason or "no int8 compute form here"


@register
class QuantizeInt8Pass(GraphoptPass, name="quantize-int8",
                       summary="per layer: int8 compute where this CPU runs it faster, else weight-only, else float; within the budget"):
    role = "compress"

    class Options:
        min_speedup: float = 1.1
        """An int8 compute form is used only when the profile says float/int8 time >= this."""
        min_cosine: float = 0.995
        """Held-out cosine for embeddings and maps when the run states no budget."""
        min_top1: float = 0.99
        """Held-out top-1 agreement for class scores when the run states no budget."""
        holdout: float = 0.25
        """Fraction of the calibration feeds (the last ones) kept for judging."""
        margin: float = 0.4
        """Part of the error budget kept in reserve: a small held-out set flatters, and unseen
        data must still meet the budget."""
        smooth_alpha: float = 0.85
        smooth_min_outlier: float = 8.0
        method: Literal["minmax", "percentile", "entropy", "mse"] = "percentile"
        min_elements: int = 1024
        sensitivity: bool = False
        """Measure every int8-compute layer's cost alone for the report even when the budget
        is met without the ladder (costs one model build and run per layer)."""

    def __init__(self, **options: Any) -> None:
        super().__init__(**options)
        check_fractions(self.name, holdout=self.options.holdout, margin=self.options.margin)

    def searches(self) -> bool:
        return True

    def requires(self, model: ir.Model) -> None:
        self.require_opset(model, 13)

    def needs_calibration(self) -> bool:
        return True

    def apply(self, model: ir.Model, context: PassContext) -> PassResult:
        from graphopt.verify.gate import Thresholds

        split = hold_out(context.calibration_feeds(self.name).feeds, self.options.holdout)
        budget = run_budget(model, context.budget,
                            Thresholds(min_cosine=self.options.min_cosine, min_top1=self.options.min_top1))
        judge = Judge(model, split.judge, budget, reserve=self.options.margin, weak=split.weak)
        uses, skipped = weight_uses(model.graph, WEIGHT_OPS, self.options.min_elements, context.exclude)
        names = sorted({u.node.inputs[0].name for u in uses if u.node.inputs[0].name and u.kind != "Gather"})
        stats = collect(model, names, split.tune, threads=1)
        build = _Builder(model, uses, split.tune, self.options, dataclasses.replace(context, activation_stats=stats))
        choices, profile = self._speed_choices(uses, stats, context)
        ladder = _Ladder(choices, build, judge)
        verdict = judge.verdict(build(choices))
        if ladder.compute and (not verdict.meets_target or self.options.sensitivity or context.analyze):
            ladder.measure("weight-only")
        first, second = 0, 0
        if not verdict.meets_target:
            first, second, verdict = ladder.search()
        if context.retreat:
            first, second = ladder.retreat(first, second, context.retreat)
            verdict = ladder.judge_plan(first, second)
        exhausted = None
        if not verdict.meets_budget:  # the end of the ladder: the final verification decides
            exhausted = (f"budget cannot be met: the best reachable held-out value is {verdict.measured()} "
                         f"({budget.describe()})")
        taken = first + second
        final = ladder.settle(first, second)
        notes = ([exhausted] if exhausted else []) + _notes(verdict, final, split.weak) \
            + float_recurrent_notes(model.graph, skipped)
        applied = _apply(model, final, build)
        by_mode = {mode: sum(c.mode == mode for c in final) for mode in ("dynamic", "static", "weight-only", "float")}
        return PassResult(
            model,
            modified=any(c.mode != "float" for c in final),
            notes=notes,
            exhausted=exhausted,
            changes={**{f"{m} layers": n for m, n in by_mode.items()}, "rungs taken for accuracy": taken},
            details={
                "layers": [{**dataclasses.asdict(c), **_numbers(applied.get(c.node, {}))} for c in final],
                "skipped": skipped,
                "budget": budget.describe(),
                "held_out": verdict.to_dict(),
                "ladder": {"rungs": ladder.length, "to_weight_only": first, "to_float": second,
                           "retreat": context.retreat},
                "calibration_feeds": len(split.tune),
                "held_out_feeds": len(split.judge),
                "profile": profile,
            },
        )

    def _speed_choices(self, uses: list[WeightUse], stats: dict[str, Any],
                       context: PassContext) -> tuple[list[LayerChoice], dict[str, Any]]:
        """Each layer's fastest form by this machine's speed profile, and where that profile is."""
        shapes = {n: s.shape for n, s in stats.items()}
        threads = context.threads or _cores()
        profile = SpeedProfile(Path(context.cache_dir) if context.cache_dir else default_cache_dir(), threads,
                               weight_form("auto", context))
        choices = []
        for use in uses:
            form = _int8_form(use)
            shape = shapes.get(use.node.inputs[0].name or "")
            nbytes = use.nbytes
            if form is None or not shape:
                choices.append(LayerChoice(use.name, use.kind, "weight-only", _no_compute_form(use),
                                           weight_bytes=nbytes, label=_label(use)))
                continue
            timing = profile.timings(use, tuple(shape), form)
            speedup = timing["float_ms"] / timing["int8_ms"] if timing["int8_ms"] > 0 else 0.0
            mode = form if speedup >= self.options.min_speedup else "weight-only"
            reason = f"profile: int8 {form} is {speedup:.2f}x float speed" + (
                "" if mode == form else f" (< {self.options.min_speedup}x)")
            choices.append(LayerChoice(use.name, use.kind, mode, reason, timing["float_ms"], timing["int8_ms"],
                                       weight_bytes=nbytes, label=_label(use)))
        profile.save()
        return choices, {"path": str(profile.path), "machine": profile.key,
                         "measured": profile.measured, "reused": profile.reused}


def _notes(verdict: ParityVerdict, final: list[LayerChoice], weak: bool) -> list[str]:
    notes = []
    if not verdict.meets_target:
        notes.append(f"held-out {verdict.measured()} meets the budget but not its reserve: "
                     "unseen data may land close to the budget")
    if weak:
        notes.append("one calibration feed: it both calibrated and judged the result (weak evidence)")
    kept = [c for c in final if c.mode == "float"]
    if kept:
        notes.append(f"{len(kept)} layer(s) left in float for accuracy: "
                     + ", ".join(c.label or c.node for c in kept[:8]) + (" …" if len(kept) > 8 else ""))
    return notes


class _Ladder:
    """The rungs from the speed choices down to all float, in the order they are taken."""

    def __init__(self, choices: list[LayerChoice], build: _Builder, judge: Judge) -> None:
        self.choices = choices
        self.build = build
        self.judge = judge
        self.compute = [c for c in choices if c.mode in ("dynamic", "static")]
        self.initial = {c.node: c.mode for c in choices}
        self.measured: set[str] = set()

    @property
    def length(self) -> int:
        return len(self.compute) + len(self.choices)

    def retreat(self, first: int, second: int, times: int) -> tuple[int, int]:
        """``times`` halvings of the ladder left below the whole first phase and ``second``."""
        taken = retreat(len(self.compute) + second if second else first, self.length, times)
        return min(taken, len(self.compute)), max(0, taken - len(self.compute))

    def measure(self, step: Literal["weight-only", "float"]) -> None:
        """Each layer's budget share alone: its int8 compute form ("weight-only" step) or its
        weight-only form ("float" step), every other layer float."""
        if step in self.measured:
            return
        self.measured.add(step)
        layers = self.compute if step == "weight-only" else self.choices
        form = {c.node: (self.initial[c.node] if step == "weight-only" else "weight-only") for c in layers}
        logger.info("int8: measuring %d layers alone (%s), one model build and run each", len(layers),
                    "int8 compute" if step == "weight-only" else "weight-only")
        float_plan = [dataclasses.replace(c, mode="float") for c in self.choices]
        label = "alone in int8" if step == "weight-only" else "alone weight-only"
        for layer in progress(layers, f"int8: {label}", unit="layer"):
            single = [dataclasses.replace(c, mode=form[layer.node]) if c.node == layer.node else c for c in float_plan]
            verdict = self.judge.verdict(self.build(single), optimize=False, limit=PROBE_FEEDS)
            if step == "weight-only":
                layer.compute_alone, layer.compute_measured = verdict.damage, verdict.measured()
            else:
                layer.weight_only_alone, layer.weight_only_measured = verdict.damage, verdict.measured()

    def rungs(self) -> tuple[list[Rung], list[Rung]]:
        """(compute → weight-only, most budget per millisecond saved first; weight-only →
        float, most budget per byte saved first)."""
        def per_ms(c: LayerChoice) -> float:
            return (c.compute_alone or 0.0) / max((c.float_ms or 0.0) - (c.int8_ms or 0.0), 1e-6)

        def per_byte(c: LayerChoice) -> float:
            return (c.weight_only_alone or 0.0) / max(c.weight_bytes * 0.75, 1.0)

        first = [Rung(c, "weight-only") for c in sorted(self.compute, key=per_ms, reverse=True)]
        second = [Rung(c, "float") for c in sorted(self.choices, key=per_byte, reverse=True)]
        return first, second

    def plan(self, first: int, second: int = 0) -> list[LayerChoice]:
        """The choices with the first ``first`` rungs of the first phase and the first
        ``second`` of the second taken."""
        if first and self.compute:
            self.measure("weight-only")
        if second:
            self.measure("float")
        phase1, phase2 = self.rungs()
        modes = dict(self.initial)
        for rung in phase1[:first] + phase2[:second]:
            modes[rung.layer.node] = rung.mode
        return [dataclasses.replace(c, mode=modes[c.node]) for c in self.choices]

    def judge_plan(self, first: int, second: int = 0) -> ParityVerdict:
        return self.judge.verdict(self.build(self.plan(first, second)))

    def search(self) -> tuple[int, int, ParityVerdict]:
        """The fewest rungs whose model meets the target, the speed choices having missed it.

        When all of the first phase meets the target, the fewest of its rungs (bisection).
        Otherwise the fewest layers in float with the whole first phase taken, and then the
        fewest of the first phase's rungs still needed beside those float layers: a layer
        kept in float may be what made the others fall back."""
        count = len(self.compute)
        if count:
            top = self.judge_plan(count)
            if top.meets_target:
                first, verdict = fewest_rungs(lambda n: self.judge_plan(n), 0, count, top)
                return first, 0, verdict
        # The speed choices, or the whole first phase, missed: with no float layer it misses.
        second, verdict = fewest_rungs(lambda n: self.judge_plan(count, n), 0, len(self.choices),
                                  self.judge_plan(count, len(self.choices)))
        if count:
            first, verdict = fewest_rungs(lambda n: self.judge_plan(n, second), -1, count, verdict)
            return first, second, verdict
        return 0, second, verdict

    def settle(self, first: int, second: int) -> list[LayerChoice]:
        """The plan of those rungs, each moved layer saying why."""
        final = self.plan(first, second)
        phase1, phase2 = self.rungs()
        moved = {r.layer.node for r in phase1[:first] + phase2[:second]}
        for choice in final:
            if choice.node not in moved or choice.mode == self.initial[choice.node]:
                continue
            if choice.mode == "weight-only":
                alone, measured, action, form = choice.compute_alone, choice.compute_measured, "fell back", "int8 compute"
            else:
                alone, measured = choice.weight_only_alone, choice.weight_only_measured
                action, form = "kept in float", "weight-only"
            share = "n/a" if alone is None else f"{alone:.3g}"
            choice.reason = f"{action} for accuracy (alone in {form}: {share} of the budget, {measured})"
        return final


class _Builder:
    """Builds a quantized copy of the float model for a plan of layer choices."""

    def __init__(self, model: ir.Model, uses: list[WeightUse], tune: list[dict], options: Any,
                 context: PassContext) -> None:
        self.model = model
        self.tune = tune
        self.options = options
        self.context = context
        self.static = _StaticParams(model, uses, tune, options)

    def __call__(self, choices: list[LayerChoice]) -> ir.Model:
        candidate = self.model.clone()
        _apply(candidate, choices, self)
        return candidate


class _StaticParams:
    """Activation parameters of every static candidate, calibrated once on the float model
    and reused by every trial plan (calibration is the expensive part)."""

    def __init__(self, model: ir.Model, uses: list[WeightUse], tune: list[dict], options: Any) -> None:
        candidates = [u for u in uses if _int8_form(u) == "static"]
        self.plans: dict[str, StaticPlan] = {}
        if candidates:
            stats = calibrate_static(model, candidates, tune, options.method, threads=1)
            self.plans = {p.use.node.name: p for p in plan_static(candidates, stats, options.method)}

    def for_graph(self, graph: ir.Graph, names: set[str]) -> list[StaticPlan]:
        plans = []
        for node in graph:
            if node.name in names and node.name in self.plans:
                use, _ = weight_use(node, graph)
                plans.append(dataclasses.replace(self.plans[node.name], use=use))
        return plans


def _apply(model: ir.Model, choices: list[LayerChoice], build: _Builder) -> dict[str, dict[str, Any]]:
    """Rewrite ``model`` as ``choices`` say: static layers, then dynamic, then weight-only
    ("float" choices stay untouched). Returns each rewritten layer's report by node name."""
    from graphopt.verify.feeds import FeedSet

    inner = dataclasses.replace(build.context, calibration=FeedSet(list(build.tune), "calibration (tuning part)", False),
                                threads=1)
    options = build.options
    static_nodes = {c.node for c in choices if c.mode == "static"}
    reports: list[dict[str, Any]] = []
    if static_nodes:
        reports += apply_static(model.graph, build.static.for_graph(model.graph, static_nodes),
                                weight_form("auto", build.context))
    dynamic = tuple(c.node for c in choices if c.mode == "dynamic")
    weight_only = tuple(c.node for c in choices if c.mode == "weight-only")
    steps: list[GraphoptPass] = []
    if dynamic:
        steps.append(QuantizeDynamicPass(nodes=dynamic, smooth_alpha=options.smooth_alpha,
                                         smooth_min_outlier=options.smooth_min_outlier,
                                         min_elements=options.min_elements))
    if weight_only:
        steps.append(QuantizeWeightsPass(nodes=weight_only, min_elements=options.min_elements))
    if steps:
        # The sub-passes rewrite this trial's model in place: the pipeline runs them, unannounced
        # (a search builds many trials) and unchecked (the judge runs every trial).
        result = Pipeline(steps, context=inner).run(model, announce=False)
        reports += [layer for step in result.steps for layer in step.details["layers"]]
    return {str(entry.get("node") or (entry.get("nodes") or [""])[0]): entry for entry in reports}


def _numbers(entry: dict[str, Any]) -> dict[str, Any]:
    """The quantization parameters and weight error a sub-pass reported for one layer."""
    keys = ("input_scale", "input_zero_point", "output_scale", "weight_relative_error", "relative_error",
            "smoothed", "scale_min", "scale_max", "bias_overflow_channels", "weight_form",
            "recurrent_relative_error")
    return {key: entry[key] for key in keys if key in entry}


def _cores() -> int:
    import os

    return os.cpu_count() or 1
