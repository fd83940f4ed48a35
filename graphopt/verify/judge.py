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
from graphopt.verify.kinds import AGREEMENT_KINDS
from graphopt.verify.parity import OutputParity, ParityReport, compare_outputs, run_outputs

Metric = Literal["cosine", "top1", "max_abs"]

# Standard errors of the held-out estimate a search keeps between its result and the budget.
NOISE_SIGMAS = 2.0

_LABELS = {"cosine": "cosine (mean per sample)", "top1": "top-1 agreement", "max_abs": "max abs difference"}
_CHECK_NAMES = {"cosine": "min_cosine", "top1": "min_top1", "max_abs": "max_abs"}


@dataclasses.dataclass(frozen=True)
class Bound:
    """One metric's limit over the outputs it applies to."""

    metric: Metric
    limit: float
    outputs: tuple[str, ...]

    @property
    def check_name(self) -> str:
        return _CHECK_NAMES[self.metric]

    @property
    def label(self) -> str:
        return _LABELS[self.metric]

    def worst(self, parity: ParityReport) -> tuple[float | None, OutputParity | None]:
        """The worst measured value over this bound's outputs, and the output it came from."""
        found = [(value, out) for out in parity.outputs
                 if out.name in self.outputs and (value := _value(out, self.metric)) is not None]
        if not found:
            return None, None
        pick = max if self.metric == "max_abs" else min
        return pick(found, key=lambda item: item[0])

    def error(self, value: float | None) -> float:
        """Share of the budget ``value`` uses: 1.0 exactly at the limit, inf when unmeasured."""
        if value is None or math.isnan(value):
            return math.inf
        if self.metric == "max_abs":
            return value / self.limit if self.limit > 0 else (0.0 if value == 0 else math.inf)
        allowance = 1.0 - self.limit
        lost = max(0.0, 1.0 - value)
        return lost / allowance if allowance > 0 else (0.0 if lost == 0 else math.inf)

    def noise(self, out: OutputParity, samples: int) -> float:
        """Standard error of this bound's error on a held-out set (0 where it cannot be told)."""
        if self.metric == "cosine" and samples > 1:
            spread = out.cosine_std / math.sqrt(samples)
        elif self.metric == "top1" and out.top1 is not None and out.top1_positions > 1:
            spread = math.sqrt(out.top1 * (1 - out.top1) / out.top1_positions)
        else:
            return 0.0
        allowance = 1.0 - self.limit
        return spread / allowance if allowance > 0 else 0.0

    def passes(self, value: float | None) -> bool:
        return value is not None and (value <= self.limit if self.metric == "max_abs" else value >= self.limit)

    def to_dict(self) -> dict[str, Any]:
        return {"metric": self.metric, "limit": self.limit, "outputs": list(self.outputs)}


def _value(out: OutputParity, metric: Metric) -> float | None:
    if metric == "cosine":
        return out.cosine_mean
    if metric == "top1":
        return out.top1
    return out.max_abs


@dataclasses.dataclass(frozen=True)
class Budget:
    """The bounds a result must meet, and the output kinds they were chosen from."""

    bounds: tuple[Bound, ...] = ()
    kinds: Mapping[str, str] = dataclasses.field(default_factory=dict)

    @classmethod
    def resolve(cls, stated: Any, kinds: Mapping[str, str], defaults: Any = None) -> Budget:
        """Bounds from the user's ``stated`` thresholds (a ``verify.gate.Thresholds``) when it
        names any parity metric, else from ``defaults`` (a recipe's) by output kind."""
        names = tuple(kinds)
        agreeing = tuple(n for n in names if kinds[n] in AGREEMENT_KINDS)
        others = tuple(n for n in names if kinds[n] not in AGREEMENT_KINDS)
        user = [(m, getattr(stated, k, None)) for m, k in (("cosine", "min_cosine"), ("top1", "min_top1"),
                                                            ("max_abs", "max_abs"))]
        if any(limit is not None for _, limit in user):
            scope = {"cosine": names, "top1": agreeing, "max_abs": names}
            bounds = [Bound(m, float(limit), scope[m]) for m, limit in user if limit is not None]
            return cls(tuple(bounds), dict(kinds))
        if defaults is None:
            return cls((), dict(kinds))
        bounds = []
        min_top1 = getattr(defaults, "min_top1", None)
        min_cosine = getattr(defaults, "min_cosine", None)
        cosine_outputs = others if min_top1 is not None else names
        if min_cosine is not None and cosine_outputs:
            bounds.append(Bound("cosine", float(min_cosine), cosine_outputs))
        if min_top1 is not None and agreeing:
            bounds.append(Bound("top1", float(min_top1), agreeing))
        if getattr(defaults, "max_abs", None) is not None:
            bounds.append(Bound("max_abs", float(defaults.max_abs), names))
        return cls(tuple(bounds), dict(kinds))

    def error(self, parity: ParityReport) -> tuple[float, Bound | None]:
        """The largest share of its bound any output uses (inf for broken shapes or new NaN)."""
        if parity.shape_mismatches or parity.new_nonfinite:
            return math.inf, None
        worst, which = 0.0, None
        for bound in self.bounds:
            value, _ = bound.worst(parity)
            error = bound.error(value)
            if which is None or error > worst:
                worst, which = error, bound
        return worst, which

    def describe(self) -> str:
        if not self.bounds:
            return "no parity bound"
        parts = []
        for bound in self.bounds:
            op = "<=" if bound.metric == "max_abs" else ">="
            parts.append(f"{bound.label} {op} {bound.limit:g} on {', '.join(bound.outputs) or 'no output'}")
        return "; ".join(parts)

    def to_dict(self) -> dict[str, Any]:
        return {"bounds": [b.to_dict() for b in self.bounds], "output_kinds": dict(self.kinds)}


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
    """How a candidate fares against the budget on the judging feeds."""

    parity: ParityReport
    error: float  # share of the budget used by the worst bound
    noise: float  # standard error of ``error`` on these feeds
    bound: Bound | None
    allowed: float  # the share a search may use
    weak: bool

    @property
    def meets_budget(self) -> bool:
        return self.error <= 1.0

    @property
    def meets_target(self) -> bool:
        return self.error <= self.allowed and self.error + NOISE_SIGMAS * self.noise <= 1.0

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
        return {"measured": self.measured(), "value": self.value, "budget_used": _finite(self.error), "noise": self.noise,
                "allowed": self.allowed, "meets_budget": self.meets_budget, "meets_target": self.meets_target,
                "weak_evidence": self.weak, "samples": self.parity.samples}


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

    def verdict(self, candidate: ir.Model | bytes, *, optimize: bool = True, limit: int | None = None) -> Verdict:
        """``limit`` judges on the first feeds only (a ranking needs less evidence than a choice);
        ``optimize=False`` skips onnxruntime's graph optimizations (faster to build)."""
        feeds = self.feeds[:limit] if limit else self.feeds
        outputs = run_outputs(self._session(candidate, optimize=optimize), feeds)
        parity = compare_outputs(self.reference[: len(feeds)], outputs, self.budget.kinds)
        error, bound = self.budget.error(parity)
        noise = 0.0
        if bound is not None and not self.weak:
            _, out = bound.worst(parity)
            noise = bound.noise(out, parity.samples) if out is not None else 0.0
        return Verdict(parity, error, noise, bound, self.allowed, self.weak)

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


__all__ = ["Bound", "Budget", "HeldOut", "Judge", "Metric", "Verdict", "hold_out", "run_budget"]
