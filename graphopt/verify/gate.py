"""Thresholds on measured evidence: what `graphopt check` and `optimize`'s budgets enforce."""

from __future__ import annotations

import dataclasses
from typing import Any

from graphopt.verify.parity import ParityReport


@dataclasses.dataclass(frozen=True, kw_only=True)
class Thresholds:
    """Each threshold is optional; only stated ones are checked.

    ``min_cosine`` applies to the mean per-sample cosine similarity (worst output);
    ``max_abs`` to the largest absolute difference; ``min_top1`` to the argmax agreement
    along the last axis (and, on class score sequences, to the share of identical decoded
    sequences); ``min_detections`` to the share of detections kept (``verify.detections``,
    counted at ``det_threshold``); the ratios are candidate over base.
    """

    min_cosine: float | None = None
    max_abs: float | None = None
    min_top1: float | None = None
    min_detections: float | None = None
    det_threshold: float | None = None  # the score a detection needs to count (not a bound itself)
    max_latency_ratio: float | None = None
    max_size_ratio: float | None = None

    def stated(self) -> dict[str, float]:
        return {k: v for k, v in dataclasses.asdict(self).items() if v is not None}

    def needs_latency(self) -> bool:
        return self.max_latency_ratio is not None


@dataclasses.dataclass
class CheckResult:
    name: str
    threshold: float | None
    measured: float | None
    passed: bool
    message: str

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.6g}"


def gate_checks(
    thresholds: Thresholds,
    parity: ParityReport,
    *,
    budget: Any = None,
    latency_ratio: float | None = None,
    size_ratio: float | None = None,
) -> list[CheckResult]:
    """One result per parity bound and stated ratio, plus the checks that always apply (same
    output shapes, no NaN/Inf appearing in the candidate).

    The parity bounds are ``budget``'s (a ``verify.judge.Budget``: what a search judged by)
    or, without one, ``thresholds``' applied to every output where the metric means something.
    """
    from graphopt.verify.judge import Budget

    if budget is None:
        kinds = {o.name: o.kind or ("class scores" if o.top1 is not None else "other") for o in parity.outputs}
        budget = Budget.resolve(thresholds, kinds)
    results = [
        CheckResult("output_shapes", None, None, not parity.shape_mismatches,
                    "; ".join(parity.shape_mismatches) or "all outputs have the reference's shapes"),
        CheckResult("no_new_nonfinite", 0, parity.new_nonfinite, parity.new_nonfinite == 0,
                    f"{parity.new_nonfinite} NaN/Inf values appear in the candidate"),
    ]
    for bound in budget.bounds:
        measured, output = bound.worst(parity)
        if measured is None:
            reason = "" if bound.outputs else f" (no output holds class scores or integers: {_kinds(budget)})"
            results.append(CheckResult(bound.check_name, bound.limit, None, False,
                                       f"{bound.label} could not be measured{reason}"))
            continue
        op = "<=" if bound.metric == "max_abs" else ">="
        name = output.name if output is not None else None
        where = f" on '{name}'" if len(parity.outputs) > 1 and name is not None else ""
        limit = bound.limit_for(name)
        floor = "" if limit == bound.limit else (
            f"; the original itself differs by {_fmt(bound.floors[name])} between onnxruntime's optimization "
            f"levels, so up to {_fmt(limit)} is the runtime's floor, not the candidate's doing")
        results.append(CheckResult(bound.check_name, limit, measured, bound.passes(measured, name),
                                   f"{bound.label} {_fmt(measured)}{where} (required {op} {_fmt(bound.limit)}{floor})"))
    ratios = [
        ("max_latency_ratio", "latency ratio", latency_ratio, thresholds.max_latency_ratio),
        ("max_size_ratio", "size ratio", size_ratio, thresholds.max_size_ratio),
    ]
    for name, label, measured, threshold in ratios:
        if threshold is None:
            continue
        if measured is None:
            results.append(CheckResult(name, threshold, None, False, f"{label} could not be measured"))
            continue
        results.append(CheckResult(name, threshold, measured, measured <= threshold,
                                   f"{label} {_fmt(measured)} (required <= {_fmt(threshold)})"))
    return results


def _kinds(budget: Any) -> str:
    return ", ".join(f"{name} {kind}" for name, kind in budget.kinds.items()) or "no outputs"


def failures(results: list[CheckResult]) -> list[CheckResult]:
    return [r for r in results if not r.passed]
