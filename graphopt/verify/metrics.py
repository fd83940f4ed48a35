"""The metrics `graphopt evaluate` and `check --cv` score on labelled data.

Kept free of numpy and onnx: the command line offers them as choices before it loads anything
heavy. (The parity bounds of a budget have metrics of their own: ``verify.judge.Metric``.)
"""

from __future__ import annotations

from typing import Literal, get_args

Metric = Literal["accuracy", "top5", "f1", "cosine"]
METRICS: tuple[Metric, ...] = get_args(Metric)

__all__ = ["METRICS", "Metric"]
