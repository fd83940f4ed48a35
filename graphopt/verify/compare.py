"""Compare a candidate model file with its base on the same feeds: parity, latency, size."""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Any

from graphopt.verify import latency as latency_mod
from graphopt.verify.detections import DEFAULT_SCORE_THRESHOLD
from graphopt.verify.feeds import FeedSet
from graphopt.verify.gate import CheckResult, Thresholds, gate_checks
from graphopt.verify.judge import Budget
from graphopt.verify.parity import ParityReport, compare_outputs, run_outputs
from graphopt.verify.runtime import default_threads, make_session

logger = logging.getLogger(__name__)


@dataclasses.dataclass
class Comparison:
    base: Path
    candidate: Path
    feeds: FeedSet
    parity: ParityReport
    latency: latency_mod.ABLatency | None
    base_bytes: int
    candidate_bytes: int
    checks: list[CheckResult]
    peak_rss_mib: float | None
    budget: Budget | None = None
    runtime_floor: dict[str, float] | None = None  # max abs of the original against itself, per output

    @property
    def size_ratio(self) -> float:
        return self.candidate_bytes / self.base_bytes

    @property
    def passed(self) -> bool:
        return all(check.passed for check in self.checks)

    def to_dict(self) -> dict[str, Any]:
        return {
            "base": str(self.base),
            "candidate": str(self.candidate),
            "passed": self.passed,
            "data": self.feeds.describe(),
            "base_bytes": self.base_bytes,
            "candidate_bytes": self.candidate_bytes,
            "size_ratio": self.size_ratio,
            "parity": self.parity.to_dict(),
            "latency": self.latency.to_dict() if self.latency else None,
            "checks": [c.to_dict() for c in self.checks],
            "output_kinds": {o.name: o.kind for o in self.parity.outputs if o.kind},
            "peak_rss_mib": self.peak_rss_mib,
            "runtime_floor": self.runtime_floor,
        }


def reference_outputs(base: Path, feeds: FeedSet) -> list[dict[str, Any]]:
    """The base model's outputs with graph optimizations off: the ground truth."""
    return run_outputs(make_session(base, optimize=False), feeds.feeds)


def runtime_floor(base: Path, feeds: FeedSet, reference: list[dict[str, Any]], threads: int) -> dict[str, float]:
    """How far the original's own outputs move between onnxruntime's optimization levels (basic,
    extended, all, at ``threads``) from the reference (none): per output, the largest absolute
    difference. A lossless candidate cannot be held to less than the runtime itself keeps."""
    floors: dict[str, float] = {}
    for level in ("basic", "extended", "all"):
        outputs = run_outputs(make_session(base, level=level, threads=threads), feeds.feeds)
        for out in compare_outputs(reference, outputs).outputs:
            floors[out.name] = max(floors.get(out.name, 0.0), out.max_abs)
    return floors


def compare_files(
    base: Path,
    candidate: Path,
    feeds: FeedSet,
    *,
    thresholds: Thresholds,
    base_bytes: int,
    candidate_bytes: int,
    measure_latency: bool = True,
    threads: int | None = None,
    reference: list[dict[str, Any]] | None = None,
    extra_checks: list[CheckResult] | None = None,
    budget: Budget | None = None,
    provider: str | None = None,
) -> Comparison:
    """Parity of ``candidate`` (as deployed: optimizations on) against ``base`` (optimizations
    off), and, when asked, their interleaved latency ratio with optimizations on. ``budget``
    (the run's, see ``verify.judge``) sets the parity bounds; without it, ``thresholds`` do.
    ``provider`` runs the candidate (and both models' latency) on that execution provider; the
    reference stays on the CPU."""
    threads = threads or default_threads()
    with latency_mod.peak_memory() as peak:
        if reference is None:
            logger.info("running the base model on %d feeds (reference, optimizations off)", len(feeds.feeds))
            reference = reference_outputs(base, feeds)
        floors = None
        if budget is not None and budget.exact:
            logger.info("measuring the runtime's floor: the base against itself across optimization levels")
            floors = runtime_floor(base, feeds, reference, threads)
            budget = budget.with_floors(floors)
        candidate_session = make_session(candidate, optimize=True, threads=threads, provider=provider)
        logger.info("running the candidate on %d feeds", len(feeds.feeds))
        parity = compare_outputs(reference, run_outputs(candidate_session, feeds.feeds),
                                 budget.kinds if budget is not None else None,
                                 score_threshold=budget.score_threshold if budget is not None
                                 else DEFAULT_SCORE_THRESHOLD)
        ab = None
        if measure_latency:
            logger.info("measuring latency (interleaved A/B, %d threads)", threads)
            base_session = make_session(base, optimize=True, threads=threads, provider=provider)
            ab = latency_mod.compare_interleaved(base_session, candidate_session, feeds.feeds, threads=threads)
            bound = thresholds.max_latency_ratio
            if bound is not None and ab.ratio > bound:
                # a miss is confirmed before it fails: a shared machine's slow seconds can read two
                # copies of one model as 1.5x apart; a real regression reads over the bound again
                logger.info("latency ratio %.3f over %g: measuring again, judged on both", ab.ratio, bound)
                ab = ab.pooled(latency_mod.compare_interleaved(base_session, candidate_session, feeds.feeds,
                                                               threads=threads))
    checks = gate_checks(
        thresholds,
        parity,
        budget=budget,
        latency_ratio=ab.ratio if ab else None,
        size_ratio=candidate_bytes / base_bytes,
    ) + list(extra_checks or [])
    return Comparison(base, candidate, feeds, parity, ab, base_bytes, candidate_bytes, checks, peak(), budget, floors)
