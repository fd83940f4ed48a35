"""`verify.text.TextJudge`: the scores and their spread across windows, on stand-in decoders
(numpy logits, no onnxruntime) so that every number is known."""

from __future__ import annotations

import numpy as np
import pytest

from graphopt.verify.decoder import OrtDecoder
from graphopt.verify.text import TextJudge


class Fixed(OrtDecoder):
    """A 'decoder' whose logits at each position favour (the next token + shift) by ``margin``
    (an OrtDecoder in type only: no session)."""

    def __init__(self, vocab: int = 8, shift: int = 0, margin: float = 3.0) -> None:  # no super().__init__: no session
        self.vocab, self.shift, self.margin = vocab, shift, margin

    def empty_cache(self):
        return None

    def step(self, ids, cache):
        tokens = np.asarray(ids)[0]
        logits = np.zeros((1, len(tokens), self.vocab), np.float32)
        favoured = (np.roll(tokens, -1) + self.shift) % self.vocab
        logits[0, np.arange(len(tokens)), favoured] = self.margin
        return logits, cache


def test_the_reference_against_itself_has_ratio_one_full_agreement_and_no_spread():
    windows = [[1, 2, 3, 4, 5], [2, 3, 4, 5, 6], [7, 1, 2, 3, 0]]
    judge = TextJudge(Fixed(), windows)
    scores = judge.score(Fixed())
    assert scores["ppl_ratio"] == pytest.approx(1.0) and scores["token_agreement"] == 1.0
    assert scores["ppl_log_se"] == 0.0 and scores["agreement_se"] == 0.0


def test_the_spread_is_the_standard_error_of_the_per_window_scores():
    """A candidate wrong everywhere (agreement 0 in both windows: no spread), then one right on
    the first window and wrong on the second (per-window agreement 1 and 0)."""
    windows = [[1, 2, 3, 4, 5], [2, 3, 4, 5, 6]]
    judge = TextJudge(Fixed(), windows)
    wrong = judge.score(Fixed(shift=1))
    assert wrong["token_agreement"] == 0.0 and wrong["ppl_ratio"] > 1.0
    assert wrong["ppl_log_se"] == pytest.approx(0.0, abs=1e-9)  # both windows lose the same

    class Mixed(Fixed):  # right on the first window, wrong on the second
        def step(self, ids, cache):
            self.shift = 0 if np.asarray(ids)[0][0] == 1 else 1
            return super().step(ids, cache)

    scores = judge.score(Mixed())
    assert scores["token_agreement"] == 0.5
    assert scores["agreement_se"] == pytest.approx(np.std([1.0, 0.0], ddof=1) / np.sqrt(2))
    assert TextJudge(Fixed(), windows[:1]).score(Fixed())["agreement_se"] == np.inf
