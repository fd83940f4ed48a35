"""Robustness sweep: graphopt on models nobody tuned it for.

The ``onnx`` package ships small test models under ``onnx/backend/test/data``: PyTorch layer
and operator exports with reference inputs (``test_data_set_*``), and "light" versions of
classic CNNs. This script runs ``graphopt optimize`` on each with the ``lossless`` and ``int8``
recipes exactly as a user would (a subprocess: exit code, seconds, last stderr line), then
checks every written model itself in onnxruntime instead of trusting graphopt's report: the
original runs with graph optimizations off, the output as deployed, on the same inputs.

Per output it records the largest absolute difference, ``np.allclose(rtol=1e-3, atol=1e-5)``
and the mean per-sample cosine (a sample is one feed, the output flattened; two all-zero
vectors count as 1), ignoring positions that are NaN in both models; per model the
output/input file size. Lossless agrees when every output is allclose, int8 when the worst
output's cosine is at least 0.98. The case that matters most is exit 0 without agreement: a
model graphopt wrote and vouched for that does not match the original.

Light models have no test data: lossless runs them on graphopt's random feeds (no --data);
int8 gets 8 seeded N(0,1) samples in an .npz (as --calib and --data). The independent check
uses those same 8 samples for both recipes.

    .venv/bin/python -m benchmarks.sweep [--only lossless|int8] [--limit N] [--out work/sweep]

Writes OUT/sweep.json (a rerun replaces only the records it measures again) and OUT/sweep.md,
and prints the same summary.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import numpy_helper

RECIPES = ("lossless", "int8")
TIMEOUT_S = 300
N_RANDOM = 8
INT8_MIN_COSINE = 0.98
BUCKETS = ("agrees", "disagrees", "exit 1", "exit 2", "exit 3", "timeout", "other")


def find_models() -> list[dict]:
    """Every test model as {name, path, data}; data is its test-data folder, or None."""
    root = Path(importlib.util.find_spec("onnx").origin).parent / "backend" / "test" / "data"
    models = [
        {"name": f"{kind}/{p.parent.name}", "path": p, "data": p.parent}
        for kind in ("pytorch-converted", "pytorch-operator")
        for p in sorted((root / kind).glob("*/model.onnx"))
    ]
    light = sorted((root / "light").glob("*.onnx"))
    print(f"{len(models)} pytorch-converted/-operator models with test data, {len(light)} light models")
    return models + [{"name": f"light/{p.stem}", "path": p, "data": None} for p in light]


def graph_inputs(model: onnx.ModelProto) -> list[onnx.ValueInfoProto]:
    initializers = {t.name for t in model.graph.initializer}
    return [i for i in model.graph.input if i.name not in initializers]


def read_pb(path: Path) -> np.ndarray:
    tensor = onnx.TensorProto()
    tensor.ParseFromString(path.read_bytes())
    return numpy_helper.to_array(tensor)


def test_data_feeds(folder: Path, names: list[str]) -> list[dict[str, np.ndarray]]:
    """One feed per test_data_set_*: input_K.pb goes to the K-th graph input."""
    feeds = []
    for data_set in sorted(folder.glob("test_data_set_*")):
        files = sorted(data_set.glob("input_*.pb"), key=lambda p: int(p.stem.split("_")[1]))
        feeds.append({name: read_pb(f) for name, f in zip(names, files)})
    return feeds


def write_random_npz(model: onnx.ModelProto, dest: Path) -> list[dict[str, np.ndarray]]:
    """N_RANDOM seeded float32 N(0,1) samples per input (dynamic dims 1), stacked on axis 0
    into ``dest``; returns them as N_RANDOM separate feeds."""
    rng = np.random.default_rng(0)
    arrays = {}
    for vi in graph_inputs(model):
        shape = [d.dim_value if d.dim_value > 0 else 1 for d in vi.type.tensor_type.shape.dim]
        arrays[vi.name] = rng.standard_normal((N_RANDOM * shape[0], *shape[1:])).astype(np.float32)
    np.savez(dest, **arrays)
    return [{k: v for k, v in zip(arrays, parts)}
            for parts in zip(*(np.split(a, N_RANDOM) for a in arrays.values()))]


def run_graphopt(model: dict, recipe: str, folder: Path, data: Path | None, cache: Path) -> dict:
    """Run ``graphopt optimize`` as a subprocess; exit code, seconds, last stderr line."""
    cmd = [sys.executable, "-m", "graphopt", "optimize", str(model["path"]),
           "-o", str(folder / f"{recipe}.onnx"), "--recipe", recipe,
           "--report", str(folder / f"{recipe}.json"), "--no-latency", "-q"]
    if recipe == "int8":
        cmd += ["--calib", str(data), "--cache-dir", str(cache)]
    if data is not None:
        cmd += ["--data", str(data)]
    start = time.perf_counter()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired:
        return {"exit": None, "timeout": True, "seconds": TIMEOUT_S, "stderr": f"timeout after {TIMEOUT_S} s"}
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    return {"exit": proc.returncode, "timeout": False,
            "seconds": round(time.perf_counter() - start, 2), "stderr": lines[-1] if lines else ""}


def session(path: Path, optimize: bool) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.log_severity_level = 3  # old-opset warnings would drown the progress lines
    options.graph_optimization_level = (ort.GraphOptimizationLevel.ORT_ENABLE_ALL if optimize
                                        else ort.GraphOptimizationLevel.ORT_DISABLE_ALL)
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    na, nb = np.linalg.norm(a), np.linalg.norm(b)
    if na == 0 and nb == 0:
        return 1.0
    return float(a @ b / (na * nb)) if na and nb else 0.0


def without_shared_nan(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    keep = ~(np.isnan(a) & np.isnan(b))
    return a[keep], b[keep]


def output_metrics(refs: list[np.ndarray], cands: list[np.ndarray]) -> dict:
    """Compare one output over all feeds; positions NaN in both models count as equal."""
    for r, c in zip(refs, cands):
        if r.shape != c.shape:
            return {"error": f"shape {list(c.shape)}, original {list(r.shape)}", "allclose": False, "cosine": 0.0}
    pairs = [without_shared_nan(r.astype(np.float64).ravel(), c.astype(np.float64).ravel())
             for r, c in zip(refs, cands)]
    return {
        "max_abs": float(max(np.max(np.abs(r - c), initial=0.0) for r, c in pairs)),
        "allclose": all(np.allclose(c, r, rtol=1e-3, atol=1e-5) for r, c in pairs),
        "cosine": float(np.mean([cosine(r, c) for r, c in pairs])),
    }


def compare(original: Path, output: Path, feeds: list[dict[str, np.ndarray]]) -> dict[str, dict]:
    """Per-output metrics of the output model against the original on the same feeds."""
    ref, cand = session(original, optimize=False), session(output, optimize=True)
    names = [o.name for o in ref.get_outputs()]
    ref_runs = [ref.run(names, feed) for feed in feeds]
    cand_runs = [cand.run(names, feed) for feed in feeds]
    return {name: output_metrics([run[i] for run in ref_runs], [run[i] for run in cand_runs])
            for i, name in enumerate(names)}


def agrees(recipe: str, outputs: dict[str, dict]) -> bool:
    if recipe == "lossless":
        return all(m["allclose"] for m in outputs.values())
    return min(m["cosine"] for m in outputs.values()) >= INT8_MIN_COSINE


def sweep_one(model: dict, recipe: str, out: Path) -> dict:
    folder = out / model["name"]
    folder.mkdir(parents=True, exist_ok=True)
    result = folder / f"{recipe}.onnx"
    result.unlink(missing_ok=True)
    proto = onnx.load(model["path"])
    if model["data"] is not None:
        data = model["data"]
        feeds = test_data_feeds(data, [i.name for i in graph_inputs(proto)])
    else:
        feeds = write_random_npz(proto, folder / "random.npz")
        data = folder / "random.npz" if recipe == "int8" else None
    record = {"model": model["name"], "recipe": recipe, **run_graphopt(model, recipe, folder, data, out / "cache")}
    if result.exists():
        record["size_ratio"] = round(result.stat().st_size / model["path"].stat().st_size, 4)
        try:
            record["outputs"] = compare(model["path"], result, feeds)
            record["agrees"] = agrees(recipe, record["outputs"])
        except Exception as e:  # the output failing to load or run is itself a finding
            record["check_error"] = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
            record["agrees"] = False
    return record


def bucket(record: dict) -> str:
    if record["timeout"]:
        return "timeout"
    if record["exit"] == 0:
        return "agrees" if record.get("agrees") else "disagrees"
    return f"exit {record['exit']}" if record["exit"] in (1, 2, 3) else "other"


def note(record: dict) -> str:
    """Why a record is not 'agrees': graphopt's stderr, or what the independent check saw."""
    if bucket(record) != "disagrees":
        return record["stderr"]
    if "check_error" in record:
        return f"check failed: {record['check_error']}"
    if "outputs" not in record:
        return "exit 0 but no output written"
    name, worst = min(record["outputs"].items(), key=lambda kv: (kv[1]["allclose"], kv[1]["cosine"]))
    detail = worst.get("error") or f"max abs {worst['max_abs']:.3g}, cosine {worst['cosine']:.4f}"
    return f"output {name}: {detail}"


