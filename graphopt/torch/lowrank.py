"""Low-rank factorization of ``nn.Linear`` (and ``nn.Embedding``) layers, SVD-initialised.

``W ≈ (U_r √S_r)(√S_r V_r)``: the truncated SVD is the best rank-r approximation of ``W``
(Eckart–Young), so the student starts as close to the teacher as rank r allows; splitting √S
evenly keeps both factors on the same scale for training.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import logging
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from graphopt.errors import UsageError

logger = logging.getLogger(__name__)


class LowRankLinear(nn.Sequential):
    """``Linear(in, rank, bias=False)`` then ``Linear(rank, out)``: exports as two MatMuls."""

    def __init__(self, in_features: int, out_features: int, rank: int, *, bias: bool = True) -> None:
        super().__init__(nn.Linear(in_features, rank, bias=False), nn.Linear(rank, out_features, bias=bias))
        self.in_features, self.out_features, self.rank = in_features, out_features, rank


class LowRankEmbedding(nn.Module):
    """A ``vocab × rank`` table followed by a ``rank → dim`` projection."""

    def __init__(self, num_embeddings: int, embedding_dim: int, rank: int, *, padding_idx: int | None = None) -> None:
        super().__init__()
        self.table = nn.Embedding(num_embeddings, rank, padding_idx=padding_idx)
        self.project = nn.Linear(rank, embedding_dim, bias=False)
        self.num_embeddings, self.embedding_dim, self.rank = num_embeddings, embedding_dim, rank
        self.padding_idx = padding_idx

    @property
    def weight(self) -> torch.Tensor:  # transformers reads embeddings.word_embeddings.weight.dtype
        return self.project(self.table.weight)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.project(self.table(ids))


class FrequencySplitEmbedding(nn.Module):
    """Two tiers (adaptive input representations, Baevski & Auli 2019): the ``frequent`` ids keep
    their full-width rows in ``head``; every other id goes through the low-rank ``tail``. In text a
    few thousand tokens make most of the occurrences, so they stay exact while the long tail
    shares the rank. ``slot`` maps an id to its row: ``head`` rows first, then ``tail`` rows."""

    def __init__(self, num_embeddings: int, embedding_dim: int, rank: int, frequent: Sequence[int] | torch.Tensor,
                 *, padding_idx: int | None = None) -> None:
        super().__init__()
        frequent = torch.as_tensor(frequent, dtype=torch.long)
        if not 0 < frequent.numel() < num_embeddings or frequent.unique().numel() != frequent.numel():
            raise UsageError(f"frequent must be 1 to {num_embeddings - 1} distinct ids, got {frequent.numel()}")
        rare = torch.ones(num_embeddings, dtype=torch.bool)
        rare[frequent] = False
        slot = torch.empty(num_embeddings, dtype=torch.int32)  # int32: half the bytes of int64 in the file
        slot[frequent] = torch.arange(frequent.numel(), dtype=torch.int32)
        slot[rare] = frequent.numel() + torch.arange(int(rare.sum()), dtype=torch.int32)
        self.register_buffer("slot", slot)
        head_pad = tail_pad = None
        if padding_idx is not None:
            row = int(slot[padding_idx])
            head_pad, tail_pad = (row, None) if row < frequent.numel() else (None, row - frequent.numel())
        self.head = nn.Embedding(frequent.numel(), embedding_dim, padding_idx=head_pad)
        self.tail = LowRankEmbedding(num_embeddings - frequent.numel(), embedding_dim, rank, padding_idx=tail_pad)
        self.num_embeddings, self.embedding_dim, self.rank = num_embeddings, embedding_dim, rank
        self.padding_idx = padding_idx

    @property
    def weight(self) -> torch.Tensor:
        return torch.cat([self.head.weight, self.tail.weight])[self.slot.long()]

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        slot = self.slot[ids].long()
        heads = self.head.num_embeddings
        in_head = (slot < heads).unsqueeze(-1)
        return torch.where(in_head, self.head(slot.clamp(max=heads - 1)), self.tail((slot - heads).clamp(min=0)))


def choose_rank(singular_values: torch.Tensor, *, rank_ratio: float | None, energy: float | None) -> int:
    """Rank from a ratio of the full rank, or the fewest singular values holding ``energy`` of ΣS²."""
    if (rank_ratio is None) == (energy is None):
        raise UsageError("give exactly one of rank_ratio and energy")
    full = singular_values.numel()
    if rank_ratio is not None:
        if not 0 < rank_ratio <= 1:
            raise UsageError(f"rank_ratio must be in (0, 1], got {rank_ratio}")
        return max(1, round(rank_ratio * full))
    if not 0 < energy <= 1:  # type: ignore[operator]
        raise UsageError(f"energy must be in (0, 1], got {energy}")
    cumulative = torch.cumsum(singular_values.double() ** 2, 0) / (singular_values.double() ** 2).sum()
    return min(full, int(torch.searchsorted(cumulative, torch.tensor(energy, dtype=torch.float64)).item()) + 1)


@dataclasses.dataclass
class Whitening:
    """How errors in a weight matter on real inputs, from calibration data.

    For a Linear, ``cols`` is the Cholesky factor L of the input's second moment E[x xᵀ]
    (damped): ``‖(W − W')L‖`` is the output error on that data, so the SVD of ``W L``
    truncated and mapped back by ``L⁻¹`` minimizes it (activation-aware SVD). For an
    Embedding, ``rows`` weights each token's row by √(count + 1): frequent tokens are
    approximated better, unseen ones still count.
    """

    cols: torch.Tensor | None = None
    rows: torch.Tensor | None = None


def _whitened(weight: torch.Tensor, whitening: Whitening | None) -> torch.Tensor:
    matrix = weight.detach().double()
    if whitening is not None and whitening.cols is not None:
        matrix = matrix @ whitening.cols
    if whitening is not None and whitening.rows is not None:
        matrix = whitening.rows[:, None] * matrix
    return matrix


def _factors(weight: torch.Tensor, rank: int, whitening: Whitening | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(left [rows, rank], right [rank, cols]) with left @ right the best rank-r approximation
    (in the whitened norm when ``whitening`` is given)."""
    u, s, vh = torch.linalg.svd(_whitened(weight, whitening), full_matrices=False)
    root = s[:rank].sqrt()
    left, right = u[:, :rank] * root, root[:, None] * vh[:rank]
    if whitening is not None and whitening.cols is not None:
        right = torch.linalg.solve_triangular(whitening.cols, right, upper=False, left=False)
    if whitening is not None and whitening.rows is not None:
        left = left / whitening.rows[:, None]
    return left.to(weight.dtype), right.to(weight.dtype)


def factorize_linear(layer: nn.Linear, rank: int, whitening: Whitening | None = None) -> LowRankLinear:
    pair = LowRankLinear(layer.in_features, layer.out_features, rank, bias=layer.bias is not None)
    left, right = _factors(layer.weight, rank, whitening)
    with torch.no_grad():
        pair[0].weight.copy_(right)
        pair[1].weight.copy_(left)
        if layer.bias is not None:
            pair[1].bias.copy_(layer.bias)
    return pair.to(layer.weight.device)


def factorize_embedding(layer: nn.Embedding, rank: int, whitening: Whitening | None = None) -> LowRankEmbedding:
    result = LowRankEmbedding(layer.num_embeddings, layer.embedding_dim, rank, padding_idx=layer.padding_idx)
    left, right = _factors(layer.weight, rank, whitening)
    with torch.no_grad():
        result.table.weight.copy_(left)
        result.project.weight.copy_(right.T)
    return result.to(layer.weight.device)


def most_frequent(whitening: Whitening | None, count: int) -> torch.Tensor:
    """The ``count`` ids seen most often in calibration (ties: the lower id first)."""
    if whitening is None or whitening.rows is None:
        raise UsageError("frequent_rows needs calibration batches (it keeps the most frequent tokens' rows)")
    return torch.sort(torch.argsort(-whitening.rows, stable=True)[:count]).values


def _rare_rows(num_embeddings: int, frequent: torch.Tensor,
               whitening: Whitening | None) -> tuple[torch.Tensor, Whitening | None]:
    """The ids not in ``frequent``, ascending (= the tail's row order), and their row weights."""
    rare = torch.ones(num_embeddings, dtype=torch.bool)
    rare[frequent] = False
    ids = torch.nonzero(rare).flatten()
    return ids, (Whitening(rows=whitening.rows[ids]) if whitening is not None and whitening.rows is not None else None)


def split_embedding(layer: nn.Embedding, rank: int, frequent: torch.Tensor,
                    whitening: Whitening | None = None) -> FrequencySplitEmbedding:
    """A :class:`FrequencySplitEmbedding`: the ``frequent`` rows copied, the others factorized
    (weighted by their calibration counts when ``whitening`` is given)."""
    result = FrequencySplitEmbedding(layer.num_embeddings, layer.embedding_dim, rank, frequent,
                                     padding_idx=layer.padding_idx)
    rare_ids, tail_whitening = _rare_rows(layer.num_embeddings, frequent, whitening)
    left, right = _factors(layer.weight[rare_ids], rank, tail_whitening)
    with torch.no_grad():
        result.head.weight.copy_(layer.weight[frequent])
        result.tail.table.weight.copy_(left)
        result.tail.project.weight.copy_(right.T)
    return result.to(layer.weight.device)


def _matches(name: str, include: Sequence[str], exclude: Sequence[str]) -> bool:
    return any(fnmatch.fnmatchcase(name, p) for p in include) and not any(fnmatch.fnmatchcase(name, p) for p in exclude)


def _replace(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, new)


class _Collected(Exception):
    """Raised from a hook to end a calibration forward pass early."""


@torch.no_grad()
def collect_whitening(model: nn.Module, layers: Mapping[str, nn.Module], batches: Iterable[Any],
                      *, damping: float = 1e-2) -> dict[str, Whitening]:
    """Run ``model`` on ``batches`` (see :func:`graphopt.torch.batches.split_batch`) and
    measure, for each named layer, the :class:`Whitening` of its inputs."""
    from graphopt.torch.batches import split_batch

    moments: dict[str, torch.Tensor] = {}
    counts: dict[str, float] = {}
    # Token counts need only the lookup: when every layer is a table, stop each batch once all were seen.
    tables_only = all(isinstance(layer, nn.Embedding) for layer in layers.values())
    seen: set[str] = set()

    def hook(name: str, layer: nn.Module) -> Any:
        def record(_module: nn.Module, inputs: tuple[Any, ...]) -> None:
            x = inputs[0]
            if isinstance(layer, nn.Embedding):
                found = torch.bincount(x.reshape(-1), minlength=layer.num_embeddings).double()
                moments[name] = moments.get(name, 0) + found
                seen.add(name)
                if tables_only and len(seen) == len(layers):
                    raise _Collected
            else:
                flat = x.detach().reshape(-1, x.shape[-1]).double()
                moments[name] = moments.get(name, 0) + flat.T @ flat
                counts[name] = counts.get(name, 0) + flat.shape[0]
        return record

    handles = [layer.register_forward_pre_hook(hook(name, layer)) for name, layer in layers.items()]
    was_training = model.training
    model.eval()
    try:
        for batch in batches:
            args, kwargs, _ = split_batch(batch)
            seen.clear()
            try:
                model(*args, **kwargs)
            except _Collected:
                pass
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)
    result = {}
    for name, layer in layers.items():
        if name not in moments:
            raise UsageError(f"calibration never reached {name}")
        if isinstance(layer, nn.Embedding):
            result[name] = Whitening(rows=torch.sqrt(moments[name] + 1))
            continue
        second = moments[name] / counts[name]
        # Damping keeps the factor invertible where an input direction never varies.
        second += damping * second.diagonal().mean() * torch.eye(second.shape[0], dtype=second.dtype)
        result[name] = Whitening(cols=torch.linalg.cholesky(second))
    return result


