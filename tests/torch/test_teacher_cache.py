"""graphopt.torch.teacher_cache: the teacher cached once gives the same training; length buckets."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from graphopt.errors import UsageError
from graphopt.torch import CachedBatches, DistillOptions, cache_teacher, distill, validation_metrics, length_buckets


class CountingTeacher(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.body = nn.Sequential(nn.Linear(8, 16), nn.Tanh())
        self.head = nn.Linear(16, 4)
        self.calls = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        return self.head(self.body(x))


def pupil() -> nn.Module:
    torch.manual_seed(1)
    return nn.Sequential(nn.Sequential(nn.Linear(8, 16), nn.Tanh()), nn.Linear(16, 4))


def batches() -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(2)
    return [torch.randn(16, 8, generator=generator) for _ in range(6)]


OPTIONS = DistillOptions(task="embedding", loss="cosine", features={"0": "body"}, feature_weight=0.5, epochs=3,
                         lr=1e-2, patience=None, quiet=True)


def test_cached_teacher_runs_once_and_trains_exactly_as_the_live_teacher():
    teacher, data = CountingTeacher(), batches()
    cached = cache_teacher(teacher, data, features=["body"], shuffle=False)
    assert teacher.calls == len(data) and len(cached) == len(data)
    with_cache = distill(teacher, pupil(), cached, options=OPTIONS)
    assert teacher.calls == len(data)  # distill never ran it again
    live = distill(teacher, pupil(), data, options=OPTIONS)
    assert teacher.calls == len(data) * (1 + OPTIONS.epochs)
    for a, b in zip(with_cache.student.state_dict().values(), live.student.state_dict().values()):
        torch.testing.assert_close(a, b)
    assert validation_metrics(teacher, live.student, cached, OPTIONS) == pytest.approx(validation_metrics(teacher, live.student, data, OPTIONS))


def test_cached_and_live_batches_mix_in_one_epoch():
    """A fixed part cached and new inputs the teacher labels live, side by side in one iterable."""
    teacher, data = CountingTeacher(), batches()
    cached = cache_teacher(teacher, data[:3], features=["body"], shuffle=False).items
    calls = teacher.calls
    mixed = distill(teacher, pupil(), [*cached, *data[3:]], options=OPTIONS)
    assert teacher.calls - calls == 3 * OPTIONS.epochs  # only the live half ran the teacher
    live = distill(teacher, pupil(), data, options=OPTIONS)
    for a, b in zip(mixed.student.state_dict().values(), live.student.state_dict().values()):
        torch.testing.assert_close(a, b)


def test_cached_batches_are_reshuffled_every_epoch_with_the_seed():
    data = batches()

    def epochs(cached: CachedBatches) -> list[list[int]]:
        return [[next(i for i, d in enumerate(data) if d is item.batch) for item in cached] for _ in range(3)]

    orders = epochs(cache_teacher(CountingTeacher(), data, seed=4))
    assert orders == epochs(cache_teacher(CountingTeacher(), data, seed=4))
    assert len({tuple(order) for order in orders}) > 1
    assert all(sorted(order) == list(range(len(data))) for order in orders)
    assert epochs(cache_teacher(CountingTeacher(), data, shuffle=False))[0] == list(range(len(data)))


def test_a_feature_that_was_not_cached_is_named():
    teacher = CountingTeacher()
    cached = cache_teacher(teacher, batches())
    with pytest.raises(UsageError, match="'body' was not cached"):
        distill(teacher, pupil(), cached, options=OPTIONS)
    with pytest.raises(UsageError, match="no batches"):
        cache_teacher(teacher, [])
    assert isinstance(cached, CachedBatches) and not teacher.training


def test_length_buckets_group_neighbours_and_cover_every_index_once():
    lengths = np.array([5, 1, 9, 3, 3, 7, 2])
    buckets = length_buckets(lengths, 3)
    assert [b.tolist() for b in buckets] == [[1, 6, 3], [4, 0, 5], [2]]
    assert sorted(np.concatenate(buckets).tolist()) == list(range(len(lengths)))
    with pytest.raises(UsageError):
        length_buckets(lengths, 0)
