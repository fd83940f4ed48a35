"""Judge a decoder LLM as a text generator: the measures people judge LLMs by, against a base.

Data: prose (a ``.txt`` file) tokenized with the folder's tokenizer into non-overlapping windows
of ``window`` tokens, and prompts (a JSON list of strings) for free generation.

* **perplexity ratio**: exp of the mean next-token negative log-likelihood over every window
  position, candidate over base (1.0: as good; 1.03: 3 % more perplexed);
* **token agreement**: teacher-forced, the share of window positions whose most likely next token
  is the same in both models;
* **greedy agreement**: each prompt continued ``new_tokens`` tokens greedily by each model; the
  share of positions where the two continuations hold the same token (after a fork, positions
  rarely agree by chance);
* **prefill ms** (one window) and **decode ms/token** (one token at a time with the cache, after a
  window): measured interleaved, base and candidate alternating, ratio = median of the paired
  ratios (as ``verify.latency`` does for other models).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from graphopt.errors import DataError
from graphopt.verify.decoder import OrtDecoder
from graphopt.verify.gate import CheckResult
from graphopt.verify.judge import Verdict
from graphopt.verify.latency import DecoderLatency, interleaved_latency

logger = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True, kw_only=True)
class DecoderThresholds:
    max_ppl_ratio: float | None = None
    min_token_agree: float | None = None
    min_greedy_agree: float | None = None
    max_decode_ratio: float | None = None
    max_prefill_ratio: float | None = None
    max_size_ratio: float | None = None

    def needs_latency(self) -> bool:
        return self.max_decode_ratio is not None or self.max_prefill_ratio is not None


def text_windows(path: str | Path, tokenizer: Any, *, window: int = 128, limit: int | None = 16,
                 skip: int = 0) -> list[list[int]]:
    """Non-overlapping windows of ``window`` token ids from the prose in ``path`` (a
    tokenizers.Tokenizer), after the first ``skip`` windows."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"{path}: cannot read text: {exc}") from None
    ids = tokenizer.encode(text).ids
    windows = [ids[start:start + window] for start in range(0, len(ids) - window + 1, window)][skip:]
    if not windows:
        raise DataError(f"{path}: {len(ids)} tokens, fewer than {skip + 1} window{'s' if skip else ''} of {window}")
    return windows[:limit] if limit else windows


def load_prompts(path: str | Path) -> list[str]:
    path = Path(path)
    try:
        prompts = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise DataError(f"{path}: cannot read prompts: {exc}") from None
    if not isinstance(prompts, list) or not prompts or not all(isinstance(p, str) and p for p in prompts):
        raise DataError(f"{path}: prompts must be a JSON list of non-empty strings")
    return prompts


def _log_softmax(logits: np.ndarray) -> np.ndarray:
    logits = logits.astype(np.float64)
    shifted = logits - logits.max(axis=-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))


def window_scores(decoder: OrtDecoder, windows: Sequence[Sequence[int]]) -> tuple[np.ndarray, list[np.ndarray]]:
    """(the next-token NLL of every position of each window, concatenated; the argmax next token
    of each window's positions)."""
    nll, predictions = [], []
    for tokens in windows:
        logits, _ = decoder.step(np.asarray([list(tokens)], np.int64), decoder.empty_cache())
        logprobs = _log_softmax(logits[0, :-1])
        targets = np.asarray(tokens[1:])
        nll.append(-logprobs[np.arange(len(targets)), targets].astype(np.float64))
        predictions.append(np.argmax(logits[0, :-1], axis=-1))
    return np.concatenate(nll), predictions


