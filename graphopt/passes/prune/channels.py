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
most ``max_amount``; ``search = true`` instead looks for the largest amount whose outputs on
the calibration data still meet the run's budget (``--min-cosine``/``--max-abs``), keeping
``margin`` of the cosine budget in reserve for unseen data.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections import defaultdict
from collections.abc import Sequence
from typing import Any, Literal

import numpy as np
import onnx_ir as ir

from graphopt.errors import DataError
from graphopt.passes.base import GraphoptPass, PassResult
from graphopt.passes.prune.cut import Removed, apply_cuts, removal_plan, replace_constant
from graphopt.passes.prune.dependency import ChannelGroup, ChannelTensor, Dependency, analyze, constant, weight_layout
from graphopt.passes.prune.moments import ChannelMoments, channel_moments
from graphopt.passes.prune.report import layer_report
from graphopt.passes.prune.stats import model_cost
from graphopt.passes.quantize.targets import initializer
from graphopt.passes.registry import register

logger = logging.getLogger(__name__)

Importance = Literal["l1", "l2", "activation"]


def _norms(weight: np.ndarray, axis: int, kind: str) -> np.ndarray:
    moved = np.moveaxis(weight, axis, 0).reshape(weight.shape[axis], -1).astype(np.float64)
    return np.abs(moved).sum(axis=1) if kind == "l1" else np.sqrt(np.square(moved).sum(axis=1))


def _slices(tensor: ChannelTensor) -> list[tuple[str, ir.Node, np.ndarray, int]]:
    """(role, node, weight, axis) of every weight slice indexed by this tensor's channels."""
    found = []
    producer = tensor.value.producer()
    if producer is not None and weight_layout(producer) is not None:
        weight, out_axis, _ = weight_layout(producer)
        found.append(("producer", producer, weight, out_axis))
    for consumer in tensor.value.consumers():
        layout = weight_layout(consumer)
        if layout is None or consumer.inputs[0] is not tensor.value or consumer.attributes.get_int("group", 1) != 1:
            continue  # a depthwise Conv's input slice is its output slice, counted as producer
        found.append(("consumer", consumer, layout[0], layout[2]))
    return found


def _stats_axis_matches(tensor: ChannelTensor) -> bool:
    """``collect`` keeps per-channel statistics on axis 1 of 4-D tensors, else the last axis."""
    return tensor.axis == -3 if tensor.rank == 4 else tensor.axis == -1


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
        for role, _node, weight, axis in _slices(tensor):
            if weight.shape[axis] != tensor.size:
                continue
            if kind == "activation":
                if role != "consumer" or spread is None or spread.size != tensor.size:
                    continue
                values = spread * _norms(weight, axis, "l2")
            else:
                values = _norms(weight, axis, kind)
            for channel, value in enumerate(values):
                scores[atoms[(id(tensor.value), channel)]] += value
    return scores


def bias_corrections(dependency: Dependency, removed: Removed,
                     moments: dict[str, ChannelMoments]) -> list[tuple[ir.Node, np.ndarray]]:
    """For each consumer losing input channels with known means: what those channels added on
    average to each of its outputs (exact for MatMul/Gemm; for Conv, away from padded borders)."""
    corrections = []
    for key, drop in removed.items():
        tensor = dependency.tensors[key]
        stats = moments.get(tensor.value.name or "")
        if stats is None or stats.mean.size != tensor.size:
            continue
        for role, node, weight, axis in _slices(tensor):
            if role != "consumer" or node.op_type == "ConvTranspose":
                continue
            rows = np.moveaxis(weight, axis, 0)[drop].astype(np.float64)  # [dropped, out, (kernel…)]
            contribution = rows.reshape(rows.shape[0], rows.shape[1], -1).sum(axis=2)
            delta = stats.mean[drop] @ contribution
            if node.op_type == "Gemm":  # Y = alpha·A·B + beta·C
                delta *= node.attributes.get_float("alpha", 1.0) / node.attributes.get_float("beta", 1.0)
            corrections.append((node, delta))
    return corrections


