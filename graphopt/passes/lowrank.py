"""`lowrank`: replace a constant weight W [k×n] by two thin factors A [k×r] · B [r×n].

MatMul(x, W) becomes MatMul(MatMul(x, A), B); a Gemm becomes the same chain (transA as a
Transpose, alpha folded into the factors, beta·C added after the second MatMul); an
embedding table Gather(W, ids) becomes MatMul(Gather(A, ids), B). A weight is factorized
only where it pays: r·(k+n) must be below (1 - ``min_saving``)·k·n.

Activation-aware (with --calib): the factors minimize the error of the layer's *output* on
the calibration inputs, E‖x(W - AB)‖², not the weight error. With S the symmetric square
root of the input covariance E[xxᵀ] (``covariance``) or of its diagonal (``diagonal``),
the truncated SVD of S·W = UΣVᵀ gives A = S⁻¹U√Σ, B = √ΣVᵀ. Embedding tables read indices,
not activations: they always use the plain SVD.

Ranks: per-layer energy fraction, a fixed ratio of min(k, n), a global parameter budget
(directions of all layers ranked by the share of their layer's energy per parameter), or
``parity``: the smallest parameter budget whose model keeps the held-out cosine, searched
by bisection on the last ``holdout`` of the calibration feeds.

A MatMul already paired with another constant-weight MatMul (or fed by a constant-table
Gather) is one half of a factorization and is left alone: running the pass twice changes
nothing.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from typing import Any, Literal

import numpy as np
import onnx_ir as ir

from graphopt.errors import PassFailed, RecipeError
from graphopt.passes.activations import ActivationCollector, RowFrequency, SecondMoment
from graphopt.passes.base import GraphoptPass, PassContext, PassResult, check_fractions
from graphopt.passes.registry import register
from graphopt.passes.weights import WeightUse, exclusion, gemm_bias, initializer, replace_output, weight_use
from graphopt.verify.judge import HeldOut, Judge, ParityVerdict, hold_out, run_budget
from graphopt.verify.search import fewest_rungs, retreat

logger = logging.getLogger(__name__)

# Ridge added to the input covariance, as a fraction of its mean diagonal, so that input
# directions the calibration data never excites keep a finite, bounded inverse weight.
COVARIANCE_DAMPING = 0.01


@dataclasses.dataclass
class Candidate:
    """One weight with the SVD of its (possibly activation-weighted) matrix."""

    index: int  # position of its node in the graph before any rewrite
    use: WeightUse
    matrix: np.ndarray  # the weight as [in, out] (alpha folded in for Gemm), float64
    left: np.ndarray  # U of the weighted matrix
    singular: np.ndarray
    right: np.ndarray  # Vᵀ
    inverse_scale: np.ndarray | None  # S⁻¹, [in, in] or [in] (diagonal); None: plain SVD

    @property
    def shape(self) -> tuple[int, int]:
        return self.matrix.shape  # type: ignore[return-value]

    @property
    def dense_params(self) -> int:
        return self.shape[0] * self.shape[1]

    def factor_params(self, rank: int) -> int:
        return rank * (self.shape[0] + self.shape[1])

    def energy_rank(self, energy: float) -> int:
        cumulative = np.cumsum(self.singular**2)
        return min(int(np.searchsorted(cumulative, energy * cumulative[-1] * (1 - 1e-12))) + 1, len(cumulative))

    def factors(self, rank: int) -> tuple[np.ndarray, np.ndarray]:
        root = np.sqrt(self.singular[:rank])
        a = self.left[:, :rank] * root
        if self.inverse_scale is not None:
            a = self.inverse_scale @ a if self.inverse_scale.ndim == 2 else a * self.inverse_scale[:, None]
        b = root[:, None] * self.right[:rank]
        return a.astype(np.float32), b.astype(np.float32)


@register
class LowRankPass(GraphoptPass, name="lowrank",
                  summary="truncated-SVD factors for MatMul/Gemm weights and embedding tables, activation-aware with --calib"):
    role = "compress"

    class Options:
        select: Literal["energy", "ratio", "budget", "parity"] = "energy"
        """How ranks are chosen: per-layer ``energy``, fixed ``ratio`` of min(k, n), global
        parameter ``budget``, or ``parity`` (the smallest budget that keeps the held-out
        cosine; needs --calib)."""
        energy: float = 0.99
        """select=energy: keep this fraction of each layer's (output-weighted) energy Σσ²."""
        ratio: float = 0.5
        """select=ratio: rank = ratio · min(k, n)."""
        params: float = 0.5
        """select=budget: parameters kept, as a fraction of the eligible weights' total."""
        activation_aware: Literal["covariance", "diagonal", "off"] = "covariance"
        """Weight the SVD by the calibration inputs' covariance (or per-channel energy)."""
        embeddings: bool = False
        """Also factorize Gather embedding tables (axis 0, 2-D constant float table)."""
        ops: tuple[str, ...] = ("MatMul", "Gemm")
        min_elements: int = 16384
        """Smaller weights are left alone."""
        min_saving: float = 0.25
        """Factorize only where the factors have at least this fraction fewer parameters:
        near break-even the saving is small and two kernels run instead of one."""
        min_cosine: float = 0.995
        """select=parity: held-out cosine to keep when the run states no --min-cosine."""
        budget_share: float = 0.5
        """select=parity: share of the error budget (1 - min_cosine) this pass may spend;
        the rest is left to later lossy steps (quantization)."""
        margin: float = 0.4
        """select=parity: part of this pass's error share kept in reserve for unseen data."""
        holdout: float = 0.25
        """select=parity: fraction of the calibration feeds (the last ones) used for judging."""
        search_steps: int = 7
        """select=parity: bisection steps over the parameter budget."""
        nodes: tuple[str, ...] = ()
        """When given, only these node names are considered."""

    def __init__(self, **options: Any) -> None:
        super().__init__(**options)
        check_fractions(self.name, holdout=self.options.holdout, margin=self.options.margin)
        if not 0 < self.options.budget_share <= 1:
            raise RecipeError(f"pass '{self.name}': 'budget_share' must be in (0, 1], got {self.options.budget_share}")

    def needs_calibration(self) -> bool:
        return self.options.select == "parity"

    def apply(self, model: ir.Model, context: PassContext) -> PassResult:
        notes: list[str] = []
        uses, skipped = self._eligible(model.graph, context.exclude)
        split = self._split_feeds(context)
        scales = self._input_scales(model, uses, split.tune, notes, context.threads)
        candidates = [_decompose(index, use, scales.get(index)) for index, use in uses]
        search: dict[str, Any] = {}
        if self.options.select == "parity" and candidates:
            ranks, search = self._parity_ranks(model, candidates, split, context)
            if split.weak:
                notes.append("one calibration feed: it both calibrated and judged the ranks (weak evidence)")
        else:
            ranks = self._ranks(candidates)
        layers = []
        for candidate in candidates:
            rank = ranks.get(candidate.index)
            if rank is None or not self._pays(candidate, rank):
                skipped[candidate.use.name] = f"rank {rank} does not pay for {list(candidate.shape)}"
                continue
            layers.append(_report(candidate, rank))
        _apply(model.graph, {c.index: c for c in candidates}, {e["index"]: e["rank"] for e in layers})
        before = sum(e["params_before"] for e in layers)
        after = sum(e["params_after"] for e in layers)
        logger.info("lowrank: %d weights factorized, %d -> %d parameters", len(layers), before, after)
        if not layers:
            notes.append(self._why_nothing(candidates, skipped, search))
        return PassResult(
            model,
            modified=bool(layers),
            changes={"weights factorized": len(layers), "parameters removed": before - after},
            notes=notes,
            details={"layers": layers, "skipped": skipped, "activation_aware": bool(scales), **search},
        )

    def _why_nothing(self, candidates: list[Candidate], skipped: dict[str, str], search: dict[str, Any]) -> str:
        """The reason no weight was factorized, as the user should read it."""
        kinds = "/".join(self.options.ops) + (" weights" if self.options.ops else "")
        if self.options.embeddings:
            kinds = f"{kinds} or embedding tables" if self.options.ops else "embedding tables (Gather on a 2-D table)"
        if not candidates:
            reasons = sorted(set(skipped.values()))
            detail = f": {'; '.join(reasons[:3])}" if reasons else ""
            return f"no weight factorized: the model has no {kinds} this pass may take{detail}"
        if search.get("trials") and "held_out" not in search:
            best = search["trials"][-1]["measured"] if search["trials"] else "n/a"
            return (f"no weight factorized: no rank kept the held-out result within this pass's share of the budget "
                    f"({search.get('budget')}; closest trial {best})")
        return f"no weight factorized: no rank saves {self.options.min_saving:.0%} of a weight's parameters"

    # -- which weights ----------------------------------------------------------------------

    def _eligible(self, graph: ir.Graph, exclude: tuple[str, ...]) -> tuple[list[tuple[int, WeightUse]], dict[str, str]]:
        ops = set(self.options.ops) | ({"Gather"} if self.options.embeddings else set())
        uses, skipped = [], {}
        for index, node in enumerate(graph):
            if node.op_type not in ops or (self.options.nodes and node.name not in self.options.nodes):
                continue
            use, reason = weight_use(node, graph)
            reason = exclusion(node, exclude) or reason or _refusal(use, graph, self.options.min_elements)
            if reason:
                skipped[node.name or node.op_type] = reason
            else:
                uses.append((index, use))
        return uses, skipped

    def _pays(self, candidate: Candidate, rank: int) -> bool:
        return 0 < rank and candidate.factor_params(rank) < (1 - self.options.min_saving) * candidate.dense_params

    def _max_rank(self, candidate: Candidate) -> int:
        """The largest rank that pays (0 when none does)."""
        k, n = candidate.shape
        rank = math.ceil((1 - self.options.min_saving) * k * n / (k + n)) - 1
        while rank > 0 and not self._pays(candidate, rank):
            rank -= 1
        return max(rank, 0)

    # -- calibration ------------------------------------------------------------------------

    def _split_feeds(self, context: PassContext) -> HeldOut:
        if self.options.select == "parity":
            return hold_out(context.calibration_feeds(self.name).feeds, self.options.holdout)
        feeds = list(context.calibration.feeds) if context.calibration is not None else []
        return HeldOut(feeds, [], False)

    def _input_scales(self, model: ir.Model, uses: list[tuple[int, WeightUse]], tune: list[dict],
                      notes: list[str], threads: int | None) -> dict[int, tuple[np.ndarray, np.ndarray]]:
        """Per candidate index: (S, S⁻¹) from the calibration inputs. A Gather's input is a
        one-hot row selector, so its covariance is diagonal: how often each row is read."""
        mode = self.options.activation_aware
        if mode == "off" or not uses:
            return {}
        if not tune:
            notes.append("no --calib: plain SVD (weight error, not output error)")
            return {}
        names = sorted({_stat_input(u).name for _, u in uses})
        transposed = {u.node.inputs[0].name for _, u in uses
                      if u.kind == "Gemm" and u.node.attributes.get_int("transA", 0)}
        rows = {_stat_input(u).name: u.weight.const_value.shape[0] for _, u in uses if u.kind == "Gather"}
        moments = input_moments(model, names, tune, transposed, rows, diagonal=mode == "diagonal",
                                threads=threads)
        return {i: _square_root(moments[_stat_input(u).name]) for i, u in uses if _stat_input(u).name in moments}

    # -- ranks ------------------------------------------------------------------------------

    def _ranks(self, candidates: list[Candidate], params: float | None = None) -> dict[int, int]:
        select = self.options.select
        if select == "energy":
            return {c.index: c.energy_rank(self.options.energy) for c in candidates}
        if select == "ratio":
            return {c.index: max(1, round(self.options.ratio * min(c.shape))) for c in candidates}
        return self._budget_ranks(candidates, self.options.params if params is None else params)

    def _budget_ranks(self, candidates: list[Candidate], fraction: float) -> dict[int, int]:
        """Greedy over all layers' singular directions, best share of layer energy per
        parameter first, until ``fraction`` of the total parameters is spent. A layer whose
        rank would not pay stays dense (costing k·n), and the rest is allocated again."""
        budget = fraction * sum(c.dense_params for c in candidates)
        dense: set[int] = set()
        while True:
            spend = budget - sum(c.dense_params for c in candidates if c.index in dense)
            active = [c for c in candidates if c.index not in dense]
            ranks = _greedy(active, spend)
            newly = {c.index for c in active if not self._pays(c, ranks[c.index])}
            if not newly:
                return {**ranks, **{i: 0 for i in dense}}
            dense |= newly

    def _parity_ranks(self, model: ir.Model, candidates: list[Candidate],
                      split: HeldOut, context: PassContext) -> tuple[dict[int, int], dict[str, Any]]:
        """The smallest parameter budget, on a grid of ``2**search_steps`` rungs (``verify.search``),
        whose model meets this pass's share of the run's budget on the held-out feeds;
        ``context.retreat`` halves the parameters it saved that many times."""
        from graphopt.verify.gate import Thresholds

        budget = run_budget(model, context.budget, Thresholds(min_cosine=self.options.min_cosine))
        judge = Judge(model, split.judge, budget, share=self.options.budget_share, reserve=self.options.margin,
                      weak=split.weak)
        by_index = {c.index: c for c in candidates}

        steps = 2**self.options.search_steps  # rung n keeps n/steps of the parameters
        trials: list[dict[str, Any]] = []

        def verdict(rungs: int) -> ParityVerdict:
            fraction = rungs / steps
            ranks = self._budget_ranks(candidates, fraction)
            trial = model.clone()
            _apply(trial.graph, by_index, {i: r for i, r in ranks.items() if r and self._pays(by_index[i], r)})
            result = judge.verdict(trial)
            trials.append({"params": round(fraction, 4), "measured": result.measured(), "meets": result.meets_target})
            return result

        rungs, result = fewest_rungs(verdict, 0, steps)
        if context.retreat and rungs < steps:
            rungs = retreat(rungs, steps, context.retreat)
            result = verdict(rungs)
        if result is None or rungs == steps:  # keeping every parameter: nothing factorized
            return {c.index: 0 for c in candidates}, {"params": 1.0, "trials": trials, "budget": budget.describe(),
                                                      "held_out_feeds": len(split.judge)}
        fraction = rungs / steps
        return self._budget_ranks(candidates, fraction), {
            "params": fraction, "held_out": result.to_dict(), "budget": budget.describe(),
            "held_out_feeds": len(split.judge), "trials": trials}

    def searches(self) -> bool:
        return self.options.select == "parity"


