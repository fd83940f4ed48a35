"""`graphopt evaluate`: what compression costs on labelled data, cross-validated.

The data is split (hold-out, K-fold, stratified or cyclic K-fold). With a recipe, each fold
compresses the model calibrated — and verified — on its training part only, and both the
base and that fold's compressed model are scored on the held-out part, which no step of the
compression saw. With a candidate model, the two given models are compared fold by fold.
The result holds per-fold metrics, their mean ± std, the paired difference (candidate −
base) with a bootstrap interval, and McNemar's test for classification metrics.
"""

from __future__ import annotations

import dataclasses
import logging
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from graphopt.errors import DataError, GateFailed, GraphoptError, UsageError, reason, require_extra
from graphopt.io import load_model
from graphopt.optimize import OptimizeOptions, optimize
from graphopt.report.evaluation import Evaluation, FoldCompression, FoldResult, McNemar, SplitDescription
from graphopt.report.records import ComparisonRecord, to_record
from graphopt.verify.feeds import InputSpec, batched_feeds, check_same_inputs, input_specs, read_npz
from graphopt.verify.gate import CheckResult
from graphopt.verify.metrics import METRICS, Metric
from graphopt.verify.runtime import make_session
from graphopt.verify.statistics import FoldScores, macro_f1, mcnemar, paired_bootstrap

logger = logging.getLogger(__name__)

Split = tuple[np.ndarray, np.ndarray]  # (training indices, held-out indices)


@dataclasses.dataclass(frozen=True, kw_only=True)
class EvaluateOptions:
    """Exactly one of ``holdout`` (held-out fraction) and ``folds``; exactly one of
    ``recipe`` and ``candidate``. ``labels`` names the label array of the ``.npz``
    (not needed for ``cosine``); ``output`` the model output to score (default: the first)."""

    labels: str | None = None
    holdout: float | None = None
    folds: int | None = None
    stratified: bool = False
    cyclic: bool = False
    recipe: str | Path | None = None
    candidate: str | Path | None = None
    metric: Metric = "accuracy"
    output: str | None = None
    seed: int = 0
    batch_size: int = 64
    threads: int | None = None
    cache_dir: str | Path | None = None
    resamples: int = 2000
    confidence: float = 0.95


def check_options(options: EvaluateOptions) -> None:
    """Refuse contradictory or incomplete options before any work (UsageError)."""
    if (options.holdout is None) == (options.folds is None):
        raise UsageError("give exactly one of --holdout FRACTION and --folds K")
    if (options.recipe is None) == (options.candidate is None):
        raise UsageError("give exactly one of --recipe R (compress in each fold) and --candidate MODEL")
    if options.metric not in METRICS:
        raise UsageError(f"unknown metric '{options.metric}'; choose one of {', '.join(METRICS)}")
    if options.labels is None and options.metric != "cosine":
        raise UsageError(f"metric '{options.metric}' needs --labels KEY (only 'cosine' works without labels)")
    if options.holdout is not None and not 0 < options.holdout < 1:
        raise UsageError(f"--holdout must be a fraction between 0 and 1, got {options.holdout}")
    if options.folds is not None and options.folds < 2:
        raise UsageError(f"--folds must be at least 2, got {options.folds}")
    if options.cyclic and (options.stratified or options.holdout is not None):
        raise UsageError("--cyclic (contiguous folds in data order) goes with --folds only, not with "
                         "--stratified or --holdout")
    if options.stratified and options.labels is None:
        raise UsageError("--stratified needs --labels KEY")
    if not 0 < options.confidence < 1 or options.resamples < 1:
        raise UsageError("confidence must be in (0, 1) and resamples at least 1")


# -- data -----------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class LabelledData:
    source: Path
    inputs: dict[str, np.ndarray]  # samples on axis 0
    labels: np.ndarray | None  # int64[N]

    @property
    def samples(self) -> int:
        return int(next(iter(self.inputs.values())).shape[0])

    def subset(self, index: np.ndarray) -> dict[str, np.ndarray]:
        return {name: array[index] for name, array in self.inputs.items()}


