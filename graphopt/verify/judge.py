"""The one judge of a compressed model: every pass that searches under a budget and the final
gate measure with it, so a search and the gate cannot disagree about what they measured.

- **Budget** — bounds per output, resolved once per run: the user's ``--min-cosine``,
  ``--max-abs``, ``--min-top1`` when stated (they replace the recipe's defaults), otherwise
  the recipe's defaults by output kind (``verify.kinds``): agreement for class scores and
  recognisers, cosine for embeddings, maps and boxes.
- **Error** — how much of its budget a candidate uses, the worst bound over the outputs it
  covers: ``(1 - cosine) / (1 - min_cosine)``, ``(1 - top1) / (1 - min_top1)``,
  ``max_abs / max_abs_budget``. 1.0 is exactly at the budget; the metrics are those of
  ``verify.parity`` (cosine: mean over samples of each sample's flattened output; top-1:
  argmax agreement along the last axis).
- **Reserve** — a search aims below the budget: at most ``share × (1 - reserve)`` of it (a pass
  that leaves room for later lossy steps takes a ``share`` below 1), and, where the held-out
  set is big enough to estimate it, with two standard errors of the held-out estimate to
  spare, so that unseen data still lands within the budget.
- **Held-out split** — the last part of the calibration feeds judges, the rest calibrates;
  one feed alone does both, and the verdict says it is weak evidence.
- **Reference settings** — the float model with onnxruntime's graph optimizations off, the
  candidate as deployed (optimizations on), both single-threaded so that the same inputs
  always give the same choices.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from typing import Any, Literal

import onnx_ir as ir

from graphopt.verify.feeds import Feed
from graphopt.verify.detections import DEFAULT_SCORE_THRESHOLD
from graphopt.verify.kinds import AGREEMENT_KINDS, DETECTION_KINDS, PAIRED_KINDS
from graphopt.verify.parity import OutputParity, ParityReport, compare_outputs, run_outputs

Metric = Literal["cosine", "top1", "sequences", "detections", "max_abs"]

# Standard errors of the held-out estimate a search keeps between its result and the budget.
NOISE_SIGMAS = 2.0

_LABELS = {"cosine": "cosine (mean per sample)", "top1": "top-1 agreement",
           "sequences": "decoded sequences identical", "detections": "detections kept", "max_abs": "max abs difference"}
_CHECK_NAMES = {"cosine": "min_cosine", "top1": "min_top1", "sequences": "min_sequences",
                "detections": "min_detections", "max_abs": "max_abs"}
# A lossless candidate may differ from the reference by this multiple of the runtime's floor: it
# is itself another rounding of the same function, deployed under the same optimizations, so its
# distance is the base's own floor plus one of the same size (PP-OCRv4 rec: floor 7.9e-5; its
# simplified graph 6.6e-5 from the reference with optimizations off, 1.38e-4 with them on).
FLOOR_FACTOR = 2.0
# Detection outputs judged under a budget that names no detection bound keep this share.
DEFAULT_MIN_DETECTIONS = 0.97


@dataclasses.dataclass(frozen=True)
class Bound:
    """One metric's limit over the outputs it applies to. A max-abs bound may carry the
    runtime's floor per output (``with_floors``): how far the original itself moves between
    onnxruntime's optimization levels, which no candidate can be blamed for."""

    metric: Metric
    limit: float
    outputs: tuple[str, ...]
    floors: Mapping[str, float] = dataclasses.field(default_factory=dict)

    @property
    def check_name(self) -> str:
        return _CHECK_NAMES[self.metric]

    @property
    def label(self) -> str:
        return _LABELS[self.metric]

    def limit_for(self, output: str | None) -> float:
        """The limit on ``output``: a max-abs limit below the runtime's floor there is the floor."""
        if self.metric != "max_abs" or output is None:
            return self.limit
        return max(self.limit, FLOOR_FACTOR * self.floors.get(output, 0.0))

    def with_floors(self, floors: Mapping[str, float]) -> Bound:
        return dataclasses.replace(self, floors={k: v for k, v in floors.items() if k in self.outputs})

    def worst(self, parity: ParityReport) -> tuple[float | None, OutputParity | None]:
        """The measured value of the output that uses the most of this bound, and that output."""
        found = [(value, out) for out in parity.outputs
                 if out.name in self.outputs and (value := _value(out, self.metric)) is not None]
        if not found:
            return None, None
        return max(found, key=lambda item: self.error(item[0], item[1].name))

    def error(self, value: float | None, output: str | None = None) -> float:
        """Share of the budget ``value`` (measured on ``output``) uses: 1.0 exactly at the
        limit, inf when unmeasured."""
        if value is None or math.isnan(value):
            return math.inf
        limit = self.limit_for(output)
        if self.metric == "max_abs":
            return value / limit if limit > 0 else (0.0 if value == 0 else math.inf)
        allowance = 1.0 - limit
        lost = max(0.0, 1.0 - value)
        if allowance > 0:
            return lost / allowance
        return 0.0 if allowance == 0 and lost == 0 else math.inf  # a limit above 1: nothing meets it

    def noise(self, out: OutputParity, samples: int) -> float:
        """Standard error of this bound's error on a held-out set (0 where it cannot be told)."""
        if self.metric == "cosine" and samples > 1:
            spread = out.cosine_std / math.sqrt(samples)
        elif self.metric == "top1" and out.top1 is not None and out.top1_positions > 1:
            spread = math.sqrt(out.top1 * (1 - out.top1) / out.top1_positions)
        elif self.metric == "sequences" and out.sequences_same is not None and out.sequences > 1:
            spread = math.sqrt(out.sequences_same * (1 - out.sequences_same) / out.sequences)
        elif self.metric == "detections" and out.detections_kept is not None and out.detections_reference > 1:
            spread = math.sqrt(out.detections_kept * (1 - out.detections_kept) / out.detections_reference)
        else:
            return 0.0
        allowance = 1.0 - self.limit
        return spread / allowance if allowance > 0 else 0.0

    def passes(self, value: float | None, output: str | None = None) -> bool:
        limit = self.limit_for(output)
        return value is not None and (value <= limit if self.metric == "max_abs" else value >= limit)

    def to_dict(self) -> dict[str, Any]:
        data: dict[str, Any] = {"metric": self.metric, "limit": self.limit, "outputs": list(self.outputs)}
        if self.floors:
            data["runtime_floor"] = dict(self.floors)
        return data