def apply_bias_corrections(graph: ir.Graph, corrections: list[tuple[ir.Node, np.ndarray]], removed: Removed) -> None:
    """Add each correction to its node's bias (after the cuts: sliced like the outputs)."""
    for node, delta in corrections:
        out_drop = removed.get(id(node.outputs[0]), np.zeros(0, np.int64))
        delta = np.delete(delta, out_drop).astype(np.float32)
        if node.op_type == "MatMul":
            _add_after(graph, node, delta)
            continue
        index = 2
        bias = constant(node.inputs[index]) if len(node.inputs) > index and node.inputs[index] is not None else None
        if bias is None:
            value = initializer(graph, f"{node.name or 'layer'}_bias", delta)
            node.resize_inputs(3)
            node.replace_input_with(index, value)
        else:
            replace_constant(graph, node, index, (bias + delta.reshape(bias.shape) if bias.size == delta.size
                                                  else bias + delta).astype(np.float32))


def _add_after(graph: ir.Graph, node: ir.Node, delta: np.ndarray) -> None:
    output = node.outputs[0]
    users = output.consumers()
    if len(users) == 1 and users[0].op_type == "Add" and len(users[0].inputs) == 2:
        add = users[0]
        index = 1 if add.inputs[0] is output else 0
        bias = constant(add.inputs[index])
        if bias is not None and bias.shape[-1:] == delta.shape and bias.size == delta.size:
            replace_constant(graph, add, index, (bias + delta.reshape(bias.shape)).astype(np.float32))
            return
    value = initializer(graph, f"{node.name or 'matmul'}_pruned_mean", delta)
    add = ir.node("Add", [output, value], name=unique_name_node(graph, f"{node.name or 'matmul'}_pruned_mean"))
    output.replace_all_uses_with(add.outputs[0])
    add.replace_input_with(0, output)
    graph.insert_after(node, add)
    if output.is_graph_output():
        add.outputs[0].name, output.name = output.name, f"{output.name}_before_mean"
        graph.outputs[graph.outputs.index(output)] = add.outputs[0]