@dataclasses.dataclass(frozen=True)
class TextCalibration:
    """Calibration text for a decoder: windows whose activations a pass measures, windows set
    aside to judge its trials on, and the budget those trials must meet."""

    windows: tuple[tuple[int, ...], ...]
    judge_windows: tuple[tuple[int, ...], ...]
    thresholds: DecoderThresholds
    source: str = ""

    def feeds(self, model: OrtDecoder | bytes | str | Path, *, threads: int | None = None,
              held_out: bool = False) -> Iterator[dict[str, np.ndarray]]:
        """The model's inputs for a prefill of each calibration window (``held_out``: of each
        window set aside for judging)."""
        decoder = model if isinstance(model, OrtDecoder) else OrtDecoder(model, threads=threads)
        for window in self.judge_windows if held_out else self.windows:
            yield decoder.feed(np.asarray([list(window)], np.int64), decoder.empty_cache())


@dataclasses.dataclass(frozen=True)
class TextScores:
    """A candidate's scores on the judging windows, against the reference scored once."""

    perplexity: float
    ppl_ratio: float  # candidate over reference
    token_agreement: float  # teacher-forced next-token agreement
    ppl_log_se: float  # standard error of the log ratio across windows (inf: one window)
    agreement_se: float  # standard error of the agreement across windows

    def to_dict(self) -> dict[str, float]:
        return dataclasses.asdict(self)


@dataclasses.dataclass(frozen=True, kw_only=True)
class TextVerdict(Verdict):
    """A text judge's verdict (``verify.judge.Verdict``): the scores and the bound that decided."""

    scores: TextScores
    bound: str | None  # "max_ppl_ratio" or "min_token_agree"; None without a text budget

    def measured(self) -> str:
        return f"perplexity ratio {self.scores.ppl_ratio:.4f}, token agreement {self.scores.token_agreement:.4f}"

    def to_dict(self) -> dict[str, Any]:
        return {**super().to_dict(), "bound": self.bound, **self.scores.to_dict()}


class TextJudge:
    """Perplexity ratio and teacher-forced agreement of candidates against one reference, on
    the same windows (the reference scored once); under ``thresholds``, a ``TextVerdict`` with
    the share of the budget used and its noise, as ``verify.judge.Judge`` gives on tensors.
    Models are OrtDecoders or model paths/bytes."""

    def __init__(self, reference: OrtDecoder | bytes | str | Path, windows: Sequence[Sequence[int]], *,
                 thresholds: DecoderThresholds | None = None, share: float = 1.0, reserve: float = 0.5,
                 threads: int | None = None) -> None:
        self.windows, self.threads = windows, threads
        self.thresholds = thresholds or DecoderThresholds()
        self.allowed = share * (1.0 - reserve)
        self.token_nll, self.predictions = window_scores(self._decoder(reference), windows)
        self.nll = float(self.token_nll.mean())

    @property
    def perplexity(self) -> float:
        return float(np.exp(self.nll))

    def score(self, candidate: OrtDecoder | bytes | str | Path) -> TextScores:
        """Perplexity, its ratio to the reference's, teacher-forced agreement; and the standard
        error of the log ratio and of the agreement across windows (how far another sample of
        this text could move them)."""
        token_nll, predictions = window_scores(self._decoder(candidate), self.windows)
        agree = [a == b for a, b in zip(self.predictions, predictions)]
        ends = np.cumsum([len(a) for a in agree])[:-1]

        def standard_error(per_window: list[float]) -> float:
            return float(np.std(per_window, ddof=1) / np.sqrt(len(per_window))) if len(per_window) > 1 else np.inf

        nll = float(token_nll.mean())
        return TextScores(perplexity=float(np.exp(nll)), ppl_ratio=float(np.exp(nll - self.nll)),
                          token_agreement=float(np.concatenate(agree).mean()),
                          ppl_log_se=standard_error([d.mean() for d in np.split(token_nll - self.token_nll, ends)]),
                          agreement_se=standard_error([a.mean() for a in agree]))

    def verdict(self, candidate: OrtDecoder | bytes | str | Path) -> TextVerdict:
        """The candidate against the text budget: each bound's share used — ``(ratio - 1) /
        (max_ppl_ratio - 1)``, ``(1 - agreement) / (1 - min_token_agree)`` — the worst deciding,
        with its standard error across windows as the noise."""
        scores = self.score(candidate)
        limits = self.thresholds
        shares: list[tuple[float, float, str]] = []
        if limits.max_ppl_ratio is not None:
            allowance = limits.max_ppl_ratio - 1.0
            shares.append((_share(max(0.0, scores.ppl_ratio - 1.0), allowance),
                           _share(scores.ppl_ratio * scores.ppl_log_se, allowance), "max_ppl_ratio"))
        if limits.min_token_agree is not None:
            allowance = 1.0 - limits.min_token_agree
            shares.append((_share(1.0 - scores.token_agreement, allowance),
                           _share(scores.agreement_se, allowance), "min_token_agree"))
        error, noise, bound = max(shares, default=(0.0, 0.0, None))
        weak = len(self.windows) < 2  # no spread to tell the noise by
        return TextVerdict(error=error, noise=0.0 if weak else noise, allowed=self.allowed, weak=weak,
                           scores=scores, bound=bound)

    def _decoder(self, model: OrtDecoder | bytes | str | Path) -> OrtDecoder:
        return model if isinstance(model, OrtDecoder) else OrtDecoder(model, threads=self.threads)