def _value(out: OutputParity, metric: Metric) -> float | None:
    if metric == "cosine":
        return out.cosine_mean
    if metric == "top1":
        return out.top1
    if metric == "sequences":
        return out.sequences_same
    if metric == "detections":
        return out.detections_kept
    return out.max_abs


@dataclasses.dataclass(frozen=True)
class Budget:
    """The bounds a result must meet, the output kinds they were chosen from, and the score a
    detection needs to count (``verify.detections``)."""

    bounds: tuple[Bound, ...] = ()
    kinds: Mapping[str, str] = dataclasses.field(default_factory=dict)
    score_threshold: float = DEFAULT_SCORE_THRESHOLD

    @classmethod
    def resolve(cls, stated: Any, kinds: Mapping[str, str], defaults: Any = None) -> Budget:
        """Bounds from the user's ``stated`` thresholds (a ``verify.gate.Thresholds``) when it
        names any parity metric, else from ``defaults`` (a recipe's) by output kind.

        Class scores are judged by top-1 agreement where a top-1 bound exists (else by cosine);
        class score sequences besides by their decoded sequences, at the same limit; detections
        by the share kept (``DEFAULT_MIN_DETECTIONS`` where nothing else covers them), never by
        a cosine that would mix box and score columns; everything else by cosine."""
        names = tuple(kinds)
        agreeing = tuple(n for n in names if kinds[n] in AGREEMENT_KINDS)
        sequences = tuple(n for n in names if kinds[n] == "class score sequence")
        detecting = tuple(n for n in names if kinds[n] in DETECTION_KINDS)
        paired = tuple(n for n in names if kinds[n] in PAIRED_KINDS)  # judged through their score map
        others = tuple(n for n in names if n not in agreeing and n not in detecting and n not in paired)
        threshold = getattr(stated, "det_threshold", None)
        threshold = DEFAULT_SCORE_THRESHOLD if threshold is None else float(threshold)
        metrics = ("min_cosine", "min_top1", "max_abs", "min_detections")
        user = any(getattr(stated, key, None) is not None for key in metrics)
        source = stated if user else defaults
        if source is None:
            return cls((), dict(kinds), threshold)
        min_cosine, min_top1, max_abs, min_detections = (getattr(source, key, None) for key in metrics)
        bounds = []
        if min_cosine is not None:
            scope = tuple(n for n in names if n not in detecting and n not in paired) if user or min_top1 is None \
                else others
            if scope:
                bounds.append(Bound("cosine", float(min_cosine), scope))
        if min_top1 is not None and (agreeing or user):  # a stated bound nothing can meet fails
            bounds.append(Bound("top1", float(min_top1), agreeing))
        if min_top1 is not None and sequences:
            bounds.append(Bound("sequences", float(min_top1), sequences))
        if detecting and (min_detections is not None or max_abs is None):
            limit = min_detections if min_detections is not None else DEFAULT_MIN_DETECTIONS
            bounds.append(Bound("detections", float(limit), detecting))
        if max_abs is not None:
            bounds.append(Bound("max_abs", float(max_abs), names))
        return cls(tuple(bounds), dict(kinds), threshold)

    def error(self, parity: ParityReport) -> tuple[float, Bound | None]:
        """The largest share of its bound any output uses (inf for broken shapes or new NaN)."""
        if parity.shape_mismatches or parity.new_nonfinite:
            return math.inf, None
        worst, which = 0.0, None
        for bound in self.bounds:
            value, out = bound.worst(parity)
            error = bound.error(value, out.name if out is not None else None)
            if which is None or error > worst:
                worst, which = error, bound
        return worst, which

    @property
    def exact(self) -> bool:
        """A max-abs bound: the candidate must be the original up to rounding."""
        return any(bound.metric == "max_abs" for bound in self.bounds)

    def with_floors(self, floors: Mapping[str, float]) -> Budget:
        """This budget with the runtime's floor per output on its max-abs bounds."""
        bounds = tuple(b.with_floors(floors) if b.metric == "max_abs" else b for b in self.bounds)
        return dataclasses.replace(self, bounds=bounds)

    def describe(self) -> str:
        if not self.bounds:
            return "no parity bound"
        parts = []
        for bound in self.bounds:
            op = "<=" if bound.metric == "max_abs" else ">="
            parts.append(f"{bound.label} {op} {bound.limit:g} on {', '.join(bound.outputs) or 'no output'}")
        return "; ".join(parts)

    def to_dict(self) -> dict[str, Any]:
        return {"bounds": [b.to_dict() for b in self.bounds], "output_kinds": dict(self.kinds),
                "detection_score_threshold": self.score_threshold}


