"""Codebook weight quantization (k-means, log2) against uniform weight-only int8.

For MiniLM (sentence embeddings) and PP-OCRv4 det (text probability maps): the whole .onnx
file's size relative to the fp32 model, and how far the outputs move (cosine per sample, from
``graphopt.verify.parity.compare_outputs``; PP-OCR also the agreement of the p > 0.3 text
mask). Weight-only methods change no kernel, so latency is not measured here.

    python -m benchmarks.bench_codebook [--work DIR] [--models minilm ppocr]
                                        [--sentences 256] [--images 16] [--out FILE.md]

Every model runs with one onnxruntime thread (the machine is shared). The reference is the
fp32 model with graph optimizations off; candidates run as deployed (optimizations on, which
folds the weight rebuild).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import platform
import re
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

# One thread for torch (the MiniLM export) too; set before anything imports it.
os.environ.setdefault("OMP_NUM_THREADS", "1")

import numpy as np  # noqa: E402
import onnx_ir as ir  # noqa: E402

import graphopt  # noqa: E402
from benchmarks import datasets  # noqa: E402
from graphopt.passes import GraphoptPass, get_pass  # noqa: E402
from graphopt.recipe import load_recipe  # noqa: E402
from graphopt.verify.parity import compare_outputs  # noqa: E402

RESULTS = Path(__file__).parent / "results" / "codebook.md"
MIN_ELEMENTS = 4096  # the same weights for every method: the codebook pass's default
MASK_THRESHOLD = 0.3  # RapidOCR's DB post-processing binarizes the probability map at 0.3


@dataclasses.dataclass(frozen=True)
class Setting:
    label: str
    steps: Callable[[], list[GraphoptPass]]


@dataclasses.dataclass
class Row:
    label: str
    file_bytes: int
    ratio: float
    cosine_mean: float
    cosine_min: float
    mask_agreement: float | None
    seconds: float


def codebook(**options: Any) -> Callable[[], list[GraphoptPass]]:
    return lambda: [get_pass("quantize-codebook")(**options)]


def steps(*makers: Callable[[], list[GraphoptPass]]) -> Callable[[], list[GraphoptPass]]:
    return lambda: [p for make in makers for p in make()]


def int8_weight_only() -> list[GraphoptPass]:
    # Without calibration data the int8 pass picks each channel's scale by plain MSE.
    return [get_pass("quantize-weights")(min_elements=MIN_ELEMENTS, activation_aware=False)]


def common_settings() -> list[Setting]:
    rows = [Setting("fp32 after the lossless recipe", lambda: []),
            Setting("int8 weight-only, uniform per-channel (`quantize-weights`)", int8_weight_only)]
    for bits in (8, 6, 4):
        rows.append(Setting(f"k-means {bits}-bit, per tensor", codebook(bits=bits)))
        rows.append(Setting(f"k-means {bits}-bit, per channel", codebook(bits=bits, per_channel=True)))
    for bits in (8, 6, 4):
        rows.append(Setting(f"log2 {bits}-bit, per tensor", codebook(mode="log2", bits=bits)))
    rows.append(Setting("log2 4-bit, per channel", codebook(mode="log2", bits=4, per_channel=True)))
    return rows


def minilm_mixed_settings(base: ir.Model) -> list[Setting]:
    """The frontier near 0.16x: 4-bit where the model tolerates it, 5 or 6 bits where it does not."""
    groups = minilm_weight_groups(base)
    attention, last_layers = groups["attention"], groups["layer.4"] + groups["layer.5"]
    dense = ("MatMul", "Gemm")
    return [
        Setting("k-means 4-bit per channel; attention weights 5-bit per tensor",
                steps(codebook(per_channel=True, exclude=attention), codebook(bits=5))),
        Setting("k-means 4-bit per channel; layers 4-5 5-bit per tensor",
                steps(codebook(per_channel=True, exclude=last_layers), codebook(bits=5))),
        Setting("k-means embeddings 4-bit per channel, dense weights 5-bit per tensor",
                steps(codebook(per_channel=True, ops=("Gather",)), codebook(bits=5, ops=dense))),
        Setting("k-means embeddings 4-bit per channel, dense weights 6-bit per tensor",
                steps(codebook(per_channel=True, ops=("Gather",)), codebook(bits=6, ops=dense))),
    ]


def minilm_weight_groups(base: ir.Model) -> dict[str, tuple[str, ...]]:
    """Dense weight names by layer and by role. onnxsim fuses MatMul+Add into Gemm nodes named
    ``Gemm_1``..., so the layer and role are read from the names of all the node's inputs (the
    bias is ``bert.encoder.layer.4.attention.self.query.bias``) as well as its own."""
    groups: dict[str, list[str]] = {"attention": [], **{f"layer.{i}": [] for i in range(6)}}
    for node in base.graph:
        weight = node.inputs[1] if node.op_type in ("MatMul", "Gemm") else None
        if weight is None or not weight.is_initializer():
            continue
        hint = " ".join([node.name or "", *(v.name or "" for v in node.inputs if v is not None)])
        if "attention" in hint:
            groups["attention"].append(weight.name)
        layer = re.search(r"layer\.(\d+)", hint)
        if layer:
            groups[f"layer.{layer.group(1)}"].append(weight.name)
    return {role: tuple(names) for role, names in groups.items()}


# --------------------------------------------------------------------------- running


def session(path: Path, *, optimize: bool) -> Any:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.inter_op_num_threads = 1
    if not optimize:
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def outputs(path: Path, batches: Sequence[dict[str, np.ndarray]], *, optimize: bool = True) -> list[dict[str, np.ndarray]]:
    sess = session(path, optimize=optimize)
    names = [o.name for o in sess.get_outputs()]
    return [dict(zip(names, sess.run(names, feed))) for feed in batches]


def lossless(path: Path) -> ir.Model:
    """The lossless recipe, then opset 13 (PP-OCR is opset 12; the codebook rebuild needs 13)."""
    model = graphopt.load_model(path).model
    for pass_ in [*load_recipe("lossless").passes, get_pass("upgrade-opset")()]:
        model = pass_(model).model
    return model


def mask_agreement(reference: list[dict[str, np.ndarray]], candidate: list[dict[str, np.ndarray]]) -> float:
    agree = total = 0
    for ref, cand in zip(reference, candidate):
        (name,) = ref
        same = (ref[name] > MASK_THRESHOLD) == (cand[name] > MASK_THRESHOLD)
        agree += int(np.count_nonzero(same))
        total += same.size
    return agree / total


def evaluate(name: str, source: Path, batches: list[dict[str, np.ndarray]],
             settings: Callable[[ir.Model], list[Setting]], work: Path, *, masks: bool) -> list[Row]:
    reference = outputs(source, batches, optimize=False)
    base = work / f"{name}.lossless.onnx"
    base_model = lossless(source)
    ir.save(base_model, base)
    rows = []
    for index, setting in enumerate(settings(base_model)):
        start = time.perf_counter()
        model = ir.load(base)
        for pass_ in setting.steps():
            model = pass_(model).model
        path = work / f"{name}.{index}.onnx"
        ir.save(model, path)
        candidate = outputs(path, batches)
        parity = compare_outputs(reference, candidate)
        size = path.stat().st_size
        rows.append(Row(setting.label, size, size / source.stat().st_size, parity.cosine_mean, parity.cosine_min,
                        mask_agreement(reference, candidate) if masks else None, time.perf_counter() - start))
        print(f"{name}: {setting.label}: {size / 1e6:.2f} MB ({rows[-1].ratio:.3f}x), cosine mean "
              f"{parity.cosine_mean:.4f} min {parity.cosine_min:.4f} ({rows[-1].seconds:.0f} s)", flush=True)
        path.unlink()
    return rows


def minilm_batches(count: int) -> list[dict[str, np.ndarray]]:
    feeds = datasets.tokenize_sentences(datasets.sentences(count, split="eval"))
    return [{k: v[i : i + 32] for k, v in feeds.items()} for i in range(0, count, 32)]


def minilm_model(work: Path) -> Path:
    path = work / "minilm.onnx"
    if not path.is_file():
        datasets.export_minilm(path)
    return path


def ppocr_batches(count: int) -> list[dict[str, np.ndarray]]:
    # Seed 1: the demo and the README examples use seed 0.
    images = datasets.render_text_images(count, seed=1)
    return [{datasets.PPOCR_DET_INPUT: images[i : i + 1]} for i in range(count)]


# --------------------------------------------------------------------------- report


def table(rows: list[Row], *, masks: bool) -> str:
    head = "| setting | file MB | × fp32 | cosine mean | cosine min |" + (" mask agreement |" if masks else "")
    rule = "|---|---:|---:|---:|---:|" + ("---:|" if masks else "")
    lines = [head, rule]
    for r in rows:
        mask = f" {r.mask_agreement:.4f} |" if masks else ""
        lines.append(f"| {r.label} | {r.file_bytes / 1e6:.2f} | {r.ratio:.3f} | {r.cosine_mean:.4f} | {r.cosine_min:.4f} |{mask}")
    return "\n".join(lines)


def report(results: dict[str, tuple[str, list[Row], bool]]) -> str:
    import onnxruntime

    parts = [
        "# Codebook weight quantization vs uniform int8",
        "",
        "`python -m benchmarks.bench_codebook` "
        f"(Python {platform.python_version()}, onnxruntime {onnxruntime.__version__}, "
        f"graphopt {graphopt.__version__}, {platform.machine()}).",
        "",
        "File sizes count the whole `.onnx` file (indices, codebooks, rebuild nodes, the weights left "
        f"in float) against the fp32 model. Every method encodes the same weights: MatMul/Gemm/Conv "
        f"weights and Gather tables of at least {MIN_ELEMENTS} elements. Cosine: per sample, against "
        "the fp32 model run with graph optimizations off. No calibration data is used by any row.",
    ]
    for title, rows, masks in results.values():
        parts += ["", f"## {title}", "", table(rows, masks=masks)]
    return "\n".join(parts) + "\n"


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.bench_codebook", description=__doc__.split("\n\n")[0])
    parser.add_argument("--work", default="work/bench_codebook", help="folder for the exported and encoded models")
    parser.add_argument("--models", nargs="+", choices=("minilm", "ppocr"), default=["minilm", "ppocr"])
    parser.add_argument("--sentences", type=int, default=256)
    parser.add_argument("--images", type=int, default=16)
    parser.add_argument("--out", default=str(RESULTS))
    args = parser.parse_args(argv)
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)

    # All data before the MiniLM export: sentences and the words rendered into the images come
    # from stdlib docstrings, and importing torch changes what some stdlib modules hold (two
    # more sentences, so a different sample) — data would depend on whether the export ran.
    data = {"minilm": minilm_batches(args.sentences) if "minilm" in args.models else [],
            "ppocr": ppocr_batches(args.images) if "ppocr" in args.models else []}
    results = {}
    if "minilm" in args.models:
        source = minilm_model(work)
        rows = evaluate("minilm", source, data["minilm"], lambda base: common_settings() + minilm_mixed_settings(base),
                        work, masks=False)
        results["minilm"] = (f"all-MiniLM-L6-v2 ({args.sentences} unseen sentences, 128 tokens; "
                             f"fp32 {source.stat().st_size / 1e6:.1f} MB)", rows, False)
    if "ppocr" in args.models:
        source = datasets.ppocr_det_model_path()
        rows = evaluate("ppocr", source, data["ppocr"], lambda base: common_settings(), work, masks=True)
        results["ppocr"] = (f"PP-OCRv4 det ({args.images} rendered text images, 320×320; "
                            f"fp32 {source.stat().st_size / 1e6:.2f} MB; mask: p > {MASK_THRESHOLD})", rows, True)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(report(results), encoding="utf-8")
    print(f"wrote {out}", file=sys.stderr)


if __name__ == "__main__":
    main()