def load_labelled(path: str | Path, specs: Sequence[InputSpec], labels_key: str | None) -> LabelledData:
    """One ``.npz`` with an array per model input and, under ``labels_key``, integer labels."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: evaluation needs one .npz file with samples stacked on axis 0")
    arrays = read_npz(path)
    if labels_key is not None and labels_key not in arrays:
        raise DataError(f"{path}: no array '{labels_key}' for --labels; it holds {', '.join(sorted(arrays))}")
    extra = [labels_key] if labels_key is not None else []
    everything = max((len(a) for a in arrays.values() if a.ndim), default=1)
    batched_feeds(arrays, specs, everything, str(path), extra)  # names, dtypes, shapes, sample counts
    inputs = {name: array for name, array in arrays.items() if name not in extra}
    samples = int(next(iter(inputs.values())).shape[0])
    labels = None
    if labels_key is not None:
        raw = arrays[labels_key]
        if not np.issubdtype(raw.dtype, np.integer) or raw.shape[:1] != (samples,) or raw.size != samples:
            raise DataError(f"{path}: labels '{labels_key}' must be integers, one per sample ({samples}); "
                            f"got {raw.dtype}{list(raw.shape)}")
        labels = raw.reshape(samples).astype(np.int64)
        if labels.min() < 0:
            raise DataError(f"{path}: labels '{labels_key}' hold a negative class {labels.min()}")
    return LabelledData(path, inputs, labels)


# -- splitting ------------------------------------------------------------------------------


def split_indices(samples: int, labels: np.ndarray | None, options: EvaluateOptions) -> list[Split]:
    """(training, held-out) index pairs, deterministic for ``options.seed``.

    Hold-out: a shuffled split (stratified: same class ratios on both sides). K-fold:
    shuffled folds; stratified: each fold keeps the class ratios; cyclic: K contiguous
    blocks in data order (for data whose order matters: time, recording session).
    """
    splitters = require_extra("sklearn.model_selection", extra="eval", purpose="graphopt evaluate")
    KFold, StratifiedKFold, train_test_split = (splitters.KFold, splitters.StratifiedKFold,  # noqa: N806
                                                splitters.train_test_split)
    index = np.arange(samples)
    strata = labels if options.stratified else None
    if strata is not None:
        _check_strata(strata, options)
    if options.holdout is not None:
        held_out = int(np.ceil(options.holdout * samples))
        if held_out < 1 or held_out >= samples:
            raise DataError(f"--holdout {options.holdout} of {samples} samples leaves an empty side")
        try:
            train, test = train_test_split(index, test_size=held_out, stratify=strata, random_state=options.seed)
        except ValueError as exc:
            raise DataError(f"cannot split {samples} samples: {exc}") from None
        return [(np.sort(train), np.sort(test))]
    assert options.folds is not None
    if options.folds > samples:
        raise DataError(f"--folds {options.folds} exceeds the {samples} samples")
    if options.cyclic:
        splitter: Any = KFold(options.folds, shuffle=False)
    elif strata is not None:
        splitter = StratifiedKFold(options.folds, shuffle=True, random_state=options.seed)
    else:
        splitter = KFold(options.folds, shuffle=True, random_state=options.seed)
    return [(train, test) for train, test in splitter.split(index, strata)]


def _check_strata(labels: np.ndarray, options: EvaluateOptions) -> None:
    classes, counts = np.unique(labels, return_counts=True)
    needed = options.folds if options.folds is not None else 2
    rare = [f"{c} ({n})" for c, n in zip(classes, counts) if n < needed]
    if rare:
        raise DataError(f"stratified split needs at least {needed} samples per class; too few: {', '.join(rare)}")


# -- running and scoring --------------------------------------------------------------------


def predict(model: Path, inputs: dict[str, np.ndarray], output: str, specs: Sequence[InputSpec], *,
            batch_size: int, threads: int | None) -> np.ndarray:
    """``output`` for every sample, in order, with optimizations on (as deployed). A model
    with a fixed batch size gets exactly that; the last batch is padded and cut back."""
    session = make_session(model, optimize=True, threads=threads)
    fixed = {s.shape[0] for s in specs if s.shape and isinstance(s.shape[0], int)}
    fixed_size = fixed.pop() if len(fixed) == 1 else None
    size = fixed_size or batch_size
    samples = int(next(iter(inputs.values())).shape[0])
    chunks = []
    for start in range(0, samples, size):
        feed = {name: array[start : start + size] for name, array in inputs.items()}
        real = len(next(iter(feed.values())))
        if real < size and fixed_size:
            feed = {name: np.concatenate([a, np.repeat(a[-1:], size - real, axis=0)]) for name, a in feed.items()}
        try:
            (values,) = session.run([output], {k: np.ascontiguousarray(v) for k, v in feed.items()})
        except Exception as exc:  # onnxruntime's errors carry the offending input in their text
            raise DataError(f"{model.name}: onnxruntime could not run it on the data: {reason(exc)}") from None
        chunks.append(values[:real])
    return np.concatenate(chunks)


def class_scores(output: np.ndarray, name: str) -> np.ndarray:
    """[N, C] class scores: the last axis, with any singleton axes between dropped."""
    if output.ndim < 2 or int(np.prod(output.shape[1:-1])) != 1 or output.shape[-1] < 2:
        raise DataError(f"output '{name}' has shape {list(output.shape)}; a classification metric needs one "
                        "score vector per sample [N, classes] (choose another with --output)")
    return output.reshape(output.shape[0], output.shape[-1])


def _correct(scores: np.ndarray, labels: np.ndarray, k: int) -> np.ndarray:
    if k == 1:
        return np.argmax(scores, axis=-1) == labels
    top = np.argpartition(-scores, k - 1, axis=-1)[:, :k]
    return np.any(top == labels[:, None], axis=-1)


def _cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Per-sample cosine as the judge takes it: on what varies where a constant region would
    inflate it (``verify.parity.signal_cosines``)."""
    from graphopt.verify.parity import signal_cosines

    return signal_cosines(a.reshape(a.shape[0], -1).astype(np.float64),
                          b.reshape(b.shape[0], -1).astype(np.float64))[0]