def _refusal(use: WeightUse, graph: ir.Graph, min_elements: int) -> str:
    """Why this weight use is not factorized here ("" when it is a candidate)."""
    node, weight = use.node, use.weight
    if use.kind not in ("MatMul", "Gemm", "Gather"):
        return f"{use.kind} weights are not factorized (only MatMul/Gemm weights and embedding tables)"
    if weight.const_value.size < min_elements:
        return f"weight has {weight.const_value.size} elements (< {min_elements})"
    if len(weight.uses()) > 1 or weight.is_graph_output():
        return "weight is shared by several nodes"
    if use.kind == "Gemm":
        bias = node.inputs[2] if len(node.inputs) > 2 else None
        if bias is not None and bias.const_value is None and node.attributes.get_float("beta", 1.0) != 1.0:
            return "Gemm bias is computed at run time and beta != 1"
    if _is_factor(use):
        return "already one factor of a low-rank pair"
    return ""


def _constant_matmul(node: ir.Node | None) -> bool:
    return (node is not None and node.op_type == "MatMul" and node.domain in ("", "ai.onnx")
            and len(node.inputs) == 2 and node.inputs[1] is not None and node.inputs[1].const_value is not None)


def _is_factor(use: WeightUse) -> bool:
    """The node reads the output of a constant-weight MatMul or table Gather, or its output
    is read only by a constant-weight MatMul: the pair already is a factorization."""
    node = use.node
    readers = list(node.outputs[0].consumers())
    if len(readers) == 1 and _constant_matmul(readers[0]) and readers[0].inputs[0] is node.outputs[0]:
        return True
    if use.kind == "Gather":
        return False
    producer = node.inputs[0].producer() if node.inputs[0] is not None else None
    if producer is None or len(node.inputs[0].consumers()) != 1:
        return False
    if producer.op_type == "Gather":
        return producer.inputs[0] is not None and producer.inputs[0].const_value is not None
    return _constant_matmul(producer)


