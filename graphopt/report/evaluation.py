"""What `graphopt evaluate` found (``graphopt.evaluate``), as a record, its JSON and its text."""

from __future__ import annotations

import dataclasses
from typing import Any

from graphopt import __version__
from graphopt.verify.metrics import Metric
from graphopt.verify.statistics import Interval, mean_std


@dataclasses.dataclass(frozen=True, kw_only=True)
class FoldCompression:
    """How a fold's compression went, measured on its training part (``--recipe``)."""

    input_bytes: int
    output_bytes: int
    calibration_samples: int
    train_cosine_mean: float
    train_max_abs: float


@dataclasses.dataclass(frozen=True, kw_only=True)
class FoldResult:
    fold: int  # from 1
    train: int
    held_out: int
    base: float
    candidate: float
    difference: float
    test_indices: tuple[int, ...]
    optimize: FoldCompression | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"fold": self.fold, "train": self.train, "held_out": self.held_out,
                **({"optimize": dataclasses.asdict(self.optimize)} if self.optimize is not None else {}),
                "base": self.base, "candidate": self.candidate, "difference": self.difference,
                "test_indices": list(self.test_indices)}


@dataclasses.dataclass(frozen=True)
class MeanStd:
    """Across folds; the std of one fold is undefined (None)."""

    mean: float
    std: float | None


@dataclasses.dataclass(frozen=True, kw_only=True)
class McNemar:
    """``verify.statistics.mcnemar``'s result."""

    base_only_correct: int
    candidate_only_correct: int
    test: str
    statistic: float | None
    p_value: float


@dataclasses.dataclass(frozen=True, kw_only=True)
class SplitDescription:
    method: str
    folds: int
    holdout: float | None
    seed: int
    shuffled: bool


@dataclasses.dataclass(frozen=True, kw_only=True)
class Evaluation:
    """What `graphopt evaluate` found; ``to_dict`` is its JSON (format: README, `evaluate`)."""

    model: str
    recipe: str | None  # what the candidate is: the model compressed in each fold with this recipe,
    candidate: str | None  # or this given model
    source: str
    samples: int
    labels: str | None
    output: str
    metric: Metric
    split: SplitDescription
    folds: tuple[FoldResult, ...]
    difference: Interval  # candidate − base, paired bootstrap
    mcnemar: McNemar | None  # classification metrics only

    def summary(self, side: str) -> MeanStd:
        """Mean ± std across folds of ``side``: "base", "candidate" or "difference"."""
        return MeanStd(**mean_std([getattr(fold, side) for fold in self.folds]))

    def to_dict(self) -> dict[str, Any]:
        against = ({"recipe": self.recipe} if self.recipe is not None
                   else {"model": self.candidate} if self.candidate is not None else None)
        return {
            "graphopt": __version__,
            "model": self.model,
            "candidate": against,
            "data": {"source": self.source, "samples": self.samples, "labels": self.labels},
            "output": self.output,
            "metric": self.metric,
            "split": dataclasses.asdict(self.split),
            "folds": [fold.to_dict() for fold in self.folds],
            "summary": {side: dataclasses.asdict(self.summary(side)) for side in SIDES},
            "difference": self.difference.to_dict(),
            "mcnemar": dataclasses.asdict(self.mcnemar) if self.mcnemar is not None else None,
        }


SIDES = ("base", "candidate", "difference")


def evaluation_text(result: Evaluation) -> str:
    """Per fold, mean ± std across folds, the paired difference with its interval, McNemar."""
    metric, diff = result.metric, result.difference
    d = 7 if metric == "cosine" else 4  # int8 moves a cosine by ~1e-5: show it
    lines = [f"{result.split.method}, {result.split.folds} fold(s), {result.samples} samples, "
             f"metric {metric} on output '{result.output}'"]
    lines += [f"  fold {f.fold}: held out {f.held_out:>5}  base {f.base:.{d}f}  candidate "
              f"{f.candidate:.{d}f}  difference {f.difference:+.{d}f}" for f in result.folds]
    for side in SIDES:
        stats = result.summary(side)
        spread = f" ± {stats.std:.{d}f}" if stats.std is not None else ""
        sign = "+" if side == "difference" else ""
        lines.append(f"  {side:<10} mean {stats.mean:{sign}.{d}f}{spread} (across folds)")
    lines.append(f"paired difference {diff.estimate:+.{d}f}, {diff.confidence:.0%} CI "
                 f"[{diff.low:+.{d}f}, {diff.high:+.{d}f}] ({diff.resamples} bootstrap resamples)")
    if result.mcnemar:
        test = result.mcnemar
        lines.append(f"McNemar: base-only correct {test.base_only_correct}, candidate-only correct "
                     f"{test.candidate_only_correct}, p = {test.p_value:.4g} ({test.test})")
    return "\n".join(lines)
