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
from graphopt.errors import GateFailed
from graphopt.io import load_model, staged_save
from graphopt.passes import Pipeline
from graphopt.passes.base import PassContext
from graphopt.recipe import Recipe, load_recipe
from graphopt.verify.compare import compare_files, reference_outputs
from graphopt.verify.feeds import input_specs, load_feeds
from graphopt.verify.gate import CheckResult, Thresholds, failures
from graphopt.verify.runtime import check_loadable, onnxruntime_version

logger = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True, kw_only=True)
class OptimizeOptions:
    recipe: str | Path = "lossless"
    data: str | Path | None = None
    calib: str | Path | None = None
    cache_dir: str | Path | None = None
    batch_size: int = 1
    shapes: Mapping[str, Sequence[int]] = dataclasses.field(default_factory=dict)
    thresholds: Thresholds = Thresholds()
    measure_latency: bool = True
    threads: int | None = None
    external_data: bool | None = None
    seed: int = 0
    progress: bool = False
    analyze: bool = False


def _budget(recipe: Recipe, user: Thresholds) -> Thresholds:
    """The user's thresholds; where the user stated none, the recipe's defaults."""
    return dataclasses.replace(
        user,
        max_abs=user.max_abs if user.max_abs is not None else recipe.max_abs,
        min_cosine=user.min_cosine if user.min_cosine is not None else recipe.min_cosine,
    )


def optimize(input_path: str | os.PathLike, output_path: str | os.PathLike, options: OptimizeOptions) -> dict[str, Any]:
    """Optimize ``input_path`` into ``output_path``; return the report.

    Raises GateFailed (with ``report`` attached) when the result misses its budget; then
    nothing is written.
    """
    started = time.perf_counter()
    recipe = load_recipe(options.recipe)
    loaded = load_model(input_path)
    specs = input_specs(loaded.model)
    calibration = load_feeds(options.calib, specs, batch_size=options.batch_size) if options.calib else None
    if options.data is None and calibration is not None:
        # Better evidence than random inputs, but not unseen: the report says so.
        feeds = dataclasses.replace(calibration, source=f"{calibration.source} (calibration data, not held out)")
    else:
        feeds = load_feeds(options.data, specs, batch_size=options.batch_size, shapes=options.shapes, seed=options.seed)
    logger.info("loaded %s; verifying on %s", loaded.path.name, feeds.source)
    reference = reference_outputs(loaded.path, feeds)

    thresholds = _budget(recipe, options.thresholds)
    context = PassContext(calibration=calibration, threads=options.threads, budget=thresholds,
                          cache_dir=str(options.cache_dir) if options.cache_dir else None,
                          progress=options.progress, analyze=options.analyze)
    result = Pipeline(recipe.passes, check=check_loadable, context=context).run(loaded.model)
    # A model that came with external data keeps it; otherwise external data above ~1.8 GB.
    external = True if options.external_data is None and loaded.has_external_data else options.external_data
    with staged_save(result.model, output_path, external_data=external, protected=loaded.files) as staged:
        size_check = []
        if recipe.never_larger:
            size_check.append(CheckResult("never_larger", loaded.file_bytes, staged.size_bytes(),
                                          staged.size_bytes() <= loaded.file_bytes,
                                          f"output {staged.size_bytes()} bytes vs input {loaded.file_bytes}"))
        comparison = compare_files(
            loaded.path, staged.model_path, feeds,
            thresholds=thresholds,
            base_bytes=loaded.file_bytes,
            candidate_bytes=staged.size_bytes(),
            measure_latency=options.measure_latency,
            threads=options.threads,
            reference=reference,
            extra_checks=size_check,
        )
        report = {
            "graphopt": __version__,
            "onnxruntime": onnxruntime_version(),
            "input": str(loaded.path),
            "output": str(Path(output_path)),
            "recipe": {"name": recipe.name, "description": recipe.description},
            "input_bytes": loaded.file_bytes,
            "output_bytes": staged.size_bytes(),
            "steps": [step.to_dict() for step in result.steps],
            "verification": comparison.to_dict(),
            "written": False,
        }
        failed = failures(comparison.checks)
        if failed:
            report["seconds"] = round(time.perf_counter() - started, 3)
            error = GateFailed(
                f"{Path(output_path).name} not written: " + "; ".join(f.message for f in failed),
                [f.name for f in failed],
            )
            error.report = report  # type: ignore[attr-defined]
            raise error
    report["written"] = True
    report["seconds"] = round(time.perf_counter() - started, 3)
    return report
