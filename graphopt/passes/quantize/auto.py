"""`quantize-int8`: the best int8 form for each layer of this model on this CPU.

1. Each layer gets its int8 compute form — dynamic for MatMul/Gemm, static QDQ for
   Conv/ConvTranspose — only where the machine's speed profile (measured once, cached, see
   profile.py) says that form is at least ``min_speedup`` faster than float; every other
   float weight becomes weight-only int8 (float speed, 4× smaller).
2. The mixed model is judged on the held-out part of the calibration data (never on the
   samples it was calibrated on). If it misses ``min_cosine``, each int8-compute layer's
   sensitivity is measured (that layer alone in int8), and the most sensitive fall back to
   weight-only: the fewest that meet the budget (bisection over the ranking).
Evaluation sessions run single-threaded, so the same inputs give the same choices.
"""

from __future__ import annotations

import dataclasses
import logging
import re
from pathlib import Path
from typing import Any, Literal

import numpy as np
import onnx_ir as ir

from graphopt.errors import GateFailed, PassFailed
from graphopt.passes.base import GraphoptPass, PassContext, PassResult
from graphopt.passes.quantize.calibrate import collect
from graphopt.passes.quantize.dynamic import QuantizeDynamicPass, dynamic_refusal
from graphopt.passes.quantize.profile import SpeedProfile, default_cache_dir
from graphopt.passes.quantize.static import StaticPlan, apply_static, calibrate_static, plan_static, static_refusal
from graphopt.passes.quantize.targets import WEIGHT_OPS, WeightUse, weight_use, weight_uses
from graphopt.passes.quantize.weight_only import QuantizeWeightsPass
from graphopt.passes.registry import register

logger = logging.getLogger(__name__)


@dataclasses.dataclass
class LayerChoice:
    node: str
    kind: str
    mode: str  # "dynamic", "static", "weight-only"
    reason: str
    float_ms: float | None = None
    int8_ms: float | None = None
    sensitivity: float | None = None  # held-out cosine with only this layer in int8 compute
    label: str = ""  # a readable name: the node's, or its parameters' where the node's is generated


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
    if use.kind in ("MatMul", "Gemm") and dynamic_refusal(use) is None:
        return "dynamic"
    if use.kind in ("Conv", "ConvTranspose") and static_refusal(use) is None:
        return "static"
    return None


