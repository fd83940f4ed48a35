"""A model above 2 GB through `graphopt optimize` with weight-only int8: time, peak memory, sizes.

Protobuf cannot hold 2 GiB, so such a model only exists with external data. The model is a
chain of MatMuls with 4096×4096 float weights (64 MiB each; 34 of them make 2.14 GiB), written
straight to its data file one layer at a time, so building it never holds the weights in memory.
The optimize run is a child process; its peak RSS comes from ``wait4`` (ru_maxrss). Quick mode
uses 3 layers of 512×512 (3 MiB) to check the path end to end.

    python -m benchmarks.bench_large [--quick]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from benchmarks.common import BENCH_DIR

FULL = {"layers": 34, "width": 4096}
QUICK = {"layers": 3, "width": 512}
DATA_NAME = "large.onnx.data"
# Weight-only int8 is the form meant for weights that dominate the file; the lossless passes
# skip models this size (onnxsim cannot hold them) and add nothing here.
RECIPE = """\
description = "weight-only int8 for a model above 2 GB"
min_cosine = 0.99

[[steps]]
pass = "quantize-weights"
"""


def build_model(folder: Path, layers: int, width: int, seed: int = 0) -> Path:
    """X[N,width] → MatMul × layers → Y, weights in ``large.onnx.data`` (scale 1/√width keeps
    activations of order 1 through the chain)."""
    from onnx import TensorProto, helper

    rng = np.random.default_rng(seed)
    nbytes = width * width * 4
    initializers, nodes, x = [], [], "X"
    with open(folder / DATA_NAME, "wb") as data:
        for i in range(layers):
            for row in range(0, width, 512):  # 8 MiB at a time
                rows = min(512, width - row)
                block = rng.standard_normal((rows, width), dtype=np.float32) / np.float32(np.sqrt(width))
                data.write(block.tobytes())
            tensor = TensorProto(name=f"W{i}", data_type=TensorProto.FLOAT, dims=[width, width])
            tensor.data_location = TensorProto.EXTERNAL
            for key, value in (("location", DATA_NAME), ("offset", str(i * nbytes)), ("length", str(nbytes))):
                tensor.external_data.add(key=key, value=value)
            initializers.append(tensor)
            nodes.append(helper.make_node("MatMul", [x, f"W{i}"], [f"h{i}" if i < layers - 1 else "Y"], name=f"fc{i}"))
            x = f"h{i}"
    graph = helper.make_graph(nodes, "large", [helper.make_tensor_value_info("X", TensorProto.FLOAT, ["N", width])],
                              [helper.make_tensor_value_info("Y", TensorProto.FLOAT, ["N", width])], initializers)
    model = helper.make_model(graph, ir_version=8, opset_imports=[helper.make_opsetid("", 17)])
    path = folder / "large.onnx"
    path.write_bytes(model.SerializeToString())
    return path


def _files_bytes(*paths: Path) -> int:
    return sum(p.stat().st_size for p in paths if p.exists())


def run_optimize(model: Path, out: Path, recipe: Path, report: Path) -> dict[str, float | int]:
    """`graphopt optimize` as a child process: exit code, wall seconds, peak RSS (MiB)."""
    started = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "graphopt", "optimize", str(model), "-o", str(out),
                             "--recipe", str(recipe), "--report", str(report), "--no-latency", "-q"],
                            stderr=subprocess.PIPE)
    _, status, usage = os.wait4(proc.pid, 0)
    seconds = time.perf_counter() - started
    stderr = proc.stderr.read().decode(errors="replace") if proc.stderr else ""
    proc.returncode = os.waitstatus_to_exitcode(status)
    return {"exit": proc.returncode, "seconds": seconds, "cpu_seconds": usage.ru_utime + usage.ru_stime,
            "peak_rss_mib": usage.ru_maxrss / 1024, "stderr": stderr}


def measure(work: Path, layers: int, width: int) -> dict[str, object]:
    work.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    model = build_model(work, layers, width)
    build_seconds = time.perf_counter() - started
    recipe = work / "weight-only.toml"
    recipe.write_text(RECIPE)
    out_dir = work / "out"
    out_dir.mkdir(exist_ok=True)
    out, report = out_dir / "large.int8.onnx", work / "report.json"
    result = run_optimize(model, out, recipe, report)
    data = json.loads(report.read_text()) if report.exists() else {}
    verification = data.get("verification", {})
    return {
        "layers": layers, "width": width,
        "input_bytes": _files_bytes(model, work / DATA_NAME),
        "output_bytes": _files_bytes(out, out_dir / (out.name + ".data")),
        "output_files": sorted(p.name for p in out_dir.iterdir()),
        "build_seconds": build_seconds,
        "cosine_mean": verification.get("parity", {}).get("cosine_mean"),
        "reported_peak_rss_mib": verification.get("peak_rss_mib"),
        **result,
    }


def _cosine_text(value: object) -> str:
    return f"{value:.6f}" if isinstance(value, float) else "n/a"


def _section(result: dict[str, object], quick: bool) -> str:
    gib = 2**30
    lines = [
        "## Over 2 GB: weight-only int8 of a model with external data",
        "",
        f"Synthetic chain of {result['layers']} MatMuls with {result['width']}×{result['width']} float32 weights in "
        f"external data ({'quick mode: a small model' if quick else 'above the 2 GiB protobuf limit'}); "
        "`graphopt optimize --recipe weight-only.toml` (one step, `quantize-weights`) as a child process, "
        "verified on seeded random inputs, no latency measurement. Peak memory is the child's ru_maxrss.",
        "",
        "| input | output | files written | exit | optimize wall | CPU (user+sys) | peak RSS | cosine (random inputs) |",
        "|---|---|---|---|---|---|---|---|",
        f"| {result['input_bytes'] / gib:.3f} GiB | {result['output_bytes'] / gib:.3f} GiB | "
        f"{', '.join(result['output_files'])} | {result['exit']} | {result['seconds']:.1f} s | "
        f"{result['cpu_seconds']:.1f} s | "
        f"{result['peak_rss_mib']:,.0f} MiB | {_cosine_text(result['cosine_mean'])} |",
        "",
        f"Building the model took {result['build_seconds']:.1f} s (not included).",
    ]
    if result["exit"] != 0:
        lines += ["", f"optimize failed: `{str(result['stderr']).strip()[-400:]}`"]
    return "\n".join(lines) + "\n"


def main(quick: bool = False) -> str:
    size = QUICK if quick else FULL
    needed = 4 * size["layers"] * size["width"] ** 2 * 2  # input + staged output + headroom
    BENCH_DIR.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(BENCH_DIR).free
    if free < needed + 2**30:
        return (f"## Over 2 GB\n\nSkipped: {free / 2**30:.1f} GiB free under {BENCH_DIR}, "
                f"{(needed + 2**30) / 2**30:.1f} GiB needed.\n")
    work = BENCH_DIR / ("large-quick" if quick else "large")
    shutil.rmtree(work, ignore_errors=True)
    try:
        result = measure(work, **size)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    if result["exit"] != 0:
        raise RuntimeError(f"optimize exited {result['exit']}: {str(result['stderr']).strip()[-400:]}")
    return _section(result, quick)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true")
    print(main(quick=parser.parse_args().quick))
