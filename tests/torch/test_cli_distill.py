"""`graphopt distill CONFIG.toml`: factories from the config's folder, outputs, error paths."""

from __future__ import annotations

import json
import textwrap

import onnx
import pytest

from graphopt.cli import main

FACTORIES = '''
import torch
from torch import nn
from graphopt.torch import compress

def teacher(width=16):
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, width), nn.ReLU(), nn.Linear(width, 3)).eval()

def student(teacher_model, ratio=0.5):
    return compress(teacher_model, prune_ratio=ratio)[0]

def data():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 4, generator=g)
    y = torch.randint(0, 3, (64,), generator=g)
    return {"train": torch.utils.data.TensorDataset(x, y), "val": torch.utils.data.TensorDataset(x[:16], y[:16])}
'''

CONFIG = """
[teacher]
factory = "{module}:teacher"
args = {{ width = 16 }}

[student]
factory = "{module}:student"

[data]
factory = "{module}:data"

[distill]
epochs = 2
batch_size = 16

[export]
exporter = "torchscript"
input_names = ["x"]
output_names = ["logits"]
dynamic_axes = {{ x = {{ 0 = "N" }}, logits = {{ 0 = "N" }} }}
"""


def write_config(tmp_path, module: str, extra: str = "") -> str:
    (tmp_path / f"{module}.py").write_text(FACTORIES)
    path = tmp_path / "distill.toml"
    path.write_text(CONFIG.format(module=module) + textwrap.dedent(extra))
    return str(path)


def test_distill_writes_state_dict_onnx_and_report(tmp_path, capsys):
    config = write_config(tmp_path, "cli_factories_ok")
    assert main(["distill", config]) == 0
    out = tmp_path / "out"
    assert sorted(p.name for p in out.iterdir()) == ["student.distill.json", "student.onnx", "student.pt"]
    report = json.loads((out / "student.distill.json").read_text())
    assert report["student_params"] < report["teacher_params"]
    assert len(report["distill"]["history"]) == 2 and report["export"]["parity"]["passed"]
    graph = onnx.load(str(out / "student.onnx")).graph
    assert graph.input[0].type.tensor_type.shape.dim[0].dim_param == "N"
    assert "wrote" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ("[output]\nfolder = 'x'\n", "unknown key folder; valid keys: dir, name"),
        ("[distill]\nepoch = 2\n", None),  # a duplicate [distill] table: invalid TOML
        ("[misc]\na = 1\n", "unknown key misc"),
    ],
)
def test_bad_configs_exit_2_with_one_line(tmp_path, capsys, extra, message):
    config = write_config(tmp_path, "cli_factories_bad", extra)
    assert main(["distill", config]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("graphopt: ")
    if message:
        assert message in err
    assert not (tmp_path / "out").exists()


def test_unknown_factory_exits_2(tmp_path, capsys):
    config = tmp_path / "distill.toml"
    config.write_text(CONFIG.format(module="no_such_module_here"))
    assert main(["distill", str(config)]) == 2
    assert "cannot import no_such_module_here" in capsys.readouterr().err
