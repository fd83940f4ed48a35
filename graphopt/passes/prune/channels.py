"""prune-channels: remove the least important coupled channel groups (lossy).

Which channels are coupled comes from ``dependency``; a group's importance is the sum over
the weight slices it removes (producer output slices, consumer input slices):

- ``l1`` / ``l2``: the L1 / L2 norm of each slice;
- ``activation`` (needs ``--calib``): for each consumer, the spread of the input channel on
  the calibration data times the L2 norm of the weights it multiplies — how much the
  consumer's output moves when that channel disappears. With ``compensate`` (the default
  when calibration data is given) each removed channel's mean contribution is added to the
  consumer's bias, so what is lost is its standard deviation; without it, its RMS.

Each layer (groups living in the same tensors) loses ``amount`` of its prunable groups, at
most ``max_amount``; ``search = true`` instead bisects for the largest amount whose outputs on
held-out calibration feeds still meet the run's budget (``--min-cosine``/``--max-abs``),
keeping ``margin`` of the cosine budget in reserve for unseen data. The consumers' repair
(mean compensation, least-squares refit) lives in ``compensate``.
"""

from __future__ import annotations

import logging
import math
from collections import defaultdict
from collections.abc import Sequence
from typing import Any, Literal

import numpy as np
import onnx_ir as ir

from graphopt.errors import DataError
from graphopt.passes.base import GraphoptPass, PassContext, PassResult, check_fractions
from graphopt.passes.prune.compensate import apply_bias_corrections, bias_corrections, weight_slices
from graphopt.passes.prune.cut import Removed, apply_cuts, removal_plan
from graphopt.passes.prune.dependency import ChannelGroup, Dependency, analyze
from graphopt.passes.prune.moments import ChannelMoments, channel_moments
from graphopt.passes.prune.report import layer_report
from graphopt.passes.prune.stats import model_cost
from graphopt.passes.registry import register
from graphopt.verify.judge import HeldOut, Judge, ParityVerdict, hold_out, run_budget
from graphopt.verify.search import fewest_rungs, retreat

logger = logging.getLogger(__name__)

Importance = Literal["l1", "l2", "activation"]


def _norms(weight: np.ndarray, axis: int, kind: str) -> np.ndarray:
    moved = np.moveaxis(weight, axis, 0).reshape(weight.shape[axis], -1).astype(np.float64)
    return np.abs(moved).sum(axis=1) if kind == "l1" else np.sqrt(np.square(moved).sum(axis=1))


def group_importance(dependency: Dependency, kind: Importance, moments: dict[str, ChannelMoments],
                     *, compensate: bool) -> np.ndarray:
    """One score per group of ``dependency.groups`` (0 for groups that cannot be pruned)."""
    scores = np.zeros(len(dependency.groups))
    atoms = {}
    for group in dependency.groups:
        for tensor, channel in group.members:
            atoms[(id(tensor.value), channel)] = group.index
    for tensor in dependency.tensors.values():
        stats = moments.get(tensor.value.name or "")
        spread = None if stats is None else np.sqrt(stats.variance if compensate else stats.meansq)
        for role, _node, weight, axis in weight_slices(tensor):
            if weight.shape[axis] != tensor.size:
                continue
            if kind == "activation":
                if role != "consumer":
                    continue
                known = spread is not None and spread.size == tensor.size
                # A tensor without statistics (no calibration reaches it) falls back to plain L2.
                values = (spread if known else 1.0) * _norms(weight, axis, "l2")
            else:
                values = _norms(weight, axis, kind)
            for channel, value in enumerate(values):
                scores[atoms[(id(tensor.value), channel)]] += value
    return scores


def _global_quota(layers: dict[tuple[str, ...], list[ChannelGroup]], scores: np.ndarray, amount: float,
                  cap: float) -> dict[tuple[str, ...], float]:
    """Per layer, the fraction removed when the ``amount`` least important groups overall go."""
    ranked = sorted(((scores[g.index], g.index, family) for family, groups in layers.items() for g in groups))
    budget = int(math.floor(amount * len(ranked) + 1e-9))
    taken = dict.fromkeys(layers, 0)
    for _, _, family in ranked:
        if budget == 0:
            break
        if taken[family] + 1 <= cap * len(layers[family]):
            taken[family] += 1
            budget -= 1
    return {family: taken[family] / len(layers[family]) for family in layers}