def _decompose(index: int, use: WeightUse, scale: tuple[np.ndarray, np.ndarray] | None) -> Candidate:
    matrix = use.weight.const_value.numpy().astype(np.float64)
    if use.kind == "Gemm":
        if use.node.attributes.get_int("transB", 0):
            matrix = matrix.T
        matrix = matrix * use.node.attributes.get_float("alpha", 1.0)
    weighted, inverse = matrix, None
    if scale is not None:
        root, inverse = scale
        weighted = root @ matrix if root.ndim == 2 else matrix * root[:, None]
    left, singular, right = _svd(weighted)
    return Candidate(index, use, matrix, left, singular, right, inverse)


def _svd(matrix: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Thin SVD; for a tall table (embeddings) through the eigenvectors of its small Gram
    matrix, several times faster than LAPACK's SVD at the same accuracy for the leading
    directions (the only ones kept)."""
    k, n = matrix.shape
    if k < 4 * n:
        return np.linalg.svd(matrix, full_matrices=False)
    values, vectors = np.linalg.eigh(matrix.T @ matrix)
    order = np.argsort(values)[::-1]
    singular = np.sqrt(np.maximum(values[order], 0.0))
    right = vectors[:, order].T
    left = (matrix @ right.T) / np.where(singular > 0, singular, 1.0)
    return left, singular, right


def _greedy(candidates: list[Candidate], spend: float) -> dict[int, int]:
    """Ranks keeping the most layer-relative energy per parameter within ``spend``."""
    scores, owners = [], []
    for c in candidates:
        energy = c.singular**2
        scores.append(energy / max(energy.sum(), 1e-300) / (c.shape[0] + c.shape[1]))
        owners.append(np.full(len(energy), c.index))
    ranks = {c.index: 0 for c in candidates}
    if not candidates:
        return ranks
    costs = {c.index: c.shape[0] + c.shape[1] for c in candidates}
    all_scores, all_owners = np.concatenate(scores), np.concatenate(owners)
    for owner in all_owners[np.argsort(-all_scores, kind="stable")]:
        if spend < costs[owner]:
            break
        spend -= costs[owner]
        ranks[int(owner)] += 1
    return ranks


def _report(candidate: Candidate, rank: int) -> dict[str, Any]:
    energy = candidate.singular**2
    return {
        "index": candidate.index,
        "node": candidate.use.name,
        "kind": candidate.use.kind,
        "shape": list(candidate.shape),
        "rank": rank,
        "params_before": candidate.dense_params,
        "params_after": candidate.factor_params(rank),
        "energy_kept": float(energy[:rank].sum() / max(energy.sum(), 1e-300)),
        "activation_aware": candidate.inverse_scale is not None,
    }


# -- calibration statistics -------------------------------------------------------------------


def _stat_input(use: WeightUse) -> ir.Value:
    """The tensor whose statistics weight this use: the activation, or a Gather's indices."""
    return use.node.inputs[1] if use.kind == "Gather" else use.node.inputs[0]


def input_moments(model: ir.Model, names: list[str], feeds: list[dict], transposed: set[str],
                  tables: dict[str, int], *, diagonal: bool = False, threads: int | None = None) -> dict[str, np.ndarray]:
    """E[xxᵀ] over the rows of each float tensor in ``names`` (channels on the last axis, on
    the first for ``transposed``; only the diagonal with ``diagonal``), and for index tensors
    in ``tables`` (name → table rows) the frequency of each row. Streamed over ``feeds``."""
    moments: dict[str, Any] = {
        name: RowFrequency(tables[name]) if name in tables else SecondMoment(name in transposed, diagonal)
        for name in dict.fromkeys(names)}
    ActivationCollector(model, moments, threads=threads).stream(feeds, moments)
    return {name: m.value for name, m in moments.items() if m.count}


def _square_root(covariance: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """S and S⁻¹ with S² = covariance + damping (symmetric; a vector for a diagonal)."""
    if covariance.ndim == 1:
        damped = covariance + COVARIANCE_DAMPING * max(float(covariance.mean()), 1e-12)
        return np.sqrt(damped), 1.0 / np.sqrt(damped)
    values, vectors = np.linalg.eigh(covariance)
    values = np.maximum(values, 0.0) + COVARIANCE_DAMPING * max(float(np.trace(covariance)) / len(values), 1e-12)
    return (vectors * np.sqrt(values)) @ vectors.T, (vectors / np.sqrt(values)) @ vectors.T


# -- rewriting --------------------------------------------------------------------------------


def _apply(graph: ir.Graph, candidates: dict[int, Candidate], ranks: dict[int, int]) -> None:
    """Factorize the nodes at positions ``ranks`` (positions of the graph before rewriting)."""
    nodes = list(graph)
    for index, rank in sorted(ranks.items()):
        if rank <= 0:
            continue
        node = nodes[index]
        use, _ = weight_use(node, graph)
        if use is None:
            raise PassFailed(f"lowrank: node '{node.name}' lost its weight while rewriting")
        _factorize(graph, use, *candidates[index].factors(rank))


def _factorize(graph: ir.Graph, use: WeightUse, a: np.ndarray, b: np.ndarray) -> None:
    node, weight = use.node, use.weight
    name = node.name or weight.name or "weight"
    a_value = initializer(graph, f"{weight.name}_lowrank_a", a)
    b_value = initializer(graph, f"{weight.name}_lowrank_b", b)
    new_nodes: list[ir.Node] = []
    if use.kind == "Gather":
        first = ir.node("Gather", [a_value, node.inputs[1]], {"axis": 0}, name=f"{name}_lowrank_a")
    else:
        x = node.inputs[0]
        if use.kind == "Gemm" and node.attributes.get_int("transA", 0):
            transpose = ir.node("Transpose", [x], {"perm": [1, 0]}, name=f"{name}_transpose_a")
            new_nodes.append(transpose)
            x = transpose.outputs[0]
        first = ir.node("MatMul", [x, a_value], name=f"{name}_lowrank_a")
    second = ir.node("MatMul", [first.outputs[0], b_value], name=f"{name}_lowrank_b")
    new_nodes += [first, second]
    first.outputs[0].name = f"{name}_lowrank_hidden"
    result = second.outputs[0]
    bias = node.inputs[2] if use.kind == "Gemm" and len(node.inputs) > 2 else None
    added, result = gemm_bias(graph, node, result, name)
    new_nodes += added
    graph.insert_before(node, new_nodes)
    replace_output(graph, node, result, "dense")
    for value in {id(v): v for v in (weight, *([node.inputs[2]] if bias is not None else []))}.values():
        if value is not None and value.name in graph.initializers and not value.uses() \
                and not value.is_graph_output():
            graph.initializers.pop(value.name)


def _serialized(model: ir.Model) -> bytes:
    return ir.serde.serialize_model(model).SerializeToString()
