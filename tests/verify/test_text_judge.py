"""`verify.text.TextJudge`: the scores, their spread across windows and the verdict under a text
budget (the protocol of `verify.judge.Verdict`), on stand-in decoders (numpy logits, no
onnxruntime) so that every number is known."""

from __future__ import annotations

import numpy as np
import pytest

from graphopt.verify.decoder import OrtDecoder
from graphopt.verify.judge import NOISE_SIGMAS
from graphopt.verify.text import DecoderThresholds, TextJudge


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
    assert scores.ppl_ratio == pytest.approx(1.0) and scores.token_agreement == 1.0
    assert scores.ppl_log_se == 0.0 and scores.agreement_se == 0.0


def test_the_spread_is_the_standard_error_of_the_per_window_scores():
    """A candidate wrong everywhere (agreement 0 in both windows: no spread), then one right on
    the first window and wrong on the second (per-window agreement 1 and 0)."""
    windows = [[1, 2, 3, 4, 5], [2, 3, 4, 5, 6]]
    judge = TextJudge(Fixed(), windows)
    wrong = judge.score(Fixed(shift=1))
    assert wrong.token_agreement == 0.0 and wrong.ppl_ratio > 1.0
    assert wrong.ppl_log_se == pytest.approx(0.0, abs=1e-9)  # both windows lose the same

    class Mixed(Fixed):  # right on the first window, wrong on the second
        def step(self, ids, cache):
            self.shift = 0 if np.asarray(ids)[0][0] == 1 else 1
            return super().step(ids, cache)

    scores = judge.score(Mixed())
    assert scores.token_agreement == 0.5
    assert scores.agreement_se == pytest.approx(np.std([1.0, 0.0], ddof=1) / np.sqrt(2))
    assert TextJudge(Fixed(), windows[:1]).score(Fixed()).agreement_se == np.inf


class Mixed(Fixed):
    """Right on windows starting with token 1, wrong (shifted by one) on the others."""

    def step(self, ids, cache):
        self.shift = 0 if np.asarray(ids)[0][0] == 1 else 1
        return super().step(ids, cache)


def test_the_verdict_is_the_worst_bound_share_with_its_noise():
    """Agreement 0.5 against a floor of 0.0 uses half the agreement budget; the perplexity ratio
    of the half-wrong candidate decides when its own budget is tighter."""
    windows = [[1, 2, 3, 4, 5], [2, 3, 4, 5, 6]]
    judge = TextJudge(Fixed(), windows, thresholds=DecoderThresholds(min_token_agree=0.0), reserve=0.5)
    verdict = judge.verdict(Mixed())
    assert verdict.bound == "min_token_agree"
    assert verdict.error == pytest.approx(0.5)
    assert verdict.noise == pytest.approx(np.std([1.0, 0.0], ddof=1) / np.sqrt(2))
    assert verdict.allowed == 0.5 and verdict.meets_budget
    assert verdict.meets_target == (0.5 + NOISE_SIGMAS * verdict.noise <= 1.0)  # 0.5 + 2 * 0.5: exactly 1
    ratio = verdict.scores.ppl_ratio
    tight = TextJudge(Fixed(), windows, thresholds=DecoderThresholds(max_ppl_ratio=1 + (ratio - 1) / 4,
                                                                     min_token_agree=0.0))
    decided = tight.verdict(Mixed())
    assert decided.bound == "max_ppl_ratio" and decided.error == pytest.approx(4.0) and not decided.meets_budget
    assert "perplexity ratio" in decided.measured() and decided.to_dict()["budget_used"] == pytest.approx(4.0)


def test_without_a_text_budget_every_candidate_meets_it_and_one_window_is_weak_evidence():
    assert TextJudge(Fixed(), [[1, 2, 3]]).verdict(Fixed(shift=1)).error == 0.0
    weak = TextJudge(Fixed(), [[1, 2, 3]], thresholds=DecoderThresholds(min_token_agree=0.5)).verdict(Fixed())
    assert weak.weak and weak.noise == 0.0 and weak.meets_target
