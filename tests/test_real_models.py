"""Real third-party models shipped in packages: the acceptance runs of the foundation."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest

from graphopt.cli import main
from tests.conftest import ppocr_det_path, run

pytestmark = pytest.mark.slow
LIGHT = Path(onnx.__file__).parent / "backend" / "test" / "data" / "light"


def test_ppocr_det_lossless_on_rendered_text(tmp_path):
    from graphopt.samples import render_text_images

    model = tmp_path / "det.onnx"
    model.write_bytes(ppocr_det_path().read_bytes())
    images = render_text_images(4, seed=3)
    np.savez(tmp_path / "images.npz", x=images)
    out, report = tmp_path / "out.onnx", tmp_path / "report.json"
    code = main(["optimize", str(model), "-o", str(out), "--recipe", "lossless", "--data",
                 str(tmp_path / "images.npz"), "--report", str(report), "--no-latency", "-q"])
    assert code == 0
    assert out.stat().st_size <= model.stat().st_size
    for image in images:
        feed = {"x": image[None]}
        np.testing.assert_allclose(run(out, feed)[0], run(model, feed)[0], atol=1e-4, rtol=0)
    steps = {s["name"]: s for s in json.loads(report.read_text())["steps"]}
    assert steps["lift-constants"]["changes"]["constants lifted"] > 100  # weights sat in Constant nodes
    assert steps["simplify"]["op_delta"]["BatchNormalization"] == -3  # folded into the convolutions


@pytest.mark.parametrize("name", ["light_squeezenet", "light_resnet50", "light_inception_v1"])
def test_old_opset_zoo_models_stay_exact(name, tmp_path, capsys):
    """IR 3 models whose weights are built at run time by ConstantOfShape: folding would
    balloon them, so simplify must step aside and the file must not grow."""
    source = LIGHT / f"{name}.onnx"
    out = tmp_path / "out.onnx"
    assert main(["optimize", str(source), "-o", str(out), "--no-latency", "-q"]) == 0
    assert out.stat().st_size <= source.stat().st_size
    x = np.random.default_rng(0).standard_normal((1, 3, 224, 224)).astype(np.float32)
    graph = onnx.load(source).graph
    name_in = next(i.name for i in graph.input if i.name not in {t.name for t in graph.initializer})
    np.testing.assert_allclose(run(out, {name_in: x})[0], run(source, {name_in: x})[0], atol=1e-5, rtol=0)


def test_dynamo_export_with_external_data(tmp_path, capsys):
    torch = pytest.importorskip("torch")
    pytest.importorskip("onnxscript")

    class Mlp(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.hidden = torch.nn.Linear(64, 256)
            self.out = torch.nn.Linear(256, 10)

        def forward(self, x):
            return self.out(torch.relu(self.hidden(x)))

    torch.manual_seed(0)
    path = tmp_path / "mlp.onnx"
    torch.onnx.export(Mlp().eval(), (torch.randn(2, 64),), str(path), dynamo=True,
                      dynamic_shapes=({0: torch.export.Dim("batch")},))
    assert (tmp_path / "mlp.onnx.data").exists()
    capsys.readouterr()

    assert main(["inspect", str(path), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    (data_file,) = info["external_data_files"]
    assert data_file["path"] == "mlp.onnx.data" and data_file["bytes"] >= (64 * 256 + 256 * 10) * 4
    assert info["inputs"][0]["shape"] == ["batch", 64]

    out = tmp_path / "opt" / "mlp.onnx"
    out.parent.mkdir()
    assert main(["optimize", str(path), "-o", str(out), "--no-latency", "-q"]) == 0
    assert sorted(p.name for p in out.parent.iterdir()) == ["mlp.onnx", "mlp.onnx.data"]
    x = np.random.default_rng(1).standard_normal((3, 64)).astype(np.float32)
    np.testing.assert_array_equal(run(out, {"x": x})[0], run(path, {"x": x})[0])


@pytest.mark.parametrize("dynamo", [False, True], ids=["torchscript", "dynamo"])
@pytest.mark.parametrize("attention", ["sdpa", "eager"])
def test_transformers_bert_attention_fuses_for_each_exporter(tmp_path, dynamo, attention):
    """A small randomly initialised transformers BERT, exported both ways with both attention
    implementations: every layer's attention becomes one MultiHeadAttention, and the outputs
    match on padded rows and on a row whose mask is all zeros."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    from graphopt.io import load_model
    from graphopt.passes import get_pass

    config = transformers.BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                     intermediate_size=64, max_position_embeddings=32,
                                     attn_implementation=attention)
    torch.manual_seed(0)
    bert = transformers.BertModel(config).eval()

    class Encoder(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.bert = bert

        def forward(self, input_ids, attention_mask):
            return self.bert(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state

    ids = torch.randint(0, 64, (2, 16))
    mask = torch.ones(2, 16, dtype=torch.int64)
    mask[1, 10:] = 0
    path = tmp_path / "bert.onnx"
    kwargs = ({"dynamic_shapes": ({0: torch.export.Dim("batch")}, {0: torch.export.Dim("batch")})} if dynamo else
              {"dynamic_axes": {"input_ids": {0: "batch"}, "attention_mask": {0: "batch"}}})
    with torch.no_grad():
        torch.onnx.export(Encoder(), (ids, mask), str(path), dynamo=dynamo, input_names=["input_ids", "attention_mask"],
                          output_names=["hidden"], **kwargs)
    result = get_pass("fuse-attention")()(load_model(path).model)  # dynamo: external data, read into memory
    assert result.modified, result.notes
    assert result.changes["attention fused"] == config.num_hidden_layers

    feeds = {"input_ids": np.random.default_rng(1).integers(0, 64, (3, 16)),
             "attention_mask": np.ones((3, 16), np.int64)}
    feeds["attention_mask"][1, 5:] = 0
    feeds["attention_mask"][2] = 0
    expected, got = run(path, feeds)[0], run(result.model, feeds)[0]
    np.testing.assert_allclose(got, expected, atol=1e-4, rtol=0)


def test_paddle_classifier_with_minus_one_batch_quantizes_on_a_stacked_npz(tmp_path, capsys, monkeypatch):
    """PP-OCR's angle classifier declares x: [-1, 3, ?, ?]: a stacked .npz of 8 rendered lines
    is 8 feeds, its [-1, 2] output is judged by top-1 agreement, and int8 writes a model."""
    from graphopt.samples import ppocr_model_path, render_text_lines

    monkeypatch.setenv("GRAPHOPT_CACHE_DIR", str(tmp_path / "cache"))
    model = tmp_path / "cls.onnx"
    model.write_bytes(ppocr_model_path("ch_ppocr_mobile_v2.0_cls_infer.onnx").read_bytes())
    np.savez(tmp_path / "calib.npz", x=render_text_lines(8, seed=5, width=192))
    np.savez(tmp_path / "eval.npz", x=render_text_lines(8, seed=6, width=192))
    assert main(["inspect", str(model)]) == 0
    assert "(class scores: judged by top-1 agreement)" in capsys.readouterr().out
    out, report = tmp_path / "out.onnx", tmp_path / "report.json"

    code = main(["optimize", str(model), "-o", str(out), "--recipe", "int8", "--calib", str(tmp_path / "calib.npz"),
                 "--data", str(tmp_path / "eval.npz"), "--report", str(report), "--no-latency", "-q"])

    assert code == 0, capsys.readouterr().err
    data = json.loads(report.read_text())
    assert data["budget"]["bounds"] == [{"metric": "top1", "limit": 0.99, "outputs": ["save_infer_model/scale_0.tmp_1"]}]
    step = next(s for s in data["steps"] if s["name"] == "quantize-int8")
    assert step["details"]["held_out_feeds"] == 2 and step["details"]["calibration_feeds"] == 6
    assert data["verification"]["parity"]["top1"] >= 0.99
    assert out.stat().st_size < 0.5 * model.stat().st_size