@dataclasses.dataclass(frozen=True)
class HeldOut:
    """Calibration feeds split into the part that tunes and the part that judges."""

    tune: list[Feed]
    judge: list[Feed]
    weak: bool  # a single feed both tunes and judges: the verdict is weak evidence


def hold_out(feeds: Sequence[Feed], fraction: float) -> HeldOut:
    """The last ``fraction`` of ``feeds`` (at least one, never all) judges; one feed does both."""
    feeds = list(feeds)
    if len(feeds) == 1:
        return HeldOut(feeds, feeds, True)
    held = min(len(feeds) - 1, max(1, int(round(len(feeds) * fraction))))
    return HeldOut(feeds[:-held], feeds[-held:], False)


@dataclasses.dataclass(frozen=True)
class Verdict:
    """How a candidate fares against its budget: the protocol every judge's verdicts share
    (``Judge`` on tensors, ``verify.text.TextJudge`` on text), and all a search reads.

    ``error`` is the share of the budget the worst bound uses (1.0: exactly at it), ``noise``
    the standard error of ``error`` on the judging data, ``allowed`` the share a search may use
    (``share × (1 - reserve)``). A search's candidate meets the target when it stays within
    ``allowed`` and ``NOISE_SIGMAS`` standard errors still fit in the budget."""

    error: float
    noise: float
    allowed: float
    weak: bool  # judged on the data it was tuned on: weak evidence

    @property
    def meets_budget(self) -> bool:
        return self.error <= 1.0

    @property
    def meets_target(self) -> bool:
        return self.error <= self.allowed and self.error + NOISE_SIGMAS * self.noise <= 1.0

    def measured(self) -> str:
        """The deciding measurement, in words."""
        raise NotImplementedError

    def to_dict(self) -> dict[str, Any]:
        return {"measured": self.measured(), "budget_used": _finite(self.error), "noise": self.noise,
                "allowed": self.allowed, "meets_budget": self.meets_budget, "meets_target": self.meets_target,
                "weak_evidence": self.weak}