def unique_name_node(graph: ir.Graph, base: str) -> str:
    taken = {n.name for n in graph}
    name, index = base, 1
    while name in taken:
        name, index = f"{base}_{index}", index + 1
    return name


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
class PruneChannelsPass(GraphoptPass):
    name = "prune-channels"
    summary = "remove the least important coupled channel groups (L1, L2 or activation importance): lossy"

    @dataclasses.dataclass(frozen=True, kw_only=True)
    class Options:
        amount: float = 0.3
        """Fraction of each layer's prunable channel groups to remove."""
        importance: Importance = "l2"
        max_amount: float = 0.9
        """Per-layer cap, also the upper end of the search."""
        round_to: int = 1
        """Keep each layer's remaining channel count a multiple of this (kernels like 8, 16)."""
        nodes: tuple[str, ...] = ()
        """When given, only layers produced by one of these node names are pruned."""
        search: bool = False
        """Find the largest amount meeting the run's budget on the calibration data."""
        margin: float = 0.4
        """Part of the cosine budget (1 - min_cosine) kept in reserve by the search."""
        compensate: bool = True
        """With --calib, add each removed channel's mean contribution to its consumers' biases."""

    def call(self, model: ir.Model) -> PassResult:
        if not 0 <= self.options.amount < 1 or not 0 <= self.options.max_amount < 1:
            raise DataError(f"pass '{self.name}': amount and max_amount must be in [0, 1)")
        dependency = analyze(model)
        moments = self._moments(model, dependency)
        compensate = self.options.compensate and bool(moments)
        scores = group_importance(dependency, self.options.importance, moments, compensate=compensate)
        layers = {family: groups for family, groups in layers_of(dependency.groups).items()
                  if not self.options.nodes or _producers(dependency, family) & set(self.options.nodes)}
        details: dict[str, Any] = {"importance": self.options.importance, "before": model_cost(model)}
        amount = self._search(model, layers, scores, moments, details) if self.options.search else self.options.amount
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

    def _moments(self, model: ir.Model, dependency: Dependency) -> dict[str, ChannelMoments]:
        wanted = self.options.importance == "activation" or (self.options.compensate and self.context.calibration)
        if not wanted:
            return {}
        axes = {t.value.name: t.axis for t in dependency.tensors.values()
                if t.value.name and not t.value.is_graph_input() and any(g == "consumer" for g, *_ in _slices(t))}
        return channel_moments(model, axes, self.calibration_feeds().feeds, threads=self.context.threads)

    def _prune(self, model: ir.Model, dependency: Dependency, chosen: list[ChannelGroup],
               moments: dict[str, ChannelMoments]) -> tuple[Removed, list[ChannelGroup]]:
        removed, groups = removal_plan(dependency, chosen)
        corrections = bias_corrections(dependency, removed, moments) if self.options.compensate else []
        apply_cuts(model.graph, dependency, removed)
        apply_bias_corrections(model.graph, corrections, removed)
        return removed, groups

    def _choose(self, layers: dict[tuple[str, ...], list[ChannelGroup]], scores: np.ndarray, amount: float) -> list[ChannelGroup]:
        chosen = []
        amount = min(amount, self.options.max_amount)
        for groups in layers.values():
            count = len(groups)
            keep = max(1, count - int(math.floor(amount * count + 1e-9)))
            step = max(1, self.options.round_to)
            keep = min(count, int(math.ceil(keep / step) * step))
            ranked = sorted(groups, key=lambda g: (scores[g.index], g.index))
            chosen.extend(ranked[:count - keep])
        return chosen

    def _search(self, model: ir.Model, layers: dict, scores: np.ndarray, moments: dict[str, ChannelMoments],
                details: dict[str, Any]) -> float:
        """Bisection on a grid of 1/32 steps: the largest amount meeting the budget."""
        from graphopt.verify.parity import compare_outputs, run_outputs
        from graphopt.verify.runtime import make_session

        budget = self.context.budget
        if budget is None or (budget.min_cosine is None and budget.max_abs is None):
            raise DataError(f"pass '{self.name}': search needs a budget: give --min-cosine or --max-abs")
        feeds = self.calibration_feeds().feeds
        proto = ir.serde.serialize_model(model)
        reference = run_outputs(make_session(proto.SerializeToString(), optimize=False, threads=self.context.threads), feeds)
        min_cosine = None if budget.min_cosine is None else 1 - (1 - budget.min_cosine) * (1 - self.options.margin)

        def meets(amount: float) -> tuple[bool, float]:
            trial = ir.serde.deserialize_model(proto)
            trial_dependency = analyze(trial)
            chosen = {g.index for g in self._choose(layers, scores, amount)}
            self._prune(trial, trial_dependency, [g for g in trial_dependency.groups if g.index in chosen], moments)
            session = make_session(ir.serde.serialize_model(trial).SerializeToString(), optimize=False,
                                   threads=self.context.threads)
            parity = compare_outputs(reference, run_outputs(session, feeds))
            ok = (min_cosine is None or parity.cosine_mean >= min_cosine) and \
                 (budget.max_abs is None or parity.max_abs <= budget.max_abs)
            return ok, parity.cosine_mean

        low, high, trials = 0, int(self.options.max_amount * 32), []
        while low < high:
            middle = (low + high + 1) // 2
            ok, cosine = meets(middle / 32)
            trials.append({"amount": middle / 32, "cosine": cosine, "meets": ok})
            if ok:
                low = middle
            else:
                high = middle - 1
        details["search"] = {"trials": trials, "calibration_min_cosine": min_cosine}
        if low == 0 and trials and not any(t["meets"] for t in trials):
            logger.info("no amount above 0 meets the budget on the calibration data")
        return low / 32

