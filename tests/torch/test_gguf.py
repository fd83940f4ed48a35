"""GGUF checkpoints of the types users bring: K-quants (Q4_K, Q5_K, Q6_K) beside the legacy block
types (Q4_0, Q4_1, Q5_0, Q8_0), through `graphopt export`.

The K-quant files are written by ``benchmarks.gguf_kquants`` (gguf-py cannot write those types);
its byte layouts are checked here against both dequantizers a GGUF is read with, gguf-py's and
transformers' own. Tolerance of the export: float32 on both sides, logits agree to ~1e-6."""

from __future__ import annotations

import json

import numpy as np
import pytest

gguf = pytest.importorskip("gguf")
pytest.importorskip("transformers")

from benchmarks import gguf_kquants  # noqa: E402
from graphopt.cli import main  # noqa: E402
from tests.conftest import TINY_GGUF_TYPES, tiny_gguf  # noqa: E402

# Largest round-trip error relative to max |w| on Gaussian rows (min–max fit, 6-bit / 8-bit
# sub-block scales): about half a step of each type's grid, with the scales' own rounding.
ROUNDTRIP_BOUND = {"Q4_K": 0.08, "Q5_K": 0.04, "Q6_K": 0.02}


@pytest.mark.parametrize("kind", sorted(gguf_kquants.ENCODERS))
def test_k_quant_bytes_read_back_the_same_through_gguf_py_and_transformers(kind):
    import torch
    from transformers.integrations.gguf import dequant

    rng = np.random.default_rng(1)
    values = (rng.standard_normal((8, 512)) * np.exp(rng.standard_normal((8, 1)))).astype(np.float32)
    values[2] += 3.0  # a row with no negative values: the min is 0, not the row's own
    values[5, :256] = 0.0  # an all-zero super-block: scales of 0, nothing divided by them
    encoded = gguf_kquants.quantize(values, kind)
    qtype = gguf.GGMLQuantizationType[kind]
    by_gguf = gguf.quants.dequantize(encoded, qtype)
    assert by_gguf.shape == values.shape
    assert np.abs(by_gguf - values).max() <= ROUNDTRIP_BOUND[kind] * np.abs(values).max()
    assert np.all(by_gguf[5, :256] == 0)
    by_transformers = dequant.dequantize(torch.from_numpy(encoded.reshape(-1)), int(qtype)).reshape(values.shape)
    np.testing.assert_array_equal(by_transformers.numpy(), by_gguf)


def test_a_k_type_needs_rows_of_a_multiple_of_256():
    with pytest.raises(ValueError, match="multiple of 256"):
        gguf_kquants.quantize(np.zeros((2, 576), np.float32), "Q4_K")


def test_a_gguf_of_k_quants_and_legacy_types_exports_with_parity(tmp_path):
    source = tiny_gguf(tmp_path / "tiny.gguf")
    reader = gguf.GGUFReader(str(source))
    assert {t.tensor_type.name for t in reader.tensors} == set(TINY_GGUF_TYPES.values()) | {"F32"}
    out = tmp_path / "onnx"
    code = main(["export", str(source), "-o", str(out), "--decode-steps", "4", "--threads", "1",
                 "--json", str(tmp_path / "export.json"), "-q"])
    assert code == 0
    parity = json.loads((tmp_path / "export.json").read_text())["parity"]
    assert parity["prefill_max_abs"] < 1e-4 and parity["decode_max_abs"] < 1e-4
    assert parity["greedy_identical"] == parity["prompts"]
    assert {"model.onnx", "tokenizer.json", "genai_config.json"} <= {p.name for p in out.iterdir()}
    assert source.read_bytes() == (tmp_path / "tiny.gguf").read_bytes()  # read, never written