def _share(amount: float, allowance: float) -> float:
    """``amount`` as a share of ``allowance`` (a zero allowance: 0 when nothing is used, else inf;
    a negative one, a limit nothing can meet: inf)."""
    if allowance > 0:
        return amount / allowance
    return 0.0 if allowance == 0 and amount <= 0 else math.inf


@dataclasses.dataclass(frozen=True)
class GreedyContinuation:
    """One prompt continued greedily by both models."""

    prompt: str
    agree: float  # share of the new tokens that are the same, position by position
    fork_at: int | None  # the first position where they differ (None: identical)
    base: str
    candidate: str


@dataclasses.dataclass
class DecoderComparison:
    """Two decoders judged as text generators, and the gate checks of the stated thresholds;
    ``to_dict`` is the report's ``text`` section."""

    windows: int
    window_tokens: int
    base_perplexity: float
    scores: TextScores
    new_tokens: int
    continuations: list[GreedyContinuation]
    latency: DecoderLatency | None = None  # when timed
    size_ratio: float | None = None
    checks: list[CheckResult] = dataclasses.field(default_factory=list)

    @property
    def greedy_agreement(self) -> float | None:
        return float(np.mean([c.agree for c in self.continuations])) if self.continuations else None

    @property
    def passed(self) -> bool:
        return all(check.passed for check in self.checks)

    def to_dict(self) -> dict[str, Any]:
        result: dict[str, Any] = {
            "windows": self.windows, "window_tokens": self.window_tokens,
            "perplexity": {"base": self.base_perplexity, "candidate": self.scores.perplexity,
                           "ratio": self.scores.ppl_ratio},
            "token_agreement": self.scores.token_agreement,
            "greedy": {"prompts": len(self.continuations), "new_tokens": self.new_tokens,
                       "agreement": self.greedy_agreement,
                       "identical": sum(c.fork_at is None for c in self.continuations),
                       "continuations": [dataclasses.asdict(c) for c in self.continuations]},
        }
        if self.latency is not None:
            result["latency"] = self.latency.to_dict()
        if self.size_ratio is not None:
            result["size_ratio"] = self.size_ratio
        result["checks"] = [check.to_dict() for check in self.checks]
        result["passed"] = self.passed
        return result


