"""Issue #8: students made by ``graphopt.torch.compress`` and trained by ``graphopt.torch.distill``.

Two benchmarks, one page: digits (distill_digits.py: a pruned CNN student under stratified 5-fold
cross-validation) and MiniLM (distill_minilm.py: a low-rank sentence encoder distilled under a
wall-clock budget, exported and quantized to int8).

``python -m benchmarks.bench_distill [--quick] [--only digits|minilm]`` prints the page and writes it
to benchmarks/results/distill.md (``--quick``: work/bench/distill.quick.md); with ``--only`` the
other section of that page is kept.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from benchmarks.common import BENCH_DIR
from benchmarks.distill_digits import digits_benchmark, digits_section
from benchmarks.distill_minilm import minilm_benchmark, minilm_section

TITLE = "## Distillation: torch students (`graphopt.torch`)"
FULL_OUTPUT = Path(__file__).parent / "results" / "distill.md"
QUICK_OUTPUT = BENCH_DIR / "distill.quick.md"  # a smoke run never overwrites the measured results


def merge_sections(previous: str, new: dict[str, str]) -> str:
    """The page with the sections in ``new`` (keyed by their ``### `` heading's first word)
    replaced or added, the others kept from ``previous``, digits before MiniLM."""
    sections = {}
    for chunk in previous.split("\n### ")[1:]:
        sections[chunk.split(maxsplit=1)[0]] = "### " + chunk.strip()
    sections.update(new)
    return "\n\n".join([TITLE, *(sections[k] for k in ("Digits", "MiniLM") if k in sections)]) + "\n"


def main(quick: bool = False, only: str | None = None) -> str:
    """Run the benchmark(s), write the page (with ``only``, that section replaced in the existing
    page) and return it."""
    new = {}
    if only in (None, "digits"):
        result = digits_benchmark(quick)
        _save_json(f"digits{'-quick' if quick else ''}.json", result)
        new["Digits"] = digits_section(result)
    if only in (None, "minilm"):
        result = minilm_benchmark(quick)
        _save_json(f"minilm{'-quick' if quick else ''}.json", result)
        new["MiniLM"] = minilm_section(result)
    output = QUICK_OUTPUT if quick else FULL_OUTPUT
    previous = output.read_text(encoding="utf-8") if only and output.is_file() else ""
    text = merge_sections(previous, new)
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(text, encoding="utf-8")
    return text


def _save_json(name: str, result: dict[str, Any]) -> None:
    (BENCH_DIR / "distill").mkdir(parents=True, exist_ok=True)
    (BENCH_DIR / "distill" / name).write_text(json.dumps(result, indent=2, default=str))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(prog="python -m benchmarks.bench_distill")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--only", choices=["digits", "minilm"])
    args = parser.parse_args()
    print(main(args.quick, args.only))
