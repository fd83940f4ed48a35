"""The teacher's outputs computed once, and batches of inputs of similar length.

The teacher is frozen and runs in eval mode, so on a fixed batch its output (and every feature
map ``distill`` matches) is the same in every epoch: :func:`cache_teacher` computes them once and
returns :class:`CachedBatches`, which ``distill`` and ``evaluate`` use instead of running the
teacher (about a third of a training step's cost when teacher and student are alike). The
batches stay fixed and only their order is reshuffled each epoch; to keep them cheap when inputs
vary in length, group similar lengths with :func:`length_buckets` before padding.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from graphopt.errors import UsageError
from graphopt.torch.batches import FeatureTap, first_tensor, split_batch


@dataclasses.dataclass(frozen=True)
class TeacherTargets:
    """A batch (see :func:`graphopt.torch.batches.split_batch`) with the teacher's output on it
    and the outputs of its named modules."""

    batch: Any
    output: torch.Tensor
    features: dict[str, torch.Tensor]

    def feature(self, name: str) -> torch.Tensor:
        if name not in self.features:
            raise UsageError(f"features: the teacher's {name!r} was not cached; pass it to cache_teacher(features=...)")
        return self.features[name]


class CachedBatches:
    """Re-iterable :class:`TeacherTargets`, in a new seeded order every epoch (or as given)."""

    def __init__(self, items: Sequence[TeacherTargets], *, shuffle: bool = True, seed: int = 0) -> None:
        self.items, self.shuffle = list(items), shuffle
        self._rng = np.random.default_rng(seed)

    def __len__(self) -> int:
        return len(self.items)

    def __iter__(self) -> Iterator[TeacherTargets]:
        order = self._rng.permutation(len(self.items)) if self.shuffle else range(len(self.items))
        return (self.items[i] for i in order)


@torch.no_grad()
def cache_teacher(teacher: nn.Module, batches: Iterable[Any], *, features: Iterable[str] = (),
                  shuffle: bool = True, seed: int = 0) -> CachedBatches:
    """Run ``teacher`` (in eval mode) once on every batch and keep its output and the outputs of
    the modules named in ``features`` (the teacher side of ``DistillOptions.features``)."""
    was_training = teacher.training
    teacher.eval()
    tap = FeatureTap(teacher, features)
    items = []
    try:
        for batch in batches:
            args, kwargs, _ = split_batch(batch)
            output = first_tensor(teacher(*args, **kwargs))
            items.append(TeacherTargets(batch, output, dict(tap.values)))
    finally:
        tap.close()
        teacher.train(was_training)
    if not items:
        raise UsageError("cache_teacher: no batches")
    return CachedBatches(items, shuffle=shuffle, seed=seed)


def length_buckets(lengths: Sequence[int] | np.ndarray, batch_size: int) -> list[np.ndarray]:
    """Indices of the inputs in batches of ``batch_size`` neighbours in length (stable: equal
    lengths keep their order), so padding each batch to its longest wastes little."""
    if batch_size < 1:
        raise UsageError(f"batch_size must be >= 1, got {batch_size}")
    order = np.argsort(np.asarray(lengths), kind="stable")
    return [order[start:start + batch_size] for start in range(0, len(order), batch_size)]
