"""graphopt.torch.export: both exporter paths, dynamic axes, external data, parity refusal."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
from torch import nn

from graphopt.errors import GateFailed, GraphoptError, UsageError
from graphopt.torch import export
from tests.conftest import run


def small_cnn() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(),
                         nn.Linear(4 * 6 * 6, 3)).eval()


@pytest.mark.parametrize("exporter", ["dynamo", "torchscript"])
def test_export_matches_torch_and_keeps_batch_dynamic(tmp_path, exporter):
    model = small_cnn()
    path = tmp_path / "m.onnx"
    report = export(model, torch.randn(2, 1, 6, 6), path, exporter=exporter, input_names=["x"], output_names=["y"],
                    dynamic_axes={"x": {0: "N"}, "y": {0: "N"}}, check_inputs=[torch.randn(5, 1, 6, 6)])
    assert report["exporter"] == exporter and report["fallback_from"] == []
    assert report["parity"]["passed"] and report["parity"]["max_abs"] < 1e-5
    assert report["parity"]["inputs_checked"] == 2
    x = np.random.default_rng(0).standard_normal((7, 1, 6, 6)).astype(np.float32)
    (y,) = run(path, {"x": x})
    np.testing.assert_allclose(y, model(torch.from_numpy(x)).detach().numpy(), atol=1e-5)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx"]  # no staging folder left


class SplitLookup(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        from graphopt.torch import factorize

        torch.manual_seed(0)
        self.table, self.head = nn.Embedding(200, 16, padding_idx=0), nn.Linear(16, 3)
        factorize(self, rank_ratio=0.25, include=["table"], embeddings=True, frequent_rows=20,
                  calibration=[torch.randint(0, 60, (4, 12))])

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.head(self.table(ids)).mean(1)


@pytest.mark.parametrize("exporter", ["dynamo", "torchscript"])
def test_frequency_split_embedding_exports_with_parity(tmp_path, exporter):
    model = SplitLookup().eval()
    path = tmp_path / "m.onnx"
    report = export(model, torch.randint(0, 200, (2, 5)), path, exporter=exporter, input_names=["ids"],
                    dynamic_axes={"ids": {0: "N", 1: "L"}}, check_inputs=[torch.arange(200).reshape(4, 50)])
    assert report["exporter"] == exporter and report["parity"]["passed"] and report["parity"]["max_abs"] < 1e-5
    ids = np.arange(200, dtype=np.int64).reshape(8, 25)[::-1].copy()  # every id, frequent and rare
    (y,) = run(path, {"ids": ids})
    np.testing.assert_allclose(y, model(torch.from_numpy(ids)).detach().numpy(), atol=1e-5)


def test_dynamo_external_data_lands_beside_the_model(tmp_path):
    model = small_cnn()
    report = export(model, torch.randn(1, 1, 6, 6), tmp_path / "m.onnx", exporter="dynamo", external_data=True)
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == ["m.onnx", "m.onnx.data"], names
    assert report["bytes"] == sum(p.stat().st_size for p in tmp_path.iterdir())
    proto = onnx.load(str(tmp_path / "m.onnx"), load_external_data=False)
    assert any(t.data_location == onnx.TensorProto.EXTERNAL for t in proto.graph.initializer)


class _DataDependent(nn.Module):
    """Output shape depends on values: torch.export refuses it, TorchScript traces it."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.sum() > 0:
            return x * 2
        return x - 1


def test_auto_falls_back_to_torchscript_and_says_why(tmp_path):
    report = export(_DataDependent(), torch.ones(2, 3), tmp_path / "m.onnx", exporter="auto")
    assert report["exporter"] == "torchscript"
    assert [a["exporter"] for a in report["fallback_from"]] == ["dynamo"]
    assert report["fallback_from"][0]["error"]


def test_dynamo_only_raises_when_dynamo_cannot_export(tmp_path):
    with pytest.raises(GraphoptError, match="export failed: dynamo"):
        export(_DataDependent(), torch.ones(2, 3), tmp_path / "m.onnx", exporter="dynamo")
    assert list(tmp_path.iterdir()) == []


def test_parity_failure_writes_nothing(tmp_path):
    # Traced at a positive input, the exported graph always doubles; at a negative check input (-2)
    # torch subtracts 1 instead (-3 vs -4), so the ONNX model disagrees and must not be written.
    with pytest.raises(GateFailed, match="disagrees with torch") as info:
        export(_DataDependent(), torch.ones(2, 3), tmp_path / "m.onnx", exporter="torchscript",
               input_names=["x"], dynamic_axes={"x": {0: "N"}}, check_inputs=[-2 * torch.ones(2, 3)])
    assert info.value.report["parity"]["passed"] is False
    assert list(tmp_path.iterdir()) == []


def test_bad_arguments_are_usage_errors(tmp_path):
    with pytest.raises(UsageError, match="exporter must be one of"):
        export(small_cnn(), torch.randn(1, 1, 6, 6), tmp_path / "m.onnx", exporter="tflite")
    with pytest.raises(UsageError, match="does not exist"):
        export(small_cnn(), torch.randn(1, 1, 6, 6), tmp_path / "missing" / "m.onnx")
    with pytest.raises(UsageError, match="dynamic_shapes needs the dynamo exporter"):
        export(small_cnn(), torch.randn(1, 1, 6, 6), tmp_path / "m.onnx", exporter="torchscript",
               dynamic_shapes=({0: torch.export.Dim("N")},))


def test_check_inputs_of_another_sequence_length_are_compared_feed_by_feed(tmp_path):
    """Outputs whose size varies between the example and a check input (a longer sequence)
    used to crash the comparison, which concatenated them."""

    class Running(nn.Module):
        def __init__(self):
            super().__init__()
            self.linear = nn.Linear(8, 8)

        def forward(self, x):
            return self.linear(x).cumsum(1)

    report = export(Running().eval(), (torch.randn(2, 5, 8),), tmp_path / "m.onnx", input_names=["x"],
                    output_names=["y"], dynamic_axes={"x": {0: "b", 1: "t"}, "y": {0: "b", 1: "t"}},
                    check_inputs=[(torch.randn(3, 9, 8),)], exporter="torchscript")
    assert report["parity"]["max_abs"] < 1e-4 and report["parity"]["samples"] == 5