def compare_decoders(base: OrtDecoder, candidate: OrtDecoder, tokenizer: Any, *, windows: Sequence[Sequence[int]],
                     prompts: Sequence[str] = (), new_tokens: int = 32, measure_latency: bool = True,
                     thresholds: DecoderThresholds = DecoderThresholds(), base_bytes: int | None = None,
                     candidate_bytes: int | None = None, deployed_base: Callable[[], OrtDecoder] | None = None,
                     ) -> DecoderComparison:
    """The decoder comparison and its gate checks (only stated thresholds are checked). ``base``
    is the reference (optimizations off, as every reference here); latency is timed against the
    base as deployed, ``deployed_base()`` (default: ``base`` itself), opened only when timed."""
    judge = TextJudge(base, windows)
    continuations = []
    for text in prompts:
        ids = tokenizer.encode(text).ids
        a, b = list(base.greedy(ids, new_tokens)), list(candidate.greedy(ids, new_tokens))
        fork = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), None)
        continuations.append(GreedyContinuation(text, sum(x == y for x, y in zip(a, b)) / new_tokens, fork,
                                                tokenizer.decode(a), tokenizer.decode(b)))
    comparison = DecoderComparison(windows=len(windows), window_tokens=len(windows[0]),
                                   base_perplexity=judge.perplexity, scores=judge.score(candidate),
                                   new_tokens=new_tokens, continuations=continuations)
    if measure_latency or thresholds.needs_latency():
        comparison.latency = interleaved_latency(deployed_base() if deployed_base else base, candidate, windows[0])
    if base_bytes and candidate_bytes:
        comparison.size_ratio = candidate_bytes / base_bytes
    comparison.checks = decoder_checks(comparison, thresholds)
    return comparison


def decoder_checks(comparison: DecoderComparison, thresholds: DecoderThresholds) -> list[CheckResult]:
    latency = comparison.latency
    measured = {
        "max_ppl_ratio": (comparison.scores.ppl_ratio, "perplexity ratio"),
        "min_token_agree": (comparison.scores.token_agreement, "teacher-forced next-token agreement"),
        "min_greedy_agree": (comparison.greedy_agreement, "greedy continuation agreement"),
        "max_decode_ratio": (latency.decode_ratio if latency else None, "decode ms/token ratio"),
        "max_prefill_ratio": (latency.prefill_ratio if latency else None, "prefill ms ratio"),
        "max_size_ratio": (comparison.size_ratio, "size ratio"),
    }
    checks = []
    for name, (value, what) in measured.items():
        limit = getattr(thresholds, name)
        if limit is None:
            continue
        passed = value is not None and (value <= limit if name.startswith("max_") else value >= limit)
        bound = "at most" if name.startswith("max_") else "at least"
        shown = "not measured" if value is None else f"{value:.4g}"
        checks.append(CheckResult(name, limit, value, passed, f"{what} {shown} ({bound} {limit:g})"))
    return checks


# -- a decoder judged on text by `optimize` ------------------------------------------------------


@dataclasses.dataclass(frozen=True, kw_only=True)
class DecoderText:
    """How a decoder LLM is judged as a text generator besides the parity of its logits: on the
    prose in ``data`` (a .txt) with the tokenizer of the model's folder."""

    data: str | Path
    prompts: str | Path | None = None
    window: int = 128
    windows: int = 16
    new_tokens: int = 32
    thresholds: DecoderThresholds | None = None
    skip: int = 0  # windows at the start of ``data`` not judged on (the calibration took them)


# Calibration text of a decoder (``--calib PROSE.txt``, else the bundled corpus): windows whose
# activations passes measure, then windows their searches judge trials on.
CALIBRATION_WINDOWS = 16
SEARCH_WINDOWS = 16