@register
class QuantizeInt8Pass(GraphoptPass):
    name = "quantize-int8"
    summary = "per layer: int8 compute where this CPU runs it faster, else weight-only; accuracy-guarded"

    @dataclasses.dataclass(frozen=True, kw_only=True)
    class Options:
        min_speedup: float = 1.1
        """An int8 compute form is used only when the profile says float/int8 time >= this."""
        min_cosine: float = 0.995
        """Held-out cosine the result must keep (a --min-cosine budget overrides it)."""
        holdout: float = 0.25
        """Fraction of the calibration feeds (the last ones) kept for judging."""
        margin: float = 0.4
        """Part of the error budget (1 - min_cosine) kept in reserve: a small held-out set
        flatters, and unseen data must still meet the budget."""
        smooth_alpha: float = 0.85
        smooth_min_outlier: float = 8.0
        method: Literal["minmax", "percentile", "entropy", "mse"] = "percentile"
        min_elements: int = 1024
        sensitivity: bool = False
        """Measure every int8-compute layer's sensitivity for the report even when the
        budget is met without fallback (costs one model build and run per layer)."""

    def requires(self, model: ir.Model) -> None:
        if model.opset_imports.get("", 1) < 13:
            raise ir.passes.PreconditionError("quantize-int8 needs opset >= 13; put upgrade-opset before it")

    def call(self, model: ir.Model) -> PassResult:
        feeds = self.calibration_feeds().feeds
        if len(feeds) < 2:
            raise PassFailed("quantize-int8 needs at least 2 calibration feeds (one is held out)")
        held = max(1, int(round(len(feeds) * self.options.holdout)))
        tune, judge = feeds[:-held], feeds[-held:]
        target = self._target()
        uses, skipped = weight_uses(model.graph, WEIGHT_OPS, self.options.min_elements)
        names = sorted({u.node.inputs[0].name for u in uses if u.node.inputs[0].name and u.kind != "Gather"})
        self.context = dataclasses.replace(self.context, activation_stats=collect(model, names, tune, threads=1))
        choices = self._speed_choices(model, uses, tune)
        self._static = _StaticParams(model, uses, tune, self.options)
        reference = _outputs(model, judge)
        compute = [c for c in choices if c.mode in ("dynamic", "static")]
        cosine = self._judge(model, choices, tune, judge, reference)
        fallback = 0
        if compute and (cosine < target or self.options.sensitivity or self.context.analyze):
            self._measure_sensitivity(model, choices, compute, tune, judge, reference)
        if cosine < target and compute:
            fallback, cosine = self._fall_back(model, choices, compute, tune, judge, reference, target)
        if cosine < self._budget():
            raise GateFailed(
                f"budget cannot be met: the best reachable held-out cosine is {cosine:.6f} "
                f"(budget {self._budget():.6f}, with {fallback} of {len(compute)} int8-compute layers weight-only)",
                ["min_cosine"],
            )
        notes = [] if cosine >= target else [
            f"held-out cosine {cosine:.6f} meets the budget {self._budget():.6f} but not its reserve "
            f"(target {target:.6f}): unseen data may land close to the budget"]
        applied = _apply(model, choices, self._static, tune, self.options, self.context)
        by_mode = {mode: sum(c.mode == mode for c in choices) for mode in ("dynamic", "static", "weight-only")}
        return PassResult(
            model,
            modified=True,
            notes=notes,
            changes={**{f"{m} layers": n for m, n in by_mode.items()}, "fell back for accuracy": fallback},
            details={
                "layers": [{**dataclasses.asdict(c), **_numbers(applied.get(c.node, {}))} for c in choices],
                "skipped": skipped,
                "held_out_cosine": cosine,
                "target_cosine": target,
                "calibration_feeds": len(tune),
                "held_out_feeds": len(judge),
                "profile": self._profile_info,
            },
        )

    def _budget(self) -> float:
        """The cosine the user asked for (--min-cosine), else this pass's default."""
        budget = getattr(self.context, "budget", None)
        stated = getattr(budget, "min_cosine", None) if budget is not None else None
        return stated if stated is not None else self.options.min_cosine

    def _target(self) -> float:
        """The budget with part of its error kept in reserve: what the search aims for."""
        return 1.0 - (1.0 - self._budget()) * (1.0 - self.options.margin)

    def _speed_choices(self, model: ir.Model, uses: list[WeightUse], tune: list[dict]) -> list[LayerChoice]:
        shapes = {n: s.shape for n, s in self.context.activation_stats.items()}
        threads = self.context.threads or _cores()
        profile = SpeedProfile(Path(self.context.cache_dir) if self.context.cache_dir else default_cache_dir(), threads)
        choices = []
        for use in uses:
            form = _int8_form(use)
            shape = shapes.get(use.node.inputs[0].name or "")
            if form is None or not shape:
                choices.append(LayerChoice(use.name, use.kind, "weight-only", "no int8 compute form here",
                                           label=_label(use)))
                continue
            timing = profile.timings(use, tuple(shape), form)
            speedup = timing["float_ms"] / timing["int8_ms"] if timing["int8_ms"] > 0 else 0.0
            mode = form if speedup >= self.options.min_speedup else "weight-only"
            reason = f"profile: int8 {form} is {speedup:.2f}x float speed" + (
                "" if mode == form else f" (< {self.options.min_speedup}x)")
            choices.append(LayerChoice(use.name, use.kind, mode, reason, timing["float_ms"], timing["int8_ms"],
                                       label=_label(use)))
        profile.save()
        self._profile_info = {"path": str(profile.path), "machine": profile.key,
                              "measured": profile.measured, "reused": profile.reused}
        return choices

    def _judge(self, model: ir.Model, choices: list[LayerChoice], tune: list[dict], judge: list[dict],
               reference: list[np.ndarray]) -> float:
        candidate = model.clone()
        _apply(candidate, choices, self._static, tune, self.options, self.context)
        return _cosine(reference, _outputs(candidate, judge))

    def _measure_sensitivity(self, model, choices, compute, tune, judge, reference) -> None:
        """Held-out cosine with only that layer in its int8 compute form, everything else float."""
        logger.info("int8: measuring the sensitivity of %d layers (one model build and run each)", len(compute))
        float_plan = [dataclasses.replace(c, mode="float") for c in choices]
        probe = judge[:8]  # ranking needs less evidence than the final judgement
        for choice in _progress(compute, "sensitivity", self.context.progress):
            single = [dataclasses.replace(c, mode=choice.mode) if c.node == choice.node else c for c in float_plan]
            candidate = model.clone()
            _apply(candidate, single, self._static, tune, self.options, self.context)
            choice.sensitivity = _cosine(reference[:8], _outputs(candidate, probe, optimize=False))

    def _fall_back(self, model, choices, compute, tune, judge, reference, target) -> tuple[int, float]:
        """Fall back the layers that cost the most accuracy per millisecond they save."""
        def damage_per_ms(choice: LayerChoice) -> float:
            saved = max((choice.float_ms or 0.0) - (choice.int8_ms or 0.0), 1e-6)
            return (1.0 - choice.sensitivity) / saved

        ranking = sorted(compute, key=damage_per_ms, reverse=True)
        low, high, best = 0, len(ranking), None
        while low < high:  # the smallest number of fallbacks that meets the target
            middle = (low + high) // 2
            trial = self._with_fallback(choices, ranking[:middle])
            cosine = self._judge(model, trial, tune, judge, reference)
            if cosine >= target:
                high, best = middle, (middle, cosine)
            else:
                low = middle + 1
        count = low
        if best is None or best[0] != count:
            best = (count, self._judge(model, self._with_fallback(choices, ranking[:count]), tune, judge, reference))
        for choice in ranking[:count]:
            choice.mode = "weight-only"
            choice.reason = f"fell back for accuracy (alone in int8: cosine {choice.sensitivity:.5f})"
        return best

    @staticmethod
    def _with_fallback(choices: list[LayerChoice], fallen: list[LayerChoice]) -> list[LayerChoice]:
        names = {c.node for c in fallen}
        return [dataclasses.replace(c, mode="weight-only") if c.node in names else c for c in choices]


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


