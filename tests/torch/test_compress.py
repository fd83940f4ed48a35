"""graphopt.torch.compress: low-rank pairs, real channel removal, dropped blocks."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from graphopt.errors import UsageError
from graphopt.torch import FrequencySplitEmbedding, LowRankEmbedding, LowRankLinear, compress, drop_layers, factorize, find_chains, parameter_count
from graphopt.torch.lowrank import choose_rank


def cnn() -> nn.Sequential:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Conv2d(8, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(16 * 4 * 4, 32), nn.ReLU(), nn.Dropout(0.1), nn.Linear(32, 10),
    )
    with torch.no_grad():  # non-trivial BatchNorm statistics, so the norm is really cut
        for module in model.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.running_mean.uniform_(-1, 1)
                module.running_var.uniform_(0.5, 2)
                module.weight.uniform_(0.5, 1.5)
    return model.eval()


def test_full_rank_factorization_is_exact():
    torch.manual_seed(0)
    layer = nn.Linear(12, 7)
    model = nn.Sequential(layer)
    factorize(model, rank_ratio=1.0)
    assert isinstance(model[0], LowRankLinear) and model[0].rank == 7
    x = torch.randn(5, 12)
    torch.testing.assert_close(model(x), layer(x), atol=1e-5, rtol=1e-5)


def test_truncated_svd_is_the_best_rank_r_approximation():
    torch.manual_seed(0)
    layer = nn.Linear(16, 16, bias=False)
    model = nn.Sequential(layer)
    factorize(model, rank_ratio=0.25)
    approx = model[0][1].weight @ model[0][0].weight
    s = torch.linalg.svdvals(layer.weight.detach())
    # Eckart–Young: the Frobenius error equals the norm of the dropped singular values.
    torch.testing.assert_close(torch.linalg.norm(layer.weight - approx), torch.linalg.norm(s[4:]), atol=1e-4, rtol=1e-4)


def test_energy_picks_the_fewest_singular_values():
    s = torch.tensor([3.0, 2.0, 1.0, 0.0])  # energies 9, 4, 1 of 14
    assert choose_rank(s, rank_ratio=None, energy=0.6) == 1
    assert choose_rank(s, rank_ratio=None, energy=0.9) == 2
    assert choose_rank(s, rank_ratio=None, energy=1.0) == 3
    with pytest.raises(UsageError):
        choose_rank(s, rank_ratio=0.5, energy=0.5)


def test_calibrated_factorization_beats_plain_svd_on_its_data():
    torch.manual_seed(0)
    layer = nn.Linear(32, 32)
    scales = torch.logspace(-2, 1, 32)  # inputs use some directions far more than others
    data = [torch.randn(64, 32) * scales for _ in range(4)]
    plain, aware = nn.Sequential(layer), nn.Sequential(layer)  # factorize replaces, never edits, layer
    factorize(plain, rank_ratio=0.25)
    factorize(aware, rank_ratio=0.25, calibration=data)
    x = torch.cat(data)
    with torch.no_grad():
        err_plain = (plain(x) - layer(x)).norm()
        err_aware = (aware(x) - layer(x)).norm()
    assert err_aware < 0.7 * err_plain


def test_embedding_factorization_keeps_lookup_semantics():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Embedding(50, 8, padding_idx=0))
    original = model[0].weight.detach().clone()
    factorize(model, rank_ratio=1.0, embeddings=True)
    assert isinstance(model[0], LowRankEmbedding)
    ids = torch.tensor([[1, 2, 49]])
    torch.testing.assert_close(model(ids), original[ids], atol=1e-5, rtol=1e-5)


class Lookup(nn.Module):  # a table followed by a layer, as in a transformer's embeddings
    def __init__(self) -> None:
        super().__init__()
        self.table = nn.Embedding(50, 8, padding_idx=0)
        self.after = nn.Linear(8, 8)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.after(self.table(ids))


def test_frequent_rows_stay_exact_and_the_rest_share_the_rank():
    torch.manual_seed(0)
    model = Lookup()
    original = model.table.weight.detach().clone()
    common = torch.tensor([[3, 7, 7, 0, 3, 7, 12]])  # 7, 3, then 0 and 12 are the most frequent ids
    calls = []
    model.after.register_forward_hook(lambda *_: calls.append(1))
    report = factorize(model, rank_ratio=0.25, include=["table"], embeddings=True, frequent_rows=3,
                       calibration=[common, common])
    assert not calls  # counting tokens stops each calibration pass at the table
    table = model.table
    assert isinstance(table, FrequencySplitEmbedding) and report["table"]["frequent_rows"] == 3
    assert sorted(table.slot[:13][table.slot[:13] < 3].tolist()) == [0, 1, 2]
    ids = torch.tensor([[0, 3, 7], [7, 3, 0]])
    torch.testing.assert_close(table(ids), original[ids])  # 0 (ties: the lower id), 3 and 7 are exact
    assert table.head.padding_idx == int(table.slot[0]) and table.tail.padding_idx is None
    rare = torch.tensor([[1, 2, 49, 12]])
    assert not torch.allclose(table(rare), original[rare], atol=1e-3)  # rank 2 of 8 for the rest
    torch.testing.assert_close(table.weight[rare], table(rare))
    assert report["table"]["params_after"] == 3 * 8 + 47 * 2 + 2 * 8
    with pytest.raises(UsageError, match="calibration"):
        factorize(Lookup(), rank_ratio=0.5, include=["table"], embeddings=True, frequent_rows=3)
    with pytest.raises(UsageError, match="distinct ids"):
        FrequencySplitEmbedding(10, 4, 2, [1, 1])


def test_split_embedding_at_full_rank_is_exact_everywhere():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Embedding(50, 8))
    original = model[0].weight.detach().clone()
    factorize(model, rank_ratio=1.0, embeddings=True, frequent_rows=5, calibration=[torch.randint(0, 50, (4, 9))])
    ids = torch.arange(50)[None]
    torch.testing.assert_close(model(ids), original[ids], atol=1e-5, rtol=1e-5)


def test_include_and_exclude_choose_layers():
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 8))
    factorize(model, rank_ratio=0.5, include=["*"], exclude=["2"])
    assert isinstance(model[0], LowRankLinear) and isinstance(model[2], nn.Linear)


def test_chains_cover_conv_bn_conv_flatten_linear_and_linear_linear():
    chains = {(c.producer, c.consumer, c.norm, c.block) for c in find_chains(cnn())}
    assert chains == {("0", "3", "1", 1), ("3", "8", "4", 16), ("8", "11", None, 1)}


def test_pruning_removes_channels_and_keeps_the_strongest():
    teacher = cnn()
    with torch.no_grad():  # make channel 5 of the first conv clearly the strongest
        teacher[0].weight[5] *= 100
    student, report = compress(teacher, prune_ratio=0.5)
    assert [student[0].out_channels, student[3].out_channels, student[8].out_features] == [4, 8, 16]
    assert student[1].num_features == 4 and student[3].in_channels == 4
    assert student[8].in_features == 8 * 16 and student[11].in_features == 16
    assert report["params_after"] == parameter_count(student) < parameter_count(teacher) / 3
    kept = (student[0].weight.unsqueeze(1) == teacher[0].weight.unsqueeze(0)).flatten(2).all(-1).nonzero()[:, 1]
    assert 5 in kept.tolist()
    assert student(torch.randn(3, 1, 8, 8)).shape == (3, 10)
    assert teacher[0].out_channels == 8  # the teacher is untouched


def test_pruning_nothing_is_exact():
    teacher = cnn()
    student, _ = compress(teacher, prune_ratio=0.0)
    x = torch.randn(2, 1, 8, 8)
    torch.testing.assert_close(student(x), teacher(x))


def test_unsupported_structures_are_left_alone():
    grouped = nn.Sequential(nn.Conv2d(4, 8, 3, groups=2), nn.ReLU(), nn.Conv2d(8, 8, 1))
    assert find_chains(grouped) == []
    mixer = nn.Sequential(nn.Linear(4, 8), nn.LayerNorm(8), nn.Linear(8, 2))  # LayerNorm mixes channels
    assert find_chains(mixer) == []
    last_only = nn.Sequential(nn.Linear(4, 2))
    assert find_chains(last_only) == []


class _Tiny(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.encoder = nn.Module()
        self.encoder.layer = nn.ModuleList(nn.Linear(4, 4) for _ in range(6))

    def forward(self, x):
        for block in self.encoder.layer:
            x = block(x)
        return x


def test_drop_layers_keeps_every_other_block():
    model = _Tiny()
    kept = [model.encoder.layer[i] for i in (0, 2, 4)]
    report = drop_layers(model, keep_every=2)
    assert report["stack"] == "encoder.layer" and report["kept"] == [0, 2, 4]
    assert list(model.encoder.layer) == kept
    assert model(torch.randn(1, 4)).shape == (1, 4)
    with pytest.raises(UsageError, match="must name blocks"):
        drop_layers(_Tiny(), keep=[7])