@dataclasses.dataclass(frozen=True, kw_only=True)
class ParityVerdict(Verdict):
    """A tensor judge's verdict: the per-output parity and the bound that decided."""

    parity: ParityReport
    bound: Bound | None

    @property
    def damage(self) -> float:
        """For ranking layers: the budget share used, ties broken by the worst cosine lost."""
        cosine = min((o.cosine_mean for o in self.parity.outputs), default=1.0)
        return self.error + max(0.0, 1.0 - cosine)

    @property
    def value(self) -> float | None:
        """The deciding bound's worst measured value (None when no bound decided)."""
        return self.bound.worst(self.parity)[0] if self.bound is not None else None

    def measured(self) -> str:
        if self.bound is None:
            return "outputs broken (shape or new NaN/Inf)" if math.isinf(self.error) else "within every bound"
        value, out = self.bound.worst(self.parity)
        where = f" on '{out.name}'" if out is not None else ""
        shown = "n/a" if value is None else f"{value:.6g}"
        return f"{self.bound.label} {shown}{where}"

    def to_dict(self) -> dict[str, Any]:
        data = super().to_dict()
        return {"measured": data.pop("measured"), "value": self.value, **data, "samples": self.parity.samples}


def _finite(value: float) -> float | None:
    return value if math.isfinite(value) else None


class Judge:
    """Judges candidates of one reference model on fixed feeds under one budget."""

    def __init__(self, model: ir.Model, feeds: Sequence[Feed], budget: Budget, *, share: float = 1.0,
                 reserve: float = 0.4, weak: bool = False, threads: int = 1) -> None:
        if not 0 < share <= 1 or not 0 <= reserve < 1:
            raise ValueError(f"share must be in (0, 1] and reserve in [0, 1), got {share} and {reserve}")
        self.feeds = list(feeds)
        self.budget = budget
        self.allowed = share * (1.0 - reserve)
        self.weak = weak
        self.threads = threads
        self.reference = run_outputs(self._session(model, optimize=False), self.feeds)

    def verdict(self, candidate: ir.Model | bytes, *, optimize: bool = True, limit: int | None = None) -> ParityVerdict:
        """``limit`` judges on the first feeds only (a ranking needs less evidence than a choice);
        ``optimize=False`` skips onnxruntime's graph optimizations (faster to build)."""
        feeds = self.feeds[:limit] if limit else self.feeds
        outputs = run_outputs(self._session(candidate, optimize=optimize), feeds)
        parity = compare_outputs(self.reference[: len(feeds)], outputs, self.budget.kinds,
                                 score_threshold=self.budget.score_threshold)
        error, bound = self.budget.error(parity)
        noise = 0.0
        if bound is not None and not self.weak:
            _, out = bound.worst(parity)
            noise = bound.noise(out, parity.samples) if out is not None else 0.0
        return ParityVerdict(error=error, noise=noise, allowed=self.allowed, weak=self.weak, parity=parity, bound=bound)

    def _session(self, model: ir.Model | bytes, *, optimize: bool) -> Any:
        from graphopt.verify.runtime import make_session

        data = model if isinstance(model, bytes) else ir.serde.serialize_model(model).SerializeToString()
        return make_session(data, optimize=optimize, threads=self.threads)


def run_budget(model: ir.Model, budget: Any, fallback: Any = None) -> Budget:
    """The run's budget: a resolved ``Budget`` as it is; thresholds (``verify.gate.Thresholds``,
    as an API caller may give) applied to the model's outputs; or — for a pass used on its
    own — the pass's defaults (``fallback``, thresholds too) by the model's output kinds."""
    if isinstance(budget, Budget):
        return budget
    from graphopt.verify.kinds import output_kinds

    kinds = output_kinds(model)
    return Budget.resolve(budget, kinds) if budget is not None else Budget.resolve(None, kinds, fallback)


__all__ = ["Bound", "Budget", "HeldOut", "Judge", "Metric", "ParityVerdict", "Verdict", "hold_out", "run_budget"]
