"""The Python API: one typed function per command, keyword options named like the flags.

```python
import graphopt

report = graphopt.optimize("model.onnx", "model.int8.onnx", recipe="int8", calib="calib.npz",
                           data={"x": images})          # data: a path or arrays
result = graphopt.check("model.onnx", "model.int8.onnx", data="eval.npz", min_top1=0.99)
```

Every function raises the errors of ``graphopt.errors`` (``GateFailed`` when a budget or a
threshold is missed, with the report attached as ``.report``) and never prints or exits.
Data is anything ``graphopt.verify.feeds.load_feeds`` takes: a path (``.npz``, a folder of
``.npz``, ONNX test data), a dict of input name to samples stacked on axis 0, a list of
complete feeds, or None for seeded random feeds (weak evidence).
"""

from __future__ import annotations

import os
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from graphopt.errors import GateFailed
from graphopt.verify.feeds import DataSource

PathLike = str | os.PathLike


def optimize(model: PathLike, output: PathLike, *, recipe: str | Path = "lossless", data: DataSource = None,
             calib: DataSource = None, labels: str | None = None, min_cosine: float | None = None,
             max_abs: float | None = None, min_top1: float | None = None, min_detections: float | None = None,
             det_threshold: float | None = None, max_latency_ratio: float | None = None,
             max_size_ratio: float | None = None, latency: bool = True, threads: int | None = None,
             batch_size: int = 1, shapes: Mapping[str, Sequence[int]] | None = None, seed: int = 0,
             cache_dir: PathLike | None = None, external_data: bool | None = None, exclude: Sequence[str] = (),
             fix_shapes: Mapping[str, Sequence[int]] | None = None) -> dict[str, Any]:
    """``graphopt optimize``: the report; the verified model is at ``output``. ``exclude``: glob
    patterns of node names, op types or weight names no lossy pass may touch; ``fix_shapes``:
    static shapes the written model's inputs get."""
    from graphopt.optimize import OptimizeOptions
    from graphopt.optimize import optimize as run
    from graphopt.verify.gate import Thresholds

    thresholds = Thresholds(min_cosine=min_cosine, max_abs=max_abs, min_top1=min_top1, min_detections=min_detections,
                            det_threshold=det_threshold, max_latency_ratio=max_latency_ratio,
                            max_size_ratio=max_size_ratio)
    report = run(model, output, OptimizeOptions(
        recipe=recipe, data=data, calib=calib, labels=labels, thresholds=thresholds, measure_latency=latency,
        threads=threads, batch_size=batch_size, shapes=dict(shapes or {}), seed=seed, cache_dir=cache_dir,
        external_data=external_data, exclude=tuple(exclude),
        fix_shapes=tuple(f"{name}={','.join(map(str, dims))}" for name, dims in (fix_shapes or {}).items())))
    return report.to_dict()


def check(base: PathLike, candidate: PathLike, *, data: DataSource = None, labels: str | None = None,
          min_cosine: float | None = None, max_abs: float | None = None, min_top1: float | None = None,
          min_detections: float | None = None, det_threshold: float | None = None,
          max_latency_ratio: float | None = None, max_size_ratio: float | None = None, latency: bool | None = None,
          threads: int | None = None, batch_size: int = 1, shapes: Mapping[str, Sequence[int]] | None = None,
          seed: int = 0, extra_checks: Sequence[Any] = (), provider: str | None = None) -> dict[str, Any]:
    """``graphopt check``: the comparison (``passed``, ``checks``, ``parity``, ``latency``…).
    Raises ``GateFailed`` naming every failed check, with the comparison as ``.report``."""
    from graphopt.io import load_model
    from graphopt.verify.compare import compare_files, reference_outputs
    from graphopt.verify.feeds import check_same_inputs, input_specs, load_feeds
    from graphopt.verify.gate import Thresholds
    from graphopt.verify.judge import Budget
    from graphopt.verify.kinds import output_kinds, refine_kinds

    base_model, candidate_model = load_model(base), load_model(candidate)
    specs = input_specs(base_model.model)
    check_same_inputs(specs, input_specs(candidate_model.model), Path(base).name, Path(candidate).name)
    feeds = load_feeds(data, specs, batch_size=batch_size, shapes=shapes or {}, seed=seed,
                       extra_keys=[labels] if labels else ())
    thresholds = Thresholds(min_cosine=min_cosine, max_abs=max_abs, min_top1=min_top1,
                            min_detections=min_detections, det_threshold=det_threshold,
                            max_latency_ratio=max_latency_ratio, max_size_ratio=max_size_ratio)
    reference = reference_outputs(base_model.path, feeds)
    kinds = refine_kinds(output_kinds(base_model.model), {name: array.shape for name, array in reference[0].items()})
    comparison = compare_files(
        base_model.path, candidate_model.path, feeds, thresholds=thresholds,
        base_bytes=base_model.file_bytes, candidate_bytes=candidate_model.file_bytes,
        measure_latency=thresholds.needs_latency() if latency is None else latency, threads=threads,
        extra_checks=list(extra_checks), budget=Budget.resolve(thresholds, kinds), provider=provider,
        reference=reference,
    )
    result = comparison.to_dict()
    failed = [c for c in comparison.checks if not c.passed]
    if failed:
        raise GateFailed("check failed: " + "; ".join(f"{c.name}: {c.message}" for c in failed),
                         [c.name for c in failed], report=result)
    return result


