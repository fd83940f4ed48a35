"""Statistics of a paired model comparison: per-sample metrics, a paired bootstrap interval
for the difference (candidate − base), and McNemar's test on correctness.

Every metric here is a function of per-sample values along the last axis, so a bootstrap
resample is an index array and the whole resampling is vectorised.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

# Below this many discordant pairs McNemar's test uses the exact binomial distribution; the
# chi-square approximation is commonly trusted from about 25 on.
EXACT_MCNEMAR_BELOW = 25
# Resamples drawn at a time, so memory stays at (chunk × fold size) indices.
_BOOTSTRAP_CHUNK = 256


def macro_f1(labels: np.ndarray, predictions: np.ndarray, classes: Sequence[int]) -> np.ndarray:
    """Macro-averaged F1 along the last axis. A class absent from both the labels and the
    predictions of a (re)sample says nothing about it and is left out of that average."""
    scores, present = [], []
    for cls in classes:
        truth, guess = labels == cls, predictions == cls
        tp = np.count_nonzero(truth & guess, axis=-1)
        wrong = np.count_nonzero(truth ^ guess, axis=-1)  # false positives + false negatives
        denom = 2 * tp + wrong
        scores.append(np.where(denom > 0, 2 * tp / np.maximum(denom, 1), 0.0))
        present.append(denom > 0)
    count = np.sum(present, axis=0)
    return np.sum(scores, axis=0) / np.maximum(count, 1)


@dataclasses.dataclass(frozen=True)
class FoldScores:
    """One fold's held-out samples as the metric sees them: ``base`` and ``candidate`` are
    per-sample values (correctness, cosine or predicted class for F1) aligned with ``labels``."""

    base: np.ndarray
    candidate: np.ndarray
    labels: np.ndarray
    score: Callable[[np.ndarray, np.ndarray], np.ndarray]  # (values[..., n], labels[..., n]) → [...]

    @property
    def size(self) -> int:
        return int(self.labels.shape[-1])

    def difference(self, index: np.ndarray | None = None) -> np.ndarray:
        labels = self.labels if index is None else self.labels[index]
        base = self.base if index is None else self.base[index]
        candidate = self.candidate if index is None else self.candidate[index]
        return self.score(candidate, labels) - self.score(base, labels)


@dataclasses.dataclass(frozen=True)
class Interval:
    estimate: float
    low: float
    high: float
    confidence: float
    resamples: int
    seed: int

    def to_dict(self) -> dict[str, Any]:
        return {
            "estimate": self.estimate,
            "ci_low": self.low,
            "ci_high": self.high,
            "confidence": self.confidence,
            "method": "paired percentile bootstrap over held-out samples, resampled within each fold; "
                      "statistic: the fold-size-weighted mean of the per-fold difference",
            "resamples": self.resamples,
            "seed": self.seed,
        }


def paired_bootstrap(folds: Sequence[FoldScores], *, resamples: int = 2000, confidence: float = 0.95,
                     seed: int = 0) -> Interval:
    """Percentile interval of the difference (candidate − base).

    Each resample draws, within every fold, as many held-out samples as the fold has (with
    replacement) and takes the same indices for both models: the pairing removes the
    variation both models share. The statistic is the fold-size-weighted mean of the
    per-fold difference, which for accuracy, top-5 and cosine is the difference pooled over
    all held-out samples. Resampling within folds keeps each fold's compressed model with
    its own samples. The interval covers the noise of the finite held-out set given these
    models; how much compression varies with its calibration data shows in the per-fold std.
    """
    rng = np.random.default_rng(seed)
    weights = np.array([fold.size for fold in folds], dtype=np.float64)
    weights /= weights.sum()
    estimate = float(sum(w * float(fold.difference()) for w, fold in zip(weights, folds)))
    draws = np.zeros(resamples)
    for start in range(0, resamples, _BOOTSTRAP_CHUNK):
        count = min(_BOOTSTRAP_CHUNK, resamples - start)
        for weight, fold in zip(weights, folds):
            index = rng.integers(0, fold.size, size=(count, fold.size))
            draws[start : start + count] += weight * fold.difference(index)
    tail = (1 - confidence) / 2
    low, high = np.quantile(draws, [tail, 1 - tail])
    # Bootstrap means of identical values can differ in the last bit; never let that open a
    # gap between the interval and its own point estimate.
    return Interval(estimate, float(min(low, estimate)), float(max(high, estimate)), confidence, resamples, seed)


def mean_std(values: Sequence[float]) -> dict[str, float | None]:
    """Mean and sample standard deviation (n − 1); the std of one value is undefined: None."""
    array = np.asarray(values, dtype=np.float64)
    return {"mean": float(array.mean()), "std": float(array.std(ddof=1)) if array.size > 1 else None}


def mcnemar(base_correct: np.ndarray, candidate_correct: np.ndarray) -> dict[str, Any]:
    """McNemar's test of whether the two models err on different samples more often one way.

    Only discordant samples count: ``b`` where only the base is right, ``c`` where only the
    candidate is. Two-sided exact binomial test when b + c < 25, otherwise the chi-square
    statistic with continuity correction, (|b − c| − 1)² / (b + c), on one degree of freedom.
    """
    base_correct, candidate_correct = np.asarray(base_correct, bool), np.asarray(candidate_correct, bool)
    b = int(np.count_nonzero(base_correct & ~candidate_correct))
    c = int(np.count_nonzero(~base_correct & candidate_correct))
    n = b + c
    result: dict[str, Any] = {"base_only_correct": b, "candidate_only_correct": c}
    if n == 0:
        return {**result, "test": "none (no discordant samples)", "statistic": None, "p_value": 1.0}
    if n < EXACT_MCNEMAR_BELOW:
        tail = sum(math.comb(n, k) for k in range(min(b, c) + 1)) / 2**n
        return {**result, "test": "exact binomial", "statistic": None, "p_value": min(1.0, 2 * tail)}
    statistic = (abs(b - c) - 1) ** 2 / n
    # Survival function of chi-square with one degree of freedom.
    return {**result, "test": "chi-square, continuity corrected", "statistic": statistic,
            "p_value": math.erfc(math.sqrt(statistic / 2))}


__all__ = ["FoldScores", "Interval", "macro_f1", "mcnemar", "mean_std", "paired_bootstrap"]