def text_budget(model_path: Path, is_decoder: bool, text: DecoderText | None, calib: Any, *,
                defaults: DecoderThresholds, corpus: Path, recipe: str, size_target: float | None = None
                ) -> tuple[DecoderText | None, TextCalibration | None]:
    """A recipe with a text budget (``defaults``): the verification text (the user's ``text``,
    else ``corpus`` after the calibration windows) with the budget filled in, and the
    calibration text its passes get (``calib``, a .txt, else ``corpus``'s first windows). Without
    a tokenizer beside the model: (``text``, None), judged by the recipe's logit parity.

    A ``size_target`` (the output's size over the input's), or else a decode-speed bound in
    ``text`` (``max_decode_ratio``), with no perplexity or agreement bound stated asks for the most
    faithful model within it: the recipe's text budget is not applied, and the passes' searches
    read the target from the calibration's thresholds."""
    from graphopt.verify.decoder import open_folder

    if not is_decoder:
        raise DataError(f"{model_path}: recipe '{recipe}' is for decoder LLMs with a KV cache (its budget is "
                        "judged on text); this model is not one: use --recipe int8 or a recipe of your own")
    if not (model_path.parent / "tokenizer.json").is_file() and text is None:
        logger.warning("%s: no tokenizer.json beside the model, so no text to judge it on: judged by the "
                       "recipe's logit parity on random decoder steps instead (weak evidence), no search", model_path)
        return text, None
    calib_path = calib if isinstance(calib, (str, Path)) and str(calib).endswith(".txt") else None
    if calib is not None and calib_path is None:
        raise DataError(f"{calib}: a decoder is calibrated on prose: give --calib PROSE.txt")
    text = text or DecoderText(data=corpus)
    stated = text.thresholds or DecoderThresholds()
    if stated.max_ppl_ratio is None and stated.min_token_agree is None and size_target is not None:
        defaults = DecoderThresholds()  # the most faithful model within the size, not a fixed budget
        logger.info("size target %.3g: the most faithful model within it, judged on text", size_target)
    elif stated.max_ppl_ratio is None and stated.min_token_agree is None and stated.max_decode_ratio is not None:
        defaults = DecoderThresholds()  # likewise within a decode speed
        logger.info("decode target %.3g: the most faithful model decoding within it, judged on text",
                    stated.max_decode_ratio)
    thresholds = dataclasses.replace(
        stated, max_ppl_ratio=stated.max_ppl_ratio if stated.max_ppl_ratio is not None else defaults.max_ppl_ratio,
        min_token_agree=stated.min_token_agree if stated.min_token_agree is not None else defaults.min_token_agree)
    tokenizer = open_folder(model_path.parent).tokenizer
    source = Path(calib_path or corpus)
    wanted = CALIBRATION_WINDOWS + SEARCH_WINDOWS
    windows = text_windows(source, tokenizer, window=text.window, limit=wanted)
    if len(windows) < wanted:
        raise DataError(f"{source}: {len(windows)} windows of {text.window} tokens; calibration needs {wanted}")
    if Path(text.data).resolve() == source.resolve():  # never judge on the windows it was calibrated on
        text = dataclasses.replace(text, skip=len(windows))
    calibration = TextCalibration(tuple(map(tuple, windows[:CALIBRATION_WINDOWS])),
                                  tuple(map(tuple, windows[CALIBRATION_WINDOWS:])), thresholds, str(source))
    logger.info("calibration text: %s (%d windows); judged on %s", source.name, len(windows), Path(text.data).name)
    calibration = dataclasses.replace(calibration, thresholds=dataclasses.replace(thresholds,
                                                                                  max_size_ratio=size_target))
    return dataclasses.replace(text, thresholds=thresholds), calibration


def text_tokenizer(model_path: Path, is_decoder: bool, text: DecoderText) -> Any:
    """The tokenizer of the decoder's folder; refused before any work when there is none or the
    model is not a decoder with a KV cache."""
    from graphopt.verify.decoder import open_folder

    if not is_decoder:
        raise DataError(f"{text.data}: text data is for decoder LLMs with a KV cache; {model_path} is not one")
    return open_folder(model_path.parent).tokenizer


def judge_text(base: Path, candidate: Path, tokenizer: Any, text: DecoderText, *, threads: int | None,
               measure_latency: bool) -> DecoderComparison:
    """The written candidate against its base, as text generators on ``text``."""
    logger.info("judging it as a text generator on %s", text.data)
    return compare_decoders(
        OrtDecoder(base, threads=threads, optimize=False), OrtDecoder(candidate, threads=threads),
        tokenizer, windows=text_windows(text.data, tokenizer, window=text.window, limit=text.windows, skip=text.skip),
        prompts=load_prompts(text.prompts) if text.prompts else (), new_tokens=text.new_tokens,
        measure_latency=measure_latency, thresholds=text.thresholds or DecoderThresholds(),
        deployed_base=lambda: OrtDecoder(base, threads=threads))
