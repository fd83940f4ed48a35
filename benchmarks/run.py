"""Run every benchmark module and write their sections, under a header saying what machine and
which versions measured them, into one Markdown file.

A benchmark is a module ``benchmarks/bench_*.py`` with ``main(quick: bool) -> str`` returning
its Markdown section. Modules written as their own command instead (``main(argv)`` writing
``--out FILE.md``) are listed in ``COMMAND_STYLE`` with the arguments of a quick run. A module
that fails keeps its place in the file with the error; the command then exits 1. Everything
the benchmarks print goes to stderr; stdout carries the final Markdown.

    python -m benchmarks.run            # full run → benchmarks/RESULTS.md (run on a quiet machine)
    python -m benchmarks.run --quick    # smoke test → work/bench/RESULTS.quick.md
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import inspect
import json
import sys
import time
import traceback
from collections.abc import Callable, Sequence
from pathlib import Path

from benchmarks.common import BENCH_DIR, THREADS, machine_summary, one_line, package_version

HERE = Path(__file__).resolve().parent
FULL_OUTPUT = HERE / "RESULTS.md"
# A smoke run must never overwrite the measured results, so it goes to the git-ignored work folder.
QUICK_OUTPUT = BENCH_DIR / "RESULTS.quick.md"


# Module → extra arguments of its quick run. Its own headings are demoted one level.
COMMAND_STYLE: dict[str, Callable[[bool], list[str]]] = {
    "benchmarks.bench_codebook": lambda quick: ["--sentences", "32"] if quick else [],
}


def benchmark_modules() -> list[str]:
    return sorted(f"benchmarks.{path.stem}" for path in HERE.glob("bench_*.py"))


def _speed_profile_state() -> str:
    from graphopt.passes.quantize.profile import default_cache_dir, machine_key

    path = default_cache_dir() / "speed-profile.json"
    if not path.is_file():
        return f"`{path}` did not exist: this run measured it, and graphopt's quantization time includes that"
    try:
        entries = len(json.loads(path.read_text()).get(machine_key(THREADS), {}))
    except (OSError, ValueError, AttributeError):
        entries = 0
    return (f"`{path}` existed with {entries} layer forms for this CPU, onnxruntime version and "
            f"{THREADS} threads; forms not yet in it are measured during this run (each row says how many)")


def header(quick: bool, argv: Sequence[str]) -> str:
    machine = machine_summary()
    versions = ", ".join(f"{name} {package_version(name)}"
                         for name in ("graphopt", "onnxruntime", "nncf", "onnx", "numpy", "torch"))
    lines = [
        "# graphopt benchmarks" + (" (quick smoke run: not evidence)" if quick else ""),
        "",
        f"- machine: {machine['cpu']}, {machine['cores']} cores ({machine['isa']})",
        f"- versions: Python {machine['python']}, {versions}",
        f"- date: {machine['date']}",
        f"- command: `{' '.join(['python -m benchmarks.run', *argv])}`",
        "- graphopt's int8 recipe times each layer's int8 form once per machine and caches the result "
        "(the speed profile, by design: later runs make the same choices); at the start of this run "
        + _speed_profile_state() + ".",
        "- data and models are generated offline by `benchmarks/datasets.py` into `work/bench/` (git-ignored).",
    ]
    return "\n".join(lines)


class NotABenchmark(Exception):
    pass


def _section(name: str, quick: bool) -> str:
    module = importlib.import_module(name)
    main = getattr(module, "main", None)
    if main is not None and "quick" in inspect.signature(main).parameters:
        return main(quick=quick)
    if main is not None and name in COMMAND_STYLE:
        out = BENCH_DIR / f"{name.rsplit('.', 1)[-1]}.section.md"
        out.unlink(missing_ok=True)
        main([*COMMAND_STYLE[name](quick), "--work", str(BENCH_DIR / name.rsplit(".", 1)[-1]), "--out", str(out)])
        return "\n".join("#" + line if line.startswith("#") else line for line in out.read_text().splitlines())
    raise NotABenchmark("it has no `main(quick: bool) -> str` and is not in COMMAND_STYLE")


def run_module(name: str, quick: bool) -> tuple[str, bool]:
    """The module's section, and whether it ran cleanly."""
    started = time.perf_counter()
    print(f"[run] {name} …", file=sys.stderr, flush=True)
    try:
        with contextlib.redirect_stdout(sys.stderr):
            section = _section(name, quick)
    except NotABenchmark as exc:
        return f"## {name}\n\nNot run: {exc}.\n", False
    except Exception as exc:  # one broken benchmark must not hide the others
        traceback.print_exc(file=sys.stderr)
        return f"## {name}\n\n**Failed**: {type(exc).__name__}: {one_line(str(exc))}\n", False
    print(f"[run] {name}: {time.perf_counter() - started:.0f} s", file=sys.stderr, flush=True)
    return section.rstrip() + "\n", True


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(prog="python -m benchmarks.run", description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="smoke test: fewer samples and rounds")
    parser.add_argument("--only", nargs="+", metavar="NAME",
                        help="run only these benchmarks (int8, codebook, … : bench_NAME.py)")
    parser.add_argument("--output", type=Path, help=f"default {FULL_OUTPUT.relative_to(HERE.parent)}, "
                        f"or {QUICK_OUTPUT.relative_to(HERE.parent)} with --quick")
    args = parser.parse_args(argv)
    output = args.output or (QUICK_OUTPUT if args.quick else FULL_OUTPUT)

    started = time.perf_counter()
    top = header(args.quick, argv)
    modules = benchmark_modules()
    if args.only:
        wanted = {f"benchmarks.bench_{name.removeprefix('bench_')}" for name in args.only}
        if wanted - set(modules):
            parser.error(f"no such benchmark: {', '.join(sorted(wanted - set(modules)))}; have {', '.join(modules)}")
        modules = [m for m in modules if m in wanted]
    results = [run_module(name, args.quick) for name in modules]
    minutes = (time.perf_counter() - started) / 60
    text = "\n\n".join([top + f"\n- total time: {minutes:.1f} min", *(section for section, _ in results)])
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(text)
    print(text)
    print(f"[run] wrote {output}", file=sys.stderr)
    return 0 if all(ok for _, ok in results) else 1


if __name__ == "__main__":
    sys.exit(main())
