"""Make a student from a teacher: drop blocks, prune channels, factorize linears, in that order.

The teacher is never modified: :func:`compress` works on a deep copy. Dropping blocks first
means the later steps do not spend effort on layers about to disappear; pruning before
factorizing means the SVD sees the layer's final shape.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable, Sequence
from typing import Any

from torch import nn

from graphopt.torch.layers import drop_layers
from graphopt.torch.lowrank import factorize
from graphopt.torch.prune import prune_channels


def parameter_count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def compress(
    model: nn.Module,
    *,
    rank_ratio: float | None = None,
    energy: float | None = None,
    lowrank_include: Sequence[str] = ("*",),
    lowrank_exclude: Sequence[str] = (),
    lowrank_embeddings: bool = False,
    lowrank_frequent_rows: int = 0,
    calibration: Iterable[Any] | None = None,
    prune_ratio: float | None = None,
    keep_layers: Sequence[int] | None = None,
    keep_every: int | None = None,
    layer_stack: str | None = None,
) -> tuple[nn.Module, dict[str, Any]]:
    """A compressed copy of ``model`` and what was done to it.

    - ``keep_layers`` / ``keep_every`` (+ ``layer_stack``): :func:`graphopt.torch.layers.drop_layers`
    - ``prune_ratio``: :func:`graphopt.torch.prune.prune_channels` (see there what is supported)
    - ``rank_ratio`` or ``energy``: :func:`graphopt.torch.lowrank.factorize` on the ``nn.Linear``
      layers matching ``lowrank_include`` and no ``lowrank_exclude`` (fnmatch patterns on the
      qualified names, after the steps above); ``lowrank_embeddings`` factorizes matching
      ``nn.Embedding`` tables as well (``lowrank_frequent_rows``: the ids most frequent in
      ``calibration`` keep their rows, see :class:`graphopt.torch.lowrank.FrequencySplitEmbedding`);
      ``calibration`` batches make the truncation activation-aware (see
      :class:`graphopt.torch.lowrank.Whitening`).
    """
    student = copy.deepcopy(model)
    report: dict[str, Any] = {"params_before": parameter_count(model)}
    if keep_layers is not None or keep_every is not None:
        report["layers"] = drop_layers(student, keep=keep_layers, keep_every=keep_every, stack=layer_stack)
    if prune_ratio:
        report["pruned"] = prune_channels(student, ratio=prune_ratio)
    if rank_ratio is not None or energy is not None:
        report["factorized"] = factorize(student, rank_ratio=rank_ratio, energy=energy, include=lowrank_include,
                                         exclude=lowrank_exclude, embeddings=lowrank_embeddings,
                                         frequent_rows=lowrank_frequent_rows, calibration=calibration)
    report["params_after"] = parameter_count(student)
    return student, report
