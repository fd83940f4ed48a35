"""`graphopt optimize`: load → recipe passes → write to staging → verify → commit.

A model is only moved to its final path after onnxruntime loaded the written bytes and
its outputs met the parity budget; otherwise nothing is written.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from graphopt import __version__
from graphopt.errors import DataError, GateFailed, UnsupportedModelError
from graphopt.io import LoadedModel, load_model, staged_save
from graphopt.passes import Pipeline, PipelineResult, StepRecord
from graphopt.passes.base import PassContext
from graphopt.passes.fix_shapes import FixInputShapesPass
from graphopt.recipe import Recipe, load_recipe
from graphopt.verify.compare import compare_files, reference_outputs
from graphopt.verify.feeds import DataSource, FeedSet, input_specs, load_feeds
from graphopt.verify.gate import CheckResult, Thresholds, failures
from graphopt.verify.judge import Budget
from graphopt.verify.kinds import output_kinds, refine_kinds
from graphopt.verify.layout import is_decoder
from graphopt.verify.runtime import check_loadable, onnxruntime_version
from graphopt.verify.text import DecoderText, DecoderThresholds, judge_text, text_budget, text_tokenizer

logger = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True, kw_only=True)
class OptimizeOptions:
    recipe: str | Path = "lossless"
    data: DataSource = None  # a path or arrays (verify.feeds.load_feeds)
    calib: DataSource = None
    cache_dir: str | Path | None = None
    batch_size: int = 1
    shapes: Mapping[str, Sequence[int]] = dataclasses.field(default_factory=dict)
    thresholds: Thresholds = Thresholds()
    measure_latency: bool = True
    threads: int | None = None
    external_data: bool | None = None
    seed: int = 0
    labels: str | None = None  # an array in the .npz data that is not a model input
    exclude: tuple[str, ...] = ()  # glob patterns of nodes, op types or weights no lossy pass may touch
    fix_shapes: tuple[str, ...] = ()  # "NAME=D1,D2,..": inputs written with these static shapes
    analyze: bool = False
    text: DecoderText | None = None  # decoder LLMs: also judged as text generators on prose
    target_cpu: str | None = None  # graphopt.cpu: the CPU int8 weights must be exact on (None: this one)


@dataclasses.dataclass
class OptimizeReport:
    """What one run did, as the JSON report (``--report``) holds it: ``to_dict`` is that file's
    content, and the Python API returns it."""

    input: str
    output: str
    recipe: Recipe
    budget: Budget
    input_bytes: int
    output_bytes: int
    steps: list[StepRecord]
    verification: dict[str, Any]  # verify.compare's comparison, plus the candidate's path
    notes: list[str] = dataclasses.field(default_factory=list)
    written: bool = False
    retreats: int = 0
    seconds: float = 0.0
    cpu: str = ""  # the machine that measured, and the target int8 weights are exact on
    folder: dict[str, Any] | None = None  # a model folder's input, output and the files copied beside the model

    def to_dict(self) -> dict[str, Any]:
        return {
            "graphopt": __version__,
            "onnxruntime": onnxruntime_version(),
            "cpu": self.cpu,
            "input": self.input,
            "output": self.output,
            "recipe": {"name": self.recipe.name, "description": self.recipe.description},
            "budget": self.budget.to_dict(),
            "input_bytes": self.input_bytes,
            "output_bytes": self.output_bytes,
            "steps": [step.to_dict() for step in self.steps],
            "verification": self.verification,
            "notes": list(self.notes),
            "written": self.written,
            "retreats": self.retreats,
            "seconds": self.seconds,
            **({"folder": self.folder} if self.folder is not None else {}),
        }


# Times the final verification may send the searching passes further down their ladders.
MAX_RETREATS = 3
_PARITY_CHECKS = {"min_cosine", "min_top1", "max_abs", "no_new_nonfinite", "output_shapes", "max_ppl_ratio",
                  "min_token_agree"}


def optimize(input_path: str | os.PathLike, output_path: str | os.PathLike, options: OptimizeOptions) -> OptimizeReport:
    """Optimize ``input_path`` into ``output_path``; return the report (``to_dict`` is its JSON).

    Raises GateFailed (with ``report`` attached) when the result misses its budget; then
    nothing is written. When a pass that searched under the budget met it on its held-out
    data but the verification on ``data`` misses it, the run is repeated with those passes a
    step further down their ladders (``PassContext.retreat``), up to MAX_RETREATS times.
    """
    if Path(input_path).is_dir():
        return _optimize_folder(Path(input_path), Path(output_path), options)
    recipe = load_recipe(options.recipe)
    if recipe.fallback is not None:
        return _never_worse(input_path, output_path, options, recipe)
    return _optimize_file(input_path, output_path, options, recipe)


def _never_worse(input_path: str | os.PathLike, output_path: str | os.PathLike, options: OptimizeOptions,
                 recipe: Recipe) -> OptimizeReport:
    """A recipe that builds on a lower one (``fallback``: small on int8) is never worse than it:
    when a step of its own changed the model, the lower recipe runs too and the smaller
    verified result is written (the lower one's also when this recipe misses its budget)."""
    lower = load_recipe(recipe.fallback)
    try:
        report, failure = _optimize_file(input_path, output_path, options, recipe), None
    except GateFailed as exc:
        report, failure = None, exc
    own = {p.name for p in recipe.passes} - {p.name for p in lower.passes}
    if report is not None and not any(step.modified for step in report.steps if step.name in own):
        report.notes.append(f"{', '.join(sorted(own))} changed nothing: this is what recipe '{lower.name}' writes")
        return report
    if report is not None and (options.external_data or load_model(input_path).has_external_data):
        return report  # weights beside the model file: one file cannot be swapped for another
    spare = Path(output_path).with_name(f".{Path(output_path).name}.fallback.graphopt-tmp")
    try:
        other = _optimize_file(input_path, spare, dataclasses.replace(options, recipe=lower.name), lower)
    except GateFailed:
        if failure is not None:
            raise failure from None
        assert report is not None
        report.notes.append(f"recipe '{lower.name}' missed its own budget here: this result stands")
        return report
    if report is not None and report.output_bytes <= other.output_bytes:
        spare.unlink(missing_ok=True)
        report.notes.append(f"recipe '{lower.name}' alone: {other.output_bytes:,} bytes, not smaller than this "
                            f"result's {report.output_bytes:,}")
        return report
    os.replace(spare, output_path)
    other.output = str(Path(output_path))
    other.notes.append(
        f"recipe '{recipe.name}' missed its budget ({failure}); recipe '{lower.name}' written instead" if failure
        else f"recipe '{recipe.name}' gave {report.output_bytes:,} bytes, more than recipe '{lower.name}' alone "
             f"({other.output_bytes:,}): '{lower.name}' written instead")
    return other


def _optimize_file(input_path: str | os.PathLike, output_path: str | os.PathLike, options: OptimizeOptions,
                   recipe: Recipe) -> OptimizeReport:
    started = time.perf_counter()
    if options.fix_shapes:
        fix = FixInputShapesPass(shapes=tuple(options.fix_shapes))
        recipe = dataclasses.replace(recipe, passes=(fix, *recipe.passes))
    needing = [p.name for p in recipe.passes if p.needs_calibration()]
    if needing and options.calib is None and not recipe.text_budget:  # a text recipe has the bundled corpus
        raise DataError(f"recipe '{recipe.name}' needs calibration data for {', '.join(needing)}: give --calib DATA")
    loaded = load_model(input_path)
    specs = input_specs(loaded.model)
    text_calibration = None
    if recipe.text_budget:  # a decoder recipe: judged on text, calibrated on text
        from graphopt.samples import SENTENCES_FILE

        text, text_calibration = text_budget(
            loaded.path, is_decoder(specs), options.text, options.calib, corpus=Path(SENTENCES_FILE),
            recipe=recipe.name, size_target=options.thresholds.max_size_ratio,
            defaults=DecoderThresholds(max_ppl_ratio=recipe.max_ppl_ratio, min_token_agree=recipe.min_token_agree))
        options = dataclasses.replace(options, text=text, calib=None if text_calibration else options.calib)
    tokenizer = text_tokenizer(loaded.path, is_decoder(specs), options.text) if options.text else None
    if options.fix_shapes:  # the data must have the shapes the written model will take
        fix.validate(loaded.model)
        specs = [dataclasses.replace(s, shape=fix.fixed.get(s.name, s.shape)) for s in specs]
    calibration, feeds = _load_data(options, specs)
    logger.info("loaded %s; verifying on %s", loaded.path.name, feeds.source)
    reference = reference_outputs(loaded.path, feeds)
    # A text budget replaces the recipe's parity defaults (random decoder steps say little about
    # text); parity limits the user states still apply.
    kinds = refine_kinds(output_kinds(loaded.model), {name: array.shape for name, array in reference[0].items()})
    budget = Budget.resolve(options.thresholds, kinds,
                            defaults=None if recipe.text_budget and options.text is not None else recipe)
    logger.info("budget: %s", budget.describe())
    retreat = 0
    while True:
        model = loaded.model if retreat == 0 else load_model(input_path).model
        context = PassContext(calibration=calibration, threads=options.threads, budget=budget,
                              cache_dir=str(options.cache_dir) if options.cache_dir else None,
                              analyze=options.analyze, retreat=retreat, exclude=tuple(options.exclude),
                              text=text_calibration, target_cpu=options.target_cpu)
        pipeline = Pipeline(recipe.passes, check=check_loadable, context=context)
        try:
            result = pipeline.run(model)
        except UnsupportedModelError as exc:
            raise UnsupportedModelError(f"{loaded.path}: {exc}") from exc
        report = OptimizeReport(str(loaded.path), str(Path(output_path)), recipe, budget, loaded.file_bytes, 0,
                                result.steps, {}, retreats=retreat, cpu=_cpu(options.target_cpu))
        idle = _idle_compression(result, pipeline.passes)
        if idle:
            report.notes.append(f"{idle} changed nothing: the input is written as it is (the recipe's other steps "
                                "would only have rewritten it)")
            result = PipelineResult(result.model, result.steps, keep_input=True)
        try:
            _write_verified(report, result, loaded, output_path, feeds, reference, options, tokenizer)
        except GateFailed as exc:
            searched = any(step.modified and pass_.searches() and step.searched
                           for step, pass_ in zip(result.steps, pipeline.passes))
            # A search that already reached the end of its ladder has nowhere further down to go.
            exhausted = [f"{step.name}: {step.exhausted}" for step in result.steps if step.exhausted]
            if not searched or exhausted or retreat >= MAX_RETREATS or not set(exc.failures) <= _PARITY_CHECKS:
                report.seconds = round(time.perf_counter() - started, 3)
                message = "; ".join([str(exc), *exhausted])
                raise GateFailed(message, exc.failures, report=report.to_dict()) from None
            retreat += 1
            logger.warning("verification missed the budget (%s); searching again one step further down "
                           "(retreat %d of at most %d)", "; ".join(exc.failures), retreat, MAX_RETREATS)
            continue
        report.seconds = round(time.perf_counter() - started, 3)
        if report.output_bytes > report.input_bytes:
            report.notes.append(f"the output is {report.output_bytes / report.input_bytes:.3f}x the input's "
                                "size: no step made the model smaller")
        for note in report.notes:
            logger.warning("%s", note)
        return report


def _idle_compression(result: PipelineResult, passes: Sequence[Any]) -> str | None:
    """The compressing steps of a recipe when it has some and none of them changed the model
    (a run that quantized nothing writes the input's bytes), else None."""
    steps = [step for step, pass_ in zip(result.steps, passes) if pass_.role == "compress"]
    if not steps or any(step.modified for step in steps):
        return None
    return ", ".join(step.name for step in steps)


def _cpu(target: str | None) -> str:
    from graphopt.cpu import native_cpu, target_cpu

    here = native_cpu()
    made_for = target_cpu(target)
    form = made_for.int8_weight_form
    where = "" if made_for == here else f"; int8 weights made for {made_for.describe()}"
    return f"{here.describe()}{where}; int8 weight form {form}"


def _optimize_folder(source: Path, output: Path, options: OptimizeOptions) -> OptimizeReport:
    """A model folder (model + tokenizer + configs) → a new folder: the optimized model under the
    same name, every other file copied unchanged; renamed into place only when the model passed
    its verification."""
    import shutil

    from graphopt.io import model_file, side_files, staged_folder

    model = model_file(source)
    with staged_folder(output, (source,)) as folder:
        try:
            report = optimize(model, folder / model.name, options)
        except GateFailed as exc:  # name the folder the user asked for, not the staged file
            message = str(exc).replace(f"{model.name} not written", f"{output} not written", 1)
            raise GateFailed(message, exc.failures, report=exc.report) from None
        for path in side_files(source, model):
            shutil.copy2(path, folder / path.name)
    report.output = str(output / model.name)
    report.folder = {"input": str(source), "output": str(output),
                     "copied": [p.name for p in side_files(output, output / model.name)]}
    return report


def _load_data(options: OptimizeOptions, specs: list[Any]) -> tuple[FeedSet | None, FeedSet]:
    """(calibration feeds or None, verification feeds)."""
    extra = [options.labels] if options.labels else []
    calibration = load_feeds(options.calib, specs, batch_size=options.batch_size, extra_keys=extra) \
        if options.calib is not None else None
    if options.data is None and calibration is not None:
        # Better evidence than random inputs, but not unseen: the report says so.
        return calibration, dataclasses.replace(calibration,
                                                source=f"{calibration.source} (calibration data, not held out)")
    return calibration, load_feeds(options.data, specs, batch_size=options.batch_size, shapes=options.shapes,
                                   seed=options.seed, extra_keys=extra)


def _write_verified(report: OptimizeReport, result: PipelineResult, loaded: LoadedModel,
                    output_path: str | os.PathLike, feeds: FeedSet, reference: list[dict[str, Any]],
                    options: OptimizeOptions, tokenizer: Any = None) -> None:
    """Write ``result`` to staging, verify the written bytes, and commit only if they pass;
    ``report`` gets the verification (GateFailed when it fails: nothing is written)."""
    # A model that came with external data keeps it; otherwise external data above ~1.8 GB.
    external = True if options.external_data is None and loaded.has_external_data else options.external_data
    unchanged = loaded.path if result.keep_input or not result.modified else None
    with staged_save(result.model, output_path, external_data=external, protected=loaded.files,
                     unchanged_from=unchanged) as staged:
        size_check = []
        if report.recipe.never_larger:
            size_check.append(CheckResult("never_larger", loaded.file_bytes, staged.size_bytes(),
                                          staged.size_bytes() <= loaded.file_bytes,
                                          f"output {staged.size_bytes()} bytes vs input {loaded.file_bytes}"))
        comparison = compare_files(
            loaded.path, staged.model_path, feeds,
            thresholds=options.thresholds,
            base_bytes=loaded.file_bytes,
            candidate_bytes=staged.size_bytes(),
            measure_latency=options.measure_latency,
            threads=options.threads,
            reference=reference,
            extra_checks=size_check,
            budget=report.budget,
        )
        if options.text is not None:
            text = judge_text(loaded.path, staged.model_path, tokenizer, options.text, threads=options.threads,
                              measure_latency=options.measure_latency)
            comparison.checks += text.checks
        report.output_bytes = staged.size_bytes()
        report.verification = {**comparison.to_dict(), "candidate": str(Path(output_path))}
        if options.text is not None:
            report.verification["text"] = text.to_dict()
        failed = failures(comparison.checks)
        if failed:
            raise GateFailed(f"{Path(output_path).name} not written: " + "; ".join(f.message for f in failed),
                             [f.name for f in failed])
    report.written = True