def factorize(
    model: nn.Module,
    *,
    rank_ratio: float | None = None,
    energy: float | None = None,
    include: Sequence[str] = ("*",),
    exclude: Sequence[str] = (),
    embeddings: bool = False,
    frequent_rows: int = 0,
    calibration: Iterable[Any] | None = None,
) -> dict[str, dict[str, int]]:
    """Replace, in place, every ``nn.Linear`` whose qualified name matches ``include`` (fnmatch
    patterns) and no ``exclude`` pattern by a :class:`LowRankLinear`; with ``embeddings=True``
    matching ``nn.Embedding`` tables too. With ``calibration`` batches, the truncation
    minimizes the error on those inputs instead of on the weights (:class:`Whitening`), and
    ``energy`` is measured in that norm. With ``frequent_rows`` (needs ``calibration``) an
    embedding becomes a :class:`FrequencySplitEmbedding`: the ids seen most often keep their
    rows and the rank applies to the others. Returns {name: {rank, full_rank, params_before,
    params_after[, frequent_rows]}}."""
    targets = (nn.Linear, nn.Embedding) if embeddings else (nn.Linear,)
    chosen = [(n, m) for n, m in model.named_modules() if isinstance(m, targets) and _matches(n, include, exclude)]
    whitening = collect_whitening(model, dict(chosen), calibration) if calibration is not None and chosen else {}
    changes: dict[str, dict[str, int]] = {}
    if frequent_rows < 0:
        raise UsageError(f"frequent_rows must be >= 0, got {frequent_rows}")
    for name, layer in chosen:
        split = bool(frequent_rows) and isinstance(layer, nn.Embedding)
        frequent = most_frequent(whitening.get(name), frequent_rows) if split else None
        if frequent is not None:  # the rank is chosen, and applies, on the rows that are factorized
            rare_ids, tail_whitening = _rare_rows(layer.num_embeddings, frequent, whitening.get(name))
            singular = torch.linalg.svdvals(_whitened(layer.weight[rare_ids], tail_whitening))
        else:
            singular = torch.linalg.svdvals(_whitened(layer.weight, whitening.get(name)))
        rank = choose_rank(singular, rank_ratio=rank_ratio, energy=energy)
        if frequent is not None:
            new: nn.Module = split_embedding(layer, rank, frequent, whitening.get(name))
        else:
            factorizer = factorize_embedding if isinstance(layer, nn.Embedding) else factorize_linear
            new = factorizer(layer, rank, whitening.get(name))
        _replace(model, name, new)
        changes[name] = {"rank": rank, "full_rank": singular.numel(),
                         "params_before": sum(p.numel() for p in layer.parameters()),
                         "params_after": sum(p.numel() for p in new.parameters())}
        if frequent is not None:
            changes[name]["frequent_rows"] = frequent.numel()
    logger.info("factorized %d layers", len(changes))
    return changes
