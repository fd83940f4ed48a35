"""graphopt.torch.distill: losses, determinism, early stopping, features, DDP with gloo."""

from __future__ import annotations

import socket

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from graphopt.errors import UsageError
from graphopt.torch import DistillOptions, distill, validation_metrics
from graphopt.torch.batches import split_batch
from graphopt.torch.distill import output_loss, soft_target_loss


def blobs(n: int = 256, seed: int = 0) -> torch.utils.data.TensorDataset:
    generator = torch.Generator().manual_seed(seed)
    centers = torch.tensor([[2.0, 0.0], [-2.0, 0.0], [0.0, 2.5]])
    labels = torch.randint(0, 3, (n,), generator=generator)
    x = centers[labels] + 0.6 * torch.randn(n, 2, generator=generator)
    return torch.utils.data.TensorDataset(torch.cat([x, torch.randn(n, 6, generator=generator)], 1), labels)


def trained_teacher() -> nn.Module:
    torch.manual_seed(0)
    teacher = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 3))
    x, y = blobs().tensors
    optimizer = torch.optim.Adam(teacher.parameters(), lr=1e-2)
    for _ in range(200):
        optimizer.zero_grad()
        F.cross_entropy(teacher(x), y).backward()
        optimizer.step()
    return teacher.eval()


def student() -> nn.Module:
    torch.manual_seed(1)
    return nn.Sequential(nn.Linear(8, 4), nn.ReLU(), nn.Linear(4, 3))


def test_soft_loss_is_zero_for_identical_logits_and_scales_with_t_squared():
    logits = torch.randn(4, 5)
    assert soft_target_loss(logits, logits, 3.0).abs() < 1e-6
    other = torch.randn(4, 5)
    kl = F.kl_div(F.log_softmax(other / 2, -1), F.softmax(logits / 2, -1), reduction="batchmean")
    torch.testing.assert_close(soft_target_loss(other, logits, 2.0), 4 * kl)


def test_alpha_mixes_soft_and_hard_terms():
    s, t, y = torch.randn(4, 3), torch.randn(4, 3), torch.tensor([0, 1, 2, 0])
    soft, hard = soft_target_loss(s, t, 2.0), F.cross_entropy(s, y)
    got = output_loss(s, t, y, DistillOptions(alpha=0.25, temperature=2.0))
    torch.testing.assert_close(got, 0.25 * soft + 0.75 * hard)
    embedding = DistillOptions(task="embedding", loss="cosine")
    assert output_loss(t, t, None, embedding).abs() < 1e-6
    assert output_loss(t, -t, None, embedding) == pytest.approx(2.0)


def test_batches_are_split_into_inputs_and_labels():
    x, y = torch.ones(2, 3), torch.zeros(2)
    assert split_batch(x) == ((x,), {}, None)
    assert split_batch((x, y))[0] == (x,) and split_batch((x, y))[2] is y
    args, kwargs, labels = split_batch({"a": x, "labels": y})
    assert args == () and list(kwargs) == ["a"] and labels is y
    with pytest.raises(UsageError):
        split_batch("text")


def test_distilled_student_learns_the_teacher_and_runs_deterministically():
    teacher, data, val = trained_teacher(), blobs(), blobs(128, seed=1)
    options = DistillOptions(epochs=12, lr=1e-2, batch_size=32, patience=None, quiet=True, seed=3)
    before = validation_metrics(teacher, student(), val, options)
    first = distill(teacher, student(), data, val=val, options=options)
    second = distill(teacher, student(), data, val=val, options=options)
    assert first.history[-1]["val_agreement"] > before["agreement"]
    assert first.best_metric > 0.85 and first.metric == "accuracy"
    for a, b in zip(first.student.state_dict().values(), second.student.state_dict().values()):
        assert torch.equal(a, b)
    assert [h["train_loss"] for h in first.history] == [h["train_loss"] for h in second.history]


def test_the_teacher_is_left_trainable_so_a_second_student_copied_from_it_trains():
    import copy

    teacher, data = trained_teacher(), blobs()
    teacher.zero_grad(set_to_none=True)
    options = DistillOptions(epochs=1, batch_size=32, patience=None, quiet=True)
    distill(teacher, student(), data, options=options)
    assert all(p.requires_grad for p in teacher.parameters())
    second = copy.deepcopy(teacher)
    before = [p.detach().clone() for p in second.parameters()]
    distill(teacher, second, data, options=options)
    assert any(not torch.equal(a, b) for a, b in zip(before, second.parameters()))
    assert all(p.grad is None for p in teacher.parameters())


def test_early_stopping_restores_the_best_epoch():
    teacher, data, val = trained_teacher(), blobs(), blobs(64, seed=2)
    options = DistillOptions(epochs=40, lr=5e-2, batch_size=32, patience=2, quiet=True)
    result = distill(teacher, student(), data, val=val, options=options)
    assert result.stopped.startswith("early stop") and len(result.history) < 40
    assert len(result.history) - result.best_epoch == 2
    assert validation_metrics(teacher, result.student, val, options)["accuracy"] == pytest.approx(result.best_metric)


def test_embedding_task_with_intermediate_features_raises_cosine():
    torch.manual_seed(0)
    teacher = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 4)).eval()
    pupil = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 4))
    x = torch.randn(256, 8)
    options = DistillOptions(task="embedding", loss="cosine", features={"1": "1"}, feature_weight=0.5,
                             epochs=10, lr=1e-2, batch_size=32, patience=None, quiet=True)
    before = validation_metrics(teacher, pupil, [x], options)["cosine"]
    result = distill(teacher, pupil, torch.utils.data.TensorDataset(x), val=[x], options=options)
    assert result.history[-1]["val_cosine"] > max(before, 0.9)
    with pytest.raises(UsageError, match="no module 'nope'"):
        distill(teacher, pupil, [x], options=DistillOptions(task="embedding", features={"nope": "1"}, quiet=True))


def test_options_are_validated():
    with pytest.raises(UsageError, match="task"):
        DistillOptions(task="regression")
    with pytest.raises(UsageError, match="alpha"):
        DistillOptions(alpha=1.5)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_single_process_gloo_group_uses_ddp_and_matches_plain_training(monkeypatch):
    """Under torchrun the same call wraps the student in DDP and shards with a DistributedSampler;
    with one process it must learn as plain training does (the sampler's shuffle differs)."""
    import torch.distributed as dist

    teacher, data = trained_teacher(), blobs()
    options = DistillOptions(epochs=12, lr=1e-2, batch_size=32, patience=None, quiet=True, seed=5)
    plain = distill(teacher, student(), data, val=blobs(64, seed=1), options=options)
    wrapped: list[type] = []
    original = nn.parallel.DistributedDataParallel.__init__

    def spy(self, module, *args, **kwargs):
        wrapped.append(type(module))
        original(self, module, *args, **kwargs)

    monkeypatch.setattr(nn.parallel.DistributedDataParallel, "__init__", spy)
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", str(_free_port()))
    dist.init_process_group("gloo", rank=0, world_size=1)
    try:
        ddp = distill(teacher, student(), data, val=blobs(64, seed=1), options=options)
    finally:
        dist.destroy_process_group()
    assert wrapped == [nn.Sequential]
    assert not isinstance(ddp.student, nn.parallel.DistributedDataParallel)
    assert plain.best_metric > 0.85 and ddp.best_metric > 0.85