def check_decoder(base: PathLike, candidate: PathLike, *, data: PathLike, prompts: PathLike | None = None,
                  window: int = 128, windows: int = 16, new_tokens: int = 32, latency: bool | None = None,
                  threads: int | None = None, max_ppl_ratio: float | None = None,
                  min_token_agree: float | None = None, min_greedy_agree: float | None = None,
                  max_decode_ratio: float | None = None, max_prefill_ratio: float | None = None,
                  max_size_ratio: float | None = None) -> dict[str, Any]:
    """``graphopt check`` on two decoder folders (or genai-layout decoder files beside a
    tokenizer), judged as text generators on the prose in ``data`` (a ``.txt``) and the prompts
    in ``prompts`` (JSON list): perplexity ratio, token and greedy agreement, prefill and decode
    latency. Raises ``GateFailed`` naming every failed check, with the comparison as ``.report``."""
    from graphopt.verify.decoder import OrtDecoder, folder_bytes, open_folder
    from graphopt.verify.text import DecoderThresholds, compare_decoders, load_prompts, text_windows

    base_folder, candidate_folder = open_folder(base), open_folder(candidate)
    thresholds = DecoderThresholds(max_ppl_ratio=max_ppl_ratio, min_token_agree=min_token_agree,
                                   min_greedy_agree=min_greedy_agree, max_decode_ratio=max_decode_ratio,
                                   max_prefill_ratio=max_prefill_ratio, max_size_ratio=max_size_ratio)
    tokenizer = base_folder.tokenizer
    comparison = compare_decoders(
        OrtDecoder(base_folder.model, threads=threads, optimize=False),
        OrtDecoder(candidate_folder.model, threads=threads),
        tokenizer, windows=text_windows(data, tokenizer, window=window, limit=windows),
        prompts=load_prompts(prompts) if prompts else (), new_tokens=new_tokens,
        measure_latency=thresholds.needs_latency() if latency is None else latency, thresholds=thresholds,
        base_bytes=folder_bytes(base_folder), candidate_bytes=folder_bytes(candidate_folder),
        deployed_base=lambda: OrtDecoder(base_folder.model, threads=threads))
    report = {**comparison.to_dict(), "base": str(base), "candidate": str(candidate),
              "data": {"source": str(data), "synthetic": False, "samples": comparison.windows}}
    failed = [c for c in comparison.checks if not c.passed]
    if failed:
        raise GateFailed("check failed: " + "; ".join(f"{c.name}: {c.message}" for c in failed),
                         [c.name for c in failed], report=report)
    return report


def bench(model: PathLike, *, data: DataSource = None, labels: str | None = None, runs: int = 100, warmup: int = 5,
          threads: int | None = None, batch_size: int = 1, shapes: Mapping[str, Sequence[int]] | None = None,
          seed: int = 0, max_seconds: float = 30.0, provider: str | None = None) -> dict[str, Any]:
    """``graphopt bench``: median and p90 latency of ``model`` as deployed, and its peak memory."""
    from graphopt.io import load_model
    from graphopt.verify.feeds import input_specs, load_feeds
    from graphopt.verify.latency import measure, peak_memory
    from graphopt.verify.runtime import default_threads, make_session

    loaded = load_model(model)
    feeds = load_feeds(data, input_specs(loaded.model), batch_size=batch_size, shapes=shapes or {}, seed=seed,
                       extra_keys=[labels] if labels else ())
    threads = threads or default_threads()
    started = time.perf_counter()
    with peak_memory() as peak:
        session = make_session(loaded.path, optimize=True, threads=threads, provider=provider)
        stats = measure(session, feeds.feeds, warmup=warmup, runs=runs, max_seconds=max_seconds)
    return {"model": str(loaded.path), "provider": provider or "CPUExecutionProvider", "threads": threads,
            "batch_size": feeds.batch_size, "data": feeds.describe(),
            **vars(stats), "peak_rss_mib": peak(), "seconds": round(time.perf_counter() - started, 3)}


def evaluate(model: PathLike, data: PathLike, **options: Any) -> dict[str, Any]:
    """``graphopt evaluate``: ``options`` are ``graphopt.evaluate.EvaluateOptions``' fields
    (``labels``, ``holdout`` or ``folds``, ``recipe`` or ``candidate``, ``metric``…)."""
    from graphopt.evaluate import EvaluateOptions
    from graphopt.evaluate import evaluate as run

    return run(model, data, EvaluateOptions(**options)).to_dict()


def package(model: PathLike, output: PathLike, *, target: str | Path | None = None, data: DataSource = None,
            optimize_report: PathLike | None = None, max_abs: float = 1e-4, threads: int = 1, batch_size: int = 1,
            shapes: Mapping[str, Sequence[int]] | None = None, seed: int = 0) -> dict[str, Any]:
    """``graphopt package``: the manifest; the verified bundle is at ``output``."""
    from graphopt.package import PackageOptions
    from graphopt.package import package as run

    manifest = run(model, output, PackageOptions(data=data, batch_size=batch_size, shapes=dict(shapes or {}),
                                                 seed=seed, threads=threads, max_abs=max_abs, target=target,
                                                 report=optimize_report))
    return manifest.to_dict()


__all__ = ["bench", "check", "evaluate", "optimize", "package"]