def _mean_score(values: np.ndarray, _labels: np.ndarray) -> np.ndarray:
    return np.mean(values, axis=-1)


def fold_scores(metric: Metric, base: np.ndarray, candidate: np.ndarray, labels: np.ndarray | None,
                output: str) -> tuple[FoldScores, tuple[np.ndarray, np.ndarray] | None]:
    """The fold's per-sample values for ``metric``, and the (base, candidate) correctness
    McNemar's test uses (None for cosine)."""
    if metric == "cosine":
        cos = _cosines(base, candidate)
        return FoldScores(np.ones_like(cos), cos, np.zeros(len(cos), np.int64), _mean_score), None
    assert labels is not None
    base_scores, cand_scores = class_scores(base, output), class_scores(candidate, output)
    classes = base_scores.shape[-1]
    if labels.max() >= classes:
        raise DataError(f"label {labels.max()} is outside output '{output}' with {classes} classes")
    k = 5 if metric == "top5" else 1
    if classes < k:
        raise DataError(f"top5 needs at least 5 classes; output '{output}' has {classes}")
    correct = (_correct(base_scores, labels, k), _correct(cand_scores, labels, k))
    if metric == "f1":
        classes_range = range(classes)
        scores = FoldScores(np.argmax(base_scores, -1), np.argmax(cand_scores, -1), labels,
                            lambda predictions, truth: macro_f1(truth, predictions, classes_range))
        return scores, correct
    return FoldScores(correct[0].astype(np.float64), correct[1].astype(np.float64), labels, _mean_score), correct


# -- the fold loop --------------------------------------------------------------------------


def evaluate(model: str | Path, data: str | Path, options: EvaluateOptions) -> Evaluation:
    """Cross-validated comparison of ``model`` with its compressed form (``options.recipe``)
    or with ``options.candidate``; ``to_dict`` of the result is documented in README (`evaluate`)."""
    check_options(options)
    base = load_model(model)
    specs = input_specs(base.model)
    candidate = load_model(options.candidate) if options.candidate is not None else None
    if candidate is not None:
        check_same_inputs(specs, input_specs(candidate.model), base.path.name, candidate.path.name)
    output = _output_name(base, options.output)
    labelled = load_labelled(data, specs, options.labels)
    splits = split_indices(labelled.samples, labelled.labels, options)
    run = dict(specs=specs, batch_size=options.batch_size, threads=options.threads)

    logger.info("scoring %s on %d samples", base.path.name, labelled.samples)
    base_out = predict(base.path, labelled.inputs, output, **run)
    cand_all = predict(candidate.path, labelled.inputs, output, **run) if candidate is not None else None
    fold_scores(options.metric, base_out, base_out, labelled.labels, output)  # bad labels fail before compressing

    folds, scores, correctness = [], [], []
    with tempfile.TemporaryDirectory(prefix="graphopt-evaluate-") as tmp:
        for number, (train, test) in enumerate(splits, start=1):
            compression = None
            if cand_all is not None:
                cand_out = cand_all[test]
            else:
                logger.info("fold %d/%d: compressing with recipe '%s' calibrated on %d training samples",
                            number, len(splits), options.recipe, len(train))
                compressed, compression = _compress_fold(base.path, labelled, train, number, Path(tmp), options)
                cand_out = predict(compressed, labelled.subset(test), output, **run)
            labels = labelled.labels[test] if labelled.labels is not None else None
            fold, correct = fold_scores(options.metric, base_out[test], cand_out, labels, output)
            result = FoldResult(fold=number, train=len(train), held_out=len(test),
                                base=float(fold.score(fold.base, fold.labels)),
                                candidate=float(fold.score(fold.candidate, fold.labels)),
                                difference=float(fold.difference()), test_indices=tuple(test.tolist()),
                                optimize=compression)
            logger.info("fold %d/%d: %s base %.4f, candidate %.4f", number, len(splits), options.metric,
                        result.base, result.candidate)
            folds.append(result)
            scores.append(fold)
            if correct is not None:
                correctness.append(correct)

    interval = paired_bootstrap(scores, resamples=options.resamples, confidence=options.confidence, seed=options.seed)
    return Evaluation(
        model=str(base.path),
        recipe=str(options.recipe) if options.recipe is not None else None,
        candidate=str(candidate.path) if candidate is not None else None,
        source=str(labelled.source), samples=labelled.samples, labels=options.labels,
        output=output,
        metric=options.metric,
        split=_split_description(options, len(splits)),
        folds=tuple(folds),
        difference=interval,
        mcnemar=(McNemar(**mcnemar(np.concatenate([c[0] for c in correctness]),
                                   np.concatenate([c[1] for c in correctness]))) if correctness else None),
    )