def layers_of(groups: Sequence[ChannelGroup]) -> dict[tuple[str, ...], list[ChannelGroup]]:
    layers: dict[tuple[str, ...], list[ChannelGroup]] = defaultdict(list)
    for group in groups:
        if group.prunable:
            layers[group.family].append(group)
    return layers


def _producers(dependency: Dependency, family: tuple[str, ...]) -> set[str]:
    names = set()
    for tensor in dependency.tensors.values():
        if tensor.value.name in family and tensor.value.producer() is not None:
            names.add(tensor.value.producer().name or "")
    return names


@register
class PruneChannelsPass(GraphoptPass, name="prune-channels",
                        summary="remove the least important coupled channel groups (L1, L2 or activation importance): lossy"):
    role = "compress"

    class Options:
        amount: float = 0.3
        """Fraction of each layer's prunable channel groups to remove."""
        importance: Importance = "l2"
        max_amount: float = 0.9
        """Per-layer cap, also the upper end of the search."""
        round_to: int = 1
        """Keep each layer's remaining channel count a multiple of this (kernels like 8, 16)."""
        scope: Literal["layer", "global"] = "layer"
        """'layer': every layer loses ``amount``; 'global': ``amount`` of all groups, the least
        important wherever they are (each layer at most ``max_amount``). Global ranking assumes
        scores comparable across layers (true of ``activation`` into a normalized stream)."""
        nodes: tuple[str, ...] = ()
        """When given, only layers produced by one of these node names are pruned."""
        search: bool = False
        """Find the largest amount meeting the run's budget on the calibration data."""
        margin: float = 0.4
        """Part of the cosine budget (1 - min_cosine) kept in reserve by the search."""
        holdout: float = 0.25
        """With ``search``, the last part of the calibration feeds judges the trials and is not
        used for statistics (the refit would otherwise be judged on the data it was fitted to)."""
        compensate: bool = True
        """With --calib, add each removed channel's mean contribution to its consumers' biases."""
        refit: bool = True
        """With --calib and ``compensate``, also refit the MatMul/Gemm weights reading the pruned
        channels by least squares on the calibration activations (the kept channels take over
        what the removed ones predicted)."""

    def __init__(self, **options: Any) -> None:
        super().__init__(**options)
        check_fractions(self.name, amount=self.options.amount, max_amount=self.options.max_amount,
                        margin=self.options.margin, holdout=self.options.holdout)

    def needs_calibration(self) -> bool:
        return self.options.search or self.options.importance == "activation"

    def apply(self, model: ir.Model, context: PassContext) -> PassResult:
        dependency = analyze(model, context.exclude)
        moments = self._moments(model, dependency, context)
        compensate = self.options.compensate and bool(moments)
        scores = group_importance(dependency, self.options.importance, moments, compensate=compensate)
        layers = {family: groups for family, groups in layers_of(dependency.groups).items()
                  if not self.options.nodes or _producers(dependency, family) & set(self.options.nodes)}
        details: dict[str, Any] = {"importance": self.options.importance, "before": model_cost(model)}
        amount = self._search(model, layers, scores, moments, details, context) if self.options.search else self.options.amount
        chosen = self._choose(layers, scores, amount)
        details["layers"] = layer_report(dependency, removal_plan(dependency, chosen)[0])
        details["amount"] = amount
        details["bias_compensation"] = compensate
        _, groups = self._prune(model, dependency, chosen, moments)
        details["after"] = model_cost(model)
        total = sum(len(g) for g in layers.values())
        logger.info("removed %d of %d prunable channel groups (amount %.3f)", len(groups), total, amount)
        return PassResult(model, modified=bool(groups), details=details,
                          changes={"channels removed": len(groups), "prunable channels": total,
                                   "parameters removed": details["before"]["parameters"] - details["after"]["parameters"]})

    def _moments(self, model: ir.Model, dependency: Dependency, context: PassContext) -> dict[str, ChannelMoments]:
        wanted = self.options.importance == "activation" or (self.options.compensate and context.calibration)
        if not wanted:
            return {}
        prunable = {t.value.name for g in dependency.groups if g.prunable for t, _ in g.members}
        readers = {t.value.name: t for t in dependency.tensors.values()
                   if t.value.name in prunable and any(g == "consumer" for g, *_ in weight_slices(t))}
        gram = frozenset(name for name, t in readers.items() if self.options.refit and t.size <= 8192 and any(n.op_type in ("MatMul", "Gemm") for _, n, *_ in weight_slices(t)))
        if not readers:
            return {}
        return channel_moments(model, {name: t.axis for name, t in readers.items()}, self._split_feeds(context).tune,
                               threads=context.threads, gram=gram)

    def _split_feeds(self, context: PassContext) -> HeldOut:
        """Feeds for statistics and, with ``search``, the held-out feeds judging it."""
        feeds = list(context.calibration_feeds(self.name).feeds)
        return hold_out(feeds, self.options.holdout) if self.options.search else HeldOut(feeds, [], False)

    def _prune(self, model: ir.Model, dependency: Dependency, chosen: list[ChannelGroup],
               moments: dict[str, ChannelMoments]) -> tuple[Removed, list[ChannelGroup]]:
        removed, groups = removal_plan(dependency, chosen)
        corrections = bias_corrections(dependency, removed, moments, refit=self.options.refit) \
            if self.options.compensate else []
        apply_cuts(model.graph, dependency, removed)
        apply_bias_corrections(model.graph, corrections, removed)
        return removed, groups

    def _choose(self, layers: dict[tuple[str, ...], list[ChannelGroup]], scores: np.ndarray, amount: float) -> list[ChannelGroup]:
        chosen = []
        amount = min(amount, self.options.max_amount)
        quota = {family: amount for family in layers}
        if self.options.scope == "global":
            quota = _global_quota(layers, scores, amount, self.options.max_amount)
        for family, groups in layers.items():
            count = len(groups)
            keep = max(1, count - int(math.floor(quota[family] * count + 1e-9)))
            step = max(1, self.options.round_to)
            keep = min(count, int(math.ceil(keep / step) * step))
            ranked = sorted(groups, key=lambda g: (scores[g.index], g.index))
            chosen.extend(ranked[:count - keep])
        return chosen

    def _search(self, model: ir.Model, layers: dict, scores: np.ndarray, moments: dict[str, ChannelMoments],
                details: dict[str, Any], context: PassContext) -> float:
        """The largest amount, on a grid of 1/32 steps (``verify.search``), meeting the run's
        budget on the held-out feeds (``verify.judge``); ``context.retreat`` halves it that many
        times."""
        budget = run_budget(model, context.budget)
        if not budget.bounds:
            raise DataError(f"pass '{self.name}': search needs a budget: give --min-cosine, --min-top1 or --max-abs")
        split = self._split_feeds(context)
        judge = Judge(model, split.judge, budget, reserve=self.options.margin, weak=split.weak,
                      threads=context.threads or 1)
        proto = ir.serde.serialize_model(model)

        # Rung n removes 1/32 less than the most the options allow (rung 0: ``max_amount``).
        most, trials = int(self.options.max_amount * 32), []

        def judged(rungs: int) -> ParityVerdict:
            amount = (most - rungs) / 32
            trial = ir.serde.deserialize_model(proto)
            trial_dependency = analyze(trial, context.exclude)
            chosen = {g.index for g in self._choose(layers, scores, amount)}
            self._prune(trial, trial_dependency, [g for g in trial_dependency.groups if g.index in chosen], moments)
            verdict = judge.verdict(trial)
            trials.append({"amount": amount, "measured": verdict.measured(), "value": verdict.value,
                           "meets": verdict.meets_target})
            return verdict

        rungs, _ = fewest_rungs(judged, -1, most)
        details["search"] = {"trials": trials, "budget": budget.describe(), "allowed": judge.allowed,
                             "judged_on_feeds": len(split.judge), "weak_evidence": split.weak}
        if rungs == most and trials and not any(t["meets"] for t in trials):
            logger.info("no amount above 0 meets the budget on the calibration data")
        return (most - retreat(rungs, most, context.retreat)) / 32

    def searches(self) -> bool:
        return self.options.search
