"""`graphopt.samples`: the demo's data, made the same way every time."""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("PIL")

from graphopt.samples import PPOCR_DET_INPUT, all_sentences, main  # noqa: E402


def test_rendered_lines_are_seeded_and_scaled_as_rapidocr_feeds_them(tmp_path, capsys):
    for name in ("a", "b"):
        main(["ocr-lines", "--n", "3", "--seed", "4", "--out", str(tmp_path / f"{name}.npz")])
    first, second = (np.load(tmp_path / f"{name}.npz")[PPOCR_DET_INPUT] for name in ("a", "b"))
    assert first.shape == (3, 3, 48, 320) and first.dtype == np.float32
    np.testing.assert_array_equal(first, second)
    assert -1.0 <= first.min() < first.max() <= 1.0  # (x / 255 - 0.5) / 0.5
    assert "wrote" in capsys.readouterr().out


def test_the_prose_corpus_is_frozen_text():
    sentences = all_sentences()
    assert len(sentences) > 1000 and all(s.strip() == s and s for s in sentences[:100])