def _apply(model: ir.Model, choices: list[LayerChoice], static: _StaticParams, tune: list[dict],
           options: Any, context: PassContext) -> dict[str, dict[str, Any]]:
    """Rewrite ``model`` as ``choices`` say: static layers, then dynamic, then weight-only
    ("float" choices stay untouched). Returns each rewritten layer's report by node name."""
    from graphopt.verify.feeds import FeedSet

    inner = dataclasses.replace(context, calibration=FeedSet(list(tune), "calibration (tuning part)", False),
                                threads=1)
    static_nodes = {c.node for c in choices if c.mode == "static"}
    reports: list[dict[str, Any]] = []
    if static_nodes:
        reports += apply_static(model.graph, static.for_graph(model.graph, static_nodes))
    dynamic = tuple(c.node for c in choices if c.mode == "dynamic")
    weight_only = tuple(c.node for c in choices if c.mode == "weight-only")
    steps: list[GraphoptPass] = []
    if dynamic:
        steps.append(QuantizeDynamicPass(nodes=dynamic, smooth_alpha=options.smooth_alpha,
                                         smooth_min_outlier=options.smooth_min_outlier,
                                         min_elements=options.min_elements))
    if weight_only:
        steps.append(QuantizeWeightsPass(nodes=weight_only, min_elements=options.min_elements))
    for step in steps:
        step.context = inner
        reports += step(model).details["layers"]
    return {str(entry.get("node") or (entry.get("nodes") or [""])[0]): entry for entry in reports}


def _numbers(entry: dict[str, Any]) -> dict[str, Any]:
    """The quantization parameters and weight error a sub-pass reported for one layer."""
    keys = ("input_scale", "input_zero_point", "output_scale", "weight_relative_error", "relative_error",
            "smoothed", "scale_min", "scale_max", "bias_overflow_channels")
    return {key: entry[key] for key in keys if key in entry}


def _outputs(model: ir.Model, feeds: list[dict], *, optimize: bool = True) -> list[np.ndarray]:
    from graphopt.verify.runtime import make_session

    session = make_session(ir.serde.serialize_model(model).SerializeToString(), optimize=optimize, threads=1)
    names = [o.name for o in session.get_outputs()]
    return [_per_sample(session.run(names, feed)) for feed in feeds]


def _per_sample(values: list[np.ndarray]) -> np.ndarray:
    """Outputs side by side, one row per sample; when the outputs disagree on their first axis
    (a Scan's final state next to its per-step outputs) the whole feed is one row."""
    rows = {len(v) if np.ndim(v) else 1 for v in values}
    count = rows.pop() if len(rows) == 1 else 1
    return np.concatenate([np.asarray(v, np.float64).reshape(count, -1) for v in values], axis=1)


def _cosine(reference: list[np.ndarray], candidate: list[np.ndarray]) -> float:
    """Mean per-sample cosine over all outputs concatenated."""
    values = []
    for ref, cand in zip(reference, candidate):
        for r, c in zip(ref, cand):
            norm = np.linalg.norm(r) * np.linalg.norm(c)
            values.append(1.0 if np.array_equal(r, c) else (float(r @ c / norm) if norm > 0 else 0.0))
    return float(np.mean(values))


def _progress(items: list, label: str, enabled: bool):
    """A progress bar on stderr when the caller asked for one (the CLI, on a terminal)."""
    if not enabled:
        return items
    from tqdm import tqdm

    return tqdm(items, desc=label, unit="layer", leave=False)


def _cores() -> int:
    import os

    return os.cpu_count() or 1
