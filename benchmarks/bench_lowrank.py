"""Issue #6: low-rank factorization on MiniLM — size versus cosine, plain and activation-aware SVD.

Each row factorizes one part of all-MiniLM-L6-v2 at one rank ratio (rank = ratio · min(k, n)),
with the plain SVD (weight error) or the activation-aware one (output error on the
calibration sentences: input covariance for the encoder's MatMuls, token frequency for the
word-embedding table). Size × is the fp32 file after factorization over the fp32 original;
cosine is per sentence against fp32 run with optimizations off, on unseen sentences. The full
run adds the ``small`` recipe (lowrank under the parity budget + quantize-int8) as deployed.

``python -m benchmarks.bench_lowrank [--quick]`` prints the section; ``benchmarks.run`` collects it.
"""

from __future__ import annotations

import argparse
import dataclasses
import tempfile
from pathlib import Path

from benchmarks.common import (
    QUICK_EVAL,
    THREADS,
    Workload,
    deployed_session,
    markdown_table,
    minilm_workload,
    model_bytes,
    reference_outputs,
)

WORD_EMBEDDING = "/bert/embeddings/word_embeddings/Gather"
PARTS = {
    "encoder MatMuls (36)": {"ops": ("MatMul",)},
    "word-embedding table": {"ops": (), "embeddings": True, "nodes": (WORD_EMBEDDING,)},
}
FULL_RATIOS = {"encoder MatMuls (36)": (0.375, 0.25, 0.125), "word-embedding table": (0.75, 0.5, 0.375)}
QUICK_RATIOS = {"encoder MatMuls (36)": (0.25,), "word-embedding table": (0.5,)}
MODES = {"plain": "off", "activation-aware": "covariance"}
SMALL_MIN_COSINE = 0.98


@dataclasses.dataclass
class Row:
    part: str
    ratio: float | str
    mode: str
    params_removed: int
    size_ratio: float
    cosine_mean: float
    cosine_min: float
    latency_ratio: float | None = None


def _factorized(work: Workload, folder: Path, part: str, ratio: float, mode: str) -> tuple[Path, int]:
    import onnx_ir as ir

    import graphopt
    from graphopt.passes import get_pass
    from graphopt.passes.base import PassContext
    from graphopt.verify.feeds import FeedSet

    model = graphopt.load_model(work.model).model
    pass_ = get_pass("lowrank")(select="ratio", ratio=ratio, activation_aware=MODES[mode], min_saving=0.0,
                                **PARTS[part])
    result = pass_(model, PassContext(calibration=FeedSet(work.calib, "calibration", False), threads=THREADS))
    path = folder / f"{part.split()[0]}-{ratio}-{mode}.onnx"
    ir.save(model, path)
    return path, result.changes.get("parameters removed", 0)


def _score(work: Workload, path: Path, reference: list) -> tuple[float, float]:
    from graphopt.verify.parity import compare_outputs, run_outputs

    parity = compare_outputs(reference, run_outputs(deployed_session(path), work.eval))
    return parity.cosine_mean, parity.cosine_min


def _small_recipe(work: Workload, folder: Path, reference: list) -> Row:
    from graphopt.optimize import OptimizeOptions, optimize
    from graphopt.verify.gate import Thresholds
    from graphopt.verify.latency import compare_interleaved

    path = folder / "minilm.small.onnx"
    report = optimize(work.model, path, OptimizeOptions(recipe="small", calib=work.calib_npz, data=work.eval_npz,
                                                        thresholds=Thresholds(min_cosine=SMALL_MIN_COSINE),
                                                        measure_latency=False, threads=THREADS))
    lowrank = next(step for step in report.steps if step.name == "lowrank")
    cosine_mean, cosine_min = _score(work, path, reference)
    ab = compare_interleaved(deployed_session(work.model), deployed_session(path), work.eval, threads=THREADS,
                             rounds=30, max_seconds=120.0)
    return Row("`small` recipe (lowrank parity + int8)", f"params {lowrank.details.get('params', 1.0):.3f}",
               "activation-aware", lowrank.changes.get("parameters removed", 0),
               model_bytes(path) / model_bytes(work.model), cosine_mean, cosine_min, ab.ratio)


def main(quick: bool) -> str:
    work = minilm_workload(QUICK_EVAL if quick else 256)
    reference = reference_outputs(work.model, work.eval)
    ratios = QUICK_RATIOS if quick else FULL_RATIOS
    rows = []
    with tempfile.TemporaryDirectory(dir=work.folder) as tmp:
        folder = Path(tmp)
        for part, part_ratios in ratios.items():
            for ratio in part_ratios:
                for mode in MODES:
                    path, removed = _factorized(work, folder, part, ratio, mode)
                    cosine_mean, cosine_min = _score(work, path, reference)
                    rows.append(Row(part, ratio, mode, removed, model_bytes(path) / model_bytes(work.model),
                                    cosine_mean, cosine_min))
                    path.unlink()
        if not quick:
            rows.append(_small_recipe(work, folder, reference))
    return _section(rows, quick, len(work.eval))


def _section(rows: list[Row], quick: bool, samples: int) -> str:
    table = markdown_table(
        ["part", "rank ratio", "SVD", "parameters removed", "size ×", "cosine mean", "cosine min", "latency ×"],
        [[r.part, str(r.ratio), r.mode, f"{r.params_removed:,}", f"{r.size_ratio:.3f}", f"{r.cosine_mean:.5f}",
          f"{r.cosine_min:.5f}", "—" if r.latency_ratio is None else f"{r.latency_ratio:.3f}"] for r in rows],
    )
    lines = [
        "## Low-rank factorization: size versus cosine on MiniLM (issue #6)",
        "",
        f"all-MiniLM-L6-v2 (sequence 128); calibration: 128 `split=\"calib\"` sentences; cosine on {samples} "
        "unseen `split=\"eval\"` sentences against fp32 with optimizations off. Rank = ratio · min(k, n), "
        "every factorization kept even near break-even (`min_saving = 0`). Activation-aware: SVD of S·W with "
        "S² the input covariance (MatMuls) or the token frequency (embedding table). Size × of the rows above "
        "the recipe is fp32 with factors; latency only for the recipe (interleaved A/B against fp32, "
        f"{THREADS} threads, informal).",
    ]
    if quick:
        lines += ["", "**Quick smoke run**: one ratio per part, few sentences, no recipe row; not evidence."]
    return "\n".join(lines + ["", table]) + "\n"


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true")
    print(main(parser.parse_args().quick))