def summary(records: list[dict]) -> str:
    lines = ["| recipe | " + " | ".join(BUCKETS) + " |", "|---" * (len(BUCKETS) + 1) + "|"]
    for recipe in RECIPES:
        counts = [sum(1 for r in records if r["recipe"] == recipe and bucket(r) == b) for b in BUCKETS]
        if sum(counts):
            lines.append(f"| {recipe} | " + " | ".join(map(str, counts)) + " |")
    lines += ["", "| recipe | model | result | stderr / check |", "|---|---|---|---|"]
    for r in records:
        if bucket(r) != "agrees":
            lines.append(f"| {r['recipe']} | {r['model']} | {bucket(r)} | {note(r).replace('|', '/')} |")
    return "\n".join(lines) + "\n"


def save(records: list[dict], out: Path) -> list[dict]:
    """Merge into OUT/sweep.json, replacing earlier records of the same model and recipe."""
    path = out / "sweep.json"
    fresh = {(r["model"], r["recipe"]) for r in records}
    old = json.loads(path.read_text()) if path.exists() else []
    merged = sorted([r for r in old if (r["model"], r["recipe"]) not in fresh] + records,
                    key=lambda r: (RECIPES.index(r["recipe"]), r["model"]))
    path.write_text(json.dumps(merged, indent=1))
    return merged


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", choices=RECIPES, help="run one recipe (default: both)")
    parser.add_argument("--limit", type=int, help="only the first N models")
    parser.add_argument("--out", type=Path, default=Path("work/sweep"))
    args = parser.parse_args()
    models = find_models()[: args.limit]
    recipes = [args.only] if args.only else list(RECIPES)
    records = []
    for recipe in recipes:
        for i, model in enumerate(models, 1):
            records.append(sweep_one(model, recipe, args.out))
            r = records[-1]
            print(f"[{i}/{len(models)}] {recipe} {model['name']}: {bucket(r)} ({r['seconds']} s)", flush=True)
    text = summary(save(records, args.out))
    (args.out / "sweep.md").write_text(f"# graphopt robustness sweep\n\n{text}")
    print("\n" + text)


if __name__ == "__main__":
    main()