def cross_validated_gate(base: str | Path, candidate: str | Path, data: str | Path | None, *, folds: int | None,
                         max_drop: float | None, metric: Metric = "accuracy", labels: str | None = None,
                         seed: int = 0, batch_size: int = 1,
                         threads: int | None = None) -> tuple[list[CheckResult], Evaluation | None]:
    """The ``cv_max_drop`` check of ``graphopt check --cv K --max-drop X`` and the evaluation
    behind it: ``candidate`` against ``base`` over ``folds`` shuffled folds of ``data``. The check
    fails only when even the upper bound of the paired interval of (candidate − base) loses more
    than ``max_drop``. Without ``folds`` nothing is measured: ``([], None)``."""
    if folds is None:
        if max_drop is not None:
            raise UsageError("check: --max-drop goes with --cv K")
        return [], None
    if max_drop is None or max_drop < 0:
        raise UsageError("check: --cv needs --max-drop X (a metric drop >= 0)")
    if data is None:
        raise UsageError("check: --cv needs --data (a labelled .npz)")
    result = evaluate(base, data, EvaluateOptions(
        labels=labels, folds=folds, candidate=candidate, metric=metric, seed=seed, batch_size=batch_size,
        threads=threads,
    ))
    diff = result.difference
    message = (f"{metric} difference {diff.estimate:+.4g}, 95% CI [{diff.low:+.4g}, "
               f"{diff.high:+.4g}] over {folds} folds (fails when the upper bound < -{max_drop:g})")
    return [CheckResult("cv_max_drop", -max_drop, diff.high, diff.high >= -max_drop, message)], result


def _output_name(loaded: Any, wanted: str | None) -> str:
    names = [value.name for value in loaded.model.graph.outputs]
    if wanted is None:
        return names[0]
    if wanted not in names:
        raise DataError(f"{loaded.path.name} has no output '{wanted}'; its outputs: {', '.join(names)}")
    return wanted


def _compress_fold(model: Path, labelled: LabelledData, train: np.ndarray, number: int, folder: Path,
                   options: EvaluateOptions) -> tuple[Path, FoldCompression]:
    """Optimize ``model`` with the fold's training samples as calibration *and* verification
    data: nothing held out reaches the compression."""
    train_data = folder / f"fold{number}-train.npz"
    np.savez(train_data, **labelled.subset(train))
    output = folder / f"fold{number}.onnx"
    try:
        report = optimize(model, output, OptimizeOptions(
            recipe=options.recipe, calib=train_data, data=train_data, cache_dir=options.cache_dir,
            batch_size=options.batch_size, measure_latency=False, threads=options.threads, seed=options.seed,
        ))
    except GateFailed as exc:
        raise GateFailed(f"fold {number}: {exc}", exc.failures) from exc
    except GraphoptError as exc:
        raise type(exc)(f"fold {number}: {exc}") from exc
    parity = to_record(ComparisonRecord, report.verification).parity
    assert parity is not None  # a written model was verified
    return output, FoldCompression(input_bytes=report.input_bytes, output_bytes=report.output_bytes,
                                   calibration_samples=len(train), train_cosine_mean=parity.cosine_mean,
                                   train_max_abs=parity.max_abs)


def _split_description(options: EvaluateOptions, count: int) -> SplitDescription:
    if options.holdout is not None:
        method = "stratified hold-out" if options.stratified else "hold-out"
    elif options.cyclic:
        method = "cyclic k-fold (contiguous, data order)"
    else:
        method = "stratified k-fold" if options.stratified else "k-fold"
    return SplitDescription(method=method, folds=count, holdout=options.holdout, seed=options.seed,
                            shuffled=not options.cyclic)


__all__ = ["EvaluateOptions", "Evaluation", "FoldResult", "LabelledData", "check_options", "cross_validated_gate",
           "evaluate", "load_labelled", "predict", "split_indices"]
