"""FFN neuron pruning of all-MiniLM-L6-v2 under a cosine budget (`prune-channels`).

The dependency analysis finds, in each of the 6 layers, the 1536 FFN neurons: a MatMul
up-projection output column + its bias entry, coupled through the exported GELU's element-wise
ops (Div, Erf, Add, Mul, Mul) to a row of the down-projection. `prune-channels` ranks them by
activation importance on calibration sentences (spread of the neuron times the norm of its
down-projection row; each removed neuron's mean goes into the down-projection bias) and
bisects the largest uniform fraction whose cosine on held-out calibration sentences (the
last 25%, not used for the statistics) keeps 40% of the budget in reserve. graphopt then verifies on unseen sentences (`--min-cosine 0.99`) and times both
models interleaved.

    python -m benchmarks.bench_prune [--quick]
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")

import numpy as np  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
WORK = REPO / "work" / "bench" / "prune"
THREADS = 2
MIN_COSINE = 0.99
FFN_NEURONS = 6 * 1536

RECIPE = """\
description = "MiniLM FFN neurons by activation importance, the largest fraction meeting the budget"

[[steps]]
pass = "prune-channels"
importance = "activation"
search = true
max_amount = 0.9
round_to = 16
scope = "global"
"""


def _data(quick: bool) -> tuple[Path, Path, Path]:
    from benchmarks import datasets

    WORK.mkdir(parents=True, exist_ok=True)
    model = WORK / "minilm.onnx"
    if not model.is_file():
        datasets.export_minilm(model, seq_len=128)
    paths = []
    for split, count in (("calib", 64 if quick else 128), ("eval", 32 if quick else 256)):
        path = WORK / f"{split}-{count}.npz"
        if not path.is_file():
            np.savez(path, **datasets.tokenize_sentences(datasets.sentences(count, split=split), seq_len=128))
        paths.append(path)
    return model, paths[0], paths[1]


def _prune(model: Path, calib: Path, evaluation: Path) -> tuple[dict, str]:
    from graphopt.errors import GateFailed
    from graphopt.optimize import OptimizeOptions, optimize
    from graphopt.verify.gate import Thresholds

    recipe = WORK / "prune-ffn.toml"
    recipe.write_text(RECIPE)
    options = OptimizeOptions(recipe=recipe, calib=calib, data=evaluation, batch_size=16, threads=THREADS,
                              thresholds=Thresholds(min_cosine=MIN_COSINE))
    try:
        return optimize(model, WORK / "minilm.pruned.onnx", options).to_dict(), "written"
    except GateFailed as exc:
        return exc.report, f"**not written**: {exc}"  # type: ignore[attr-defined]


def main(quick: bool = False) -> str:
    started = time.perf_counter()
    model, calib, evaluation = _data(quick)
    report, outcome = _prune(model, calib, evaluation)
    step = report["steps"][-1]
    details, verification = step["details"], report["verification"]
    removed = step["changes"]["channels removed"]
    latency = verification["latency"] or {}
    before, after = details["before"], details["after"]
    trials = ", ".join(f"{t['amount']:.3f} → {t['value']:.4f}{'' if t['meets'] else ' ✗'}"
                       for t in details.get("search", {}).get("trials", []))
    lines = [
        "## Pruning: MiniLM FFN neurons under a cosine budget" + (" (quick: not evidence)" if quick else ""),
        "",
        f"`prune-channels` (activation importance, mean compensation and least-squares refit, bisection) on {calib.stem} "
        f"sentences; verified on {verification['data']['samples']} unseen sentences ({evaluation.stem}), "
        f"budget mean cosine ≥ {MIN_COSINE}; {THREADS} onnxruntime threads. Result {outcome}.",
        "",
        "| measure | value |",
        "|---|---|",
        f"| FFN neurons removed | {removed} of {FFN_NEURONS} ({removed / FFN_NEURONS:.1%}) |",
        f"| parameters | {before['parameters']:,} → {after['parameters']:,} ({after['parameters'] / before['parameters']:.3f}×) |",
        f"| MACs per token (matrix products) | {before['macs']:,} → {after['macs']:,} ({after['macs'] / before['macs']:.3f}×) |",
        f"| file size ratio | {verification['size_ratio']:.3f} |",
        f"| eval cosine mean / min | {verification['parity']['cosine_mean']:.5f} / {verification['parity']['cosine_min']:.5f} |",
        f"| latency ratio (interleaved A/B) | {latency.get('ratio', float('nan')):.3f} |",
        f"| search trials (amount → calibration cosine) | {trials} |",
        f"| time | {time.perf_counter() - started:.0f} s |",
        "",
        "Without fine-tuning, FFN neurons of a sentence encoder are not redundant: the search stops "
        "where the calibration cosine would eat more than 60% of the budget.",
    ]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true")
    sys.stdout.write(main(quick=parser.parse_args().quick))
