"""Issue #4: graphopt's ``int8`` recipe side by side with its peers, on real models, in one process.

Contenders: fp32 (the reference), graphopt ``--recipe int8``, onnxruntime ``quantize_dynamic``
(per-tensor and per-channel; for MiniLM also after onnxruntime's transformer optimizer),
onnxruntime ``quantize_static`` (QDQ, per-channel, after ``quant_pre_process``) and NNCF
post-training quantization. Every number is a ratio against fp32 measured in this process: size (file bytes incl. external data), latency (interleaved A/B,
batch 1, ``THREADS`` threads, onnxruntime's default session settings), cosine of the outputs
against fp32 run with optimizations off, and for PP-OCR the agreement of the text mask.

``python -m benchmarks.bench_int8 [--quick]`` prints the section; ``benchmarks.run`` collects it.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import hashlib
import json
import os
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.common import (
    BENCH_DIR,
    MINILM_EVAL,
    PPOCR_EVAL,
    QUICK_EVAL,
    THREADS,
    Feed,
    Workload,
    cpu_has_vnni,
    deployed_session,
    markdown_table,
    minilm_workload,
    model_bytes,
    one_line,
    package_version,
    ppocr_workload,
    reference_outputs,
    run_measured,
)

FULL_ROUNDS = 50
QUICK_ROUNDS = 10
MASK_THRESHOLD = 0.3  # PP-OCR's DBNet post-processing binarizes the probability map here
GRAPHOPT = "graphopt int8"
ORT_DYNAMIC_PER_CHANNEL = "ORT dynamic per-channel"


class ContenderFailed(Exception):
    """A quantizer refused or broke the model; the row shows this message instead of numbers."""


class NotApplicable(Exception):
    """The contender is not meant for this kind of model (a transformer tool on a CNN): no row."""


@dataclasses.dataclass
class Row:
    contender: str
    path: Path
    quantize_seconds: float | None = None
    notes: list[str] = dataclasses.field(default_factory=list)
    error: str | None = None
    size_ratio: float | None = None
    latency_ratio: float | None = None
    fp32_ms: float | None = None
    median_ms: float | None = None
    cosine_mean: float | None = None
    cosine_min: float | None = None
    mask_agreement: float | None = None
    peak_rss_mib: float | None = None
    sha256: str | None = None
    session: Any = None


@dataclasses.dataclass(frozen=True)
class Acceptance:
    """Issue #4's bar for the graphopt row."""

    max_size: float
    max_latency: float
    min_cosine_mean: float | None = None
    min_cosine_min: float | None = None
    min_mask: float | None = None
    max_quantize_seconds: float | None = None
    not_slower_than: str | None = None


MINILM_ACCEPTANCE = Acceptance(max_size=0.26, max_latency=0.55, min_cosine_mean=0.995, min_cosine_min=0.985,
                               max_quantize_seconds=60.0, not_slower_than=ORT_DYNAMIC_PER_CHANNEL)
PPOCR_ACCEPTANCE = Acceptance(max_size=0.30, max_latency=1.0, min_mask=0.995)


# --------------------------------------------------------------------------- contenders


def _graphopt_int8(work: Workload, out: Path, row: Row) -> None:
    """``python -m graphopt optimize --recipe int8`` in a child process, so that its wall time
    and peak memory are its own. The CLI builds ``OptimizeOptions(recipe="int8", calib=…,
    data=…, measure_latency=False, threads=THREADS)`` and calls ``graphopt.optimize.optimize``."""
    report_path = out.with_suffix(".report.json")
    report_path.unlink(missing_ok=True)
    command = [sys.executable, "-m", "graphopt", "optimize", str(work.model), "-o", str(out),
               "--recipe", "int8", "--calib", str(work.calib_npz), "--data", str(work.eval_npz),
               "--no-latency", "--threads", str(THREADS), "--report", str(report_path), "-q"]
    run = run_measured(command, log=out.with_suffix(".log"))
    row.quantize_seconds, row.peak_rss_mib = run.seconds, run.peak_rss_mib
    row.notes.append(f"{'quantized' if run.returncode == 0 else 'ran'} in {run.seconds:.1f} s wall (whole "
                     f"command incl. its verification), peak RSS {run.peak_rss_mib:.0f} MiB")
    if run.returncode != 0:
        lines = [line for line in run.output.splitlines() if line.startswith("graphopt:")]
        raise ContenderFailed(f"exit {run.returncode}: {one_line(lines[-1] if lines else run.output)}")
    report = json.loads(report_path.read_text())
    step = next((s for s in report["steps"] if s["name"] == "quantize-int8"), None)
    if step is not None:
        changes = step["changes"]
        row.notes.append(f"layers: {changes.get('dynamic layers', 0)} dynamic, {changes.get('static layers', 0)} "
                         f"static, {changes.get('weight-only layers', 0)} weight-only, "
                         f"{changes.get('float layers', 0)} float, {changes.get('rungs taken for accuracy', 0)} rungs taken for accuracy")
        details = step["details"]
        row.notes.append(f"quantize-int8 step {step['seconds']:.1f} s of {report['seconds']:.1f} s; "
                         f"held-out {details.get('held_out', {}).get('measured', '?')}, "
                         f"{details.get('held_out', {}).get('budget_used') or 0:.3f} of the budget used "
                         f"(search allows {details.get('held_out', {}).get('allowed') or 0:.3f})")
        profile = details.get("profile") or {}
        if profile:
            row.notes.append(f"speed profile: {profile.get('measured', 0)} layer forms measured in this run, "
                             f"{profile.get('reused', 0)} reused from cache")


def _ort_dynamic(per_channel: bool) -> Callable[[Workload, Path, Row], None]:
    def quantize(work: Workload, out: Path, row: Row) -> None:
        from onnxruntime.quantization import QuantType, quantize_dynamic

        quantize_dynamic(work.peer_input, out, per_channel=per_channel, weight_type=QuantType.QInt8,
                         reduce_range=not cpu_has_vnni())
        row.notes.append("defaults (int8 weights, every supported op), no pre-processing")

    return quantize


def _ort_fused_dynamic(work: Workload, out: Path, row: Row) -> None:
    """What a careful onnxruntime user does with a BERT: the transformer optimizer's fusions,
    then dynamic per-channel int8."""
    if work.name != "MiniLM":
        raise NotApplicable("the transformer optimizer is for transformers")
    from onnxruntime.quantization import QuantType, quantize_dynamic
    from onnxruntime.transformers.optimizer import optimize_model

    fused = optimize_model(str(work.peer_input), model_type="bert", num_heads=12, hidden_size=384)
    counts = {k: v for k, v in fused.get_fused_operator_statistics().items() if v}
    fused_path = out.with_name(out.stem + ".fused.onnx")
    fused.save_model_to_file(str(fused_path))
    # The quantizer needs the types behind the contrib ops the optimizer wrote: its own
    # pre-processing (symbolic shape inference) supplies them.
    prepared = out.with_name(out.stem + ".fused.prepared.onnx")
    how = _ort_pre_process(fused_path, prepared)
    quantize_dynamic(prepared, out, per_channel=True, weight_type=QuantType.QInt8, reduce_range=not cpu_has_vnni())
    row.notes.append("onnxruntime.transformers optimize_model(model_type='bert', num_heads=12, hidden_size=384), "
                     f"quant_pre_process ({how}), then quantize_dynamic per-channel; fused: "
                     + (", ".join(f"{k} {v}" for k, v in sorted(counts.items())) or "nothing"))


def _calibration_reader(feeds: Sequence[Feed]) -> Any:
    """onnxruntime's CalibrationDataReader over the same calibration feeds graphopt gets."""
    from onnxruntime.quantization import CalibrationDataReader

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self._feeds = iter(feeds)

        def get_next(self) -> Feed | None:
            return next(self._feeds, None)

    return Reader()


def _ort_static(work: Workload, out: Path, row: Row) -> None:
    from onnxruntime.quantization import QuantFormat, QuantType, quantize_static

    preprocessed = out.with_suffix(".pre.onnx")
    how = _ort_pre_process(work.peer_input, preprocessed)
    vnni = cpu_has_vnni()
    # onnxruntime's documented choice for x86 CPUs: QDQ, uint8 activations, int8 weights,
    # reduce_range only without VNNI; MinMax calibration (its default). MinMax keeps only
    # per-tensor minima and maxima, so all calibration samples are fed in one pass.
    quantize_static(preprocessed, out, _calibration_reader(work.calib), quant_format=QuantFormat.QDQ,
                    per_channel=True, activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                    reduce_range=not vnni)
    row.notes.append(f"quant_pre_process ({how}), QDQ, U8 activations / S8 weights, MinMax on "
                     f"{len(work.calib)} samples, reduce_range={not vnni}")


def _ort_pre_process(model: Path, out: Path) -> str:
    """onnxruntime's pre-processing, relaxed step by step where its symbolic shape inference gives
    up (first ``auto_merge`` of conflicting symbolic dimensions, then none); returns the setting
    that worked. Runs in a scratch directory: a failed symbolic shape inference dumps
    ``sym_shape_infer_temp.onnx`` and its weights into the working directory."""
    from onnxruntime.quantization.shape_inference import quant_pre_process

    attempts = {"defaults": {}, "auto_merge=True": {"auto_merge": True},
                "skip_symbolic_shape=True": {"skip_symbolic_shape": True}}
    errors: list[str] = []
    previous = Path.cwd()
    scratch = tempfile.TemporaryDirectory(dir=out.parent)
    os.chdir(scratch.name)
    try:
        for how, options in attempts.items():
            try:
                quant_pre_process(str(model), str(out), **options)
            except Exception as exc:  # onnxruntime raises a bare Exception here
                errors.append(f"{how}: {one_line(str(exc))}")
                continue
            return how if not errors else f"{how}; before: " + "; ".join(errors)
    finally:
        os.chdir(previous)
        scratch.cleanup()
    raise ContenderFailed("quant_pre_process failed: " + "; ".join(errors))


def _nncf(work: Workload, out: Path, row: Row) -> None:
    # nncf 3.4 reads NNCF_CI only to switch its telemetry off: a benchmark sends nothing anywhere.
    os.environ.setdefault("NNCF_CI", "1")
    try:
        import nncf
    except ImportError:
        raise ContenderFailed("nncf is not installed (pip install nncf; it does not pull torch)") from None
    import onnx

    transformer = work.name == "MiniLM"
    options = {"model_type": nncf.ModelType.TRANSFORMER} if transformer else {}
    quantized = nncf.quantize(onnx.load(str(work.peer_input)), nncf.Dataset(list(work.calib)),
                              subset_size=len(work.calib), **options)
    onnx.save(quantized, str(out))
    row.notes.append(f"nncf {package_version('nncf')}, default preset"
                     + (", model_type=TRANSFORMER" if transformer else "") + f", subset_size={len(work.calib)}")


CONTENDERS: dict[str, Callable[[Workload, Path, Row], None]] = {
    GRAPHOPT: _graphopt_int8,
    "ORT dynamic per-tensor": _ort_dynamic(per_channel=False),
    ORT_DYNAMIC_PER_CHANNEL: _ort_dynamic(per_channel=True),
    "ORT transformer optimizer + dynamic per-channel": _ort_fused_dynamic,
    "ORT static QDQ per-channel": _ort_static,
    "NNCF PTQ": _nncf,
}


def _degenerate_scales(path: Path) -> list[str]:
    """Tensors quantized with an infinite, NaN or zero scale: a calibration that saw an extreme
    range (e.g. an attention mask of float32 min) and so quantizes that tensor to garbage."""
    import onnx
    from onnx import numpy_helper

    graph = onnx.load(str(path)).graph
    scales = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
    bad: dict[str, str] = {}  # scale → the first tensor it quantizes
    for node in graph.node:
        if node.op_type in ("QuantizeLinear", "DequantizeLinear") and len(node.input) > 1:
            scale = scales.get(node.input[1])
            if scale is not None and (not np.all(np.isfinite(scale)) or np.any(scale == 0)):
                bad.setdefault(node.input[1], node.input[0])
    return sorted(bad.values())


def _file_name(contender: str) -> str:
    return contender.lower().replace(" ", "-") + ".onnx"


# --------------------------------------------------------------------------- measurement


def _mask_agreement(reference: list[dict[str, np.ndarray]], candidate: list[dict[str, np.ndarray]]) -> float:
    agree = total = 0
    for ref, cand in zip(reference, candidate):
        for name, values in ref.items():
            same = (values > MASK_THRESHOLD) == (cand[name] > MASK_THRESHOLD)
            agree += int(np.count_nonzero(same))
            total += same.size
    return agree / total


def _measure(work: Workload, row: Row, fp32: Row, reference: list[dict[str, np.ndarray]], rounds: int,
             with_mask: bool) -> None:
    from graphopt.verify.latency import compare_interleaved
    from graphopt.verify.parity import compare_outputs, run_outputs

    row.size_ratio = model_bytes(row.path) / model_bytes(fp32.path)
    row.sha256 = hashlib.sha256(row.path.read_bytes()).hexdigest()
    row.session = deployed_session(row.path)
    outputs = run_outputs(row.session, work.eval)
    parity = compare_outputs(reference, outputs)
    row.cosine_mean, row.cosine_min = parity.cosine_mean, parity.cosine_min
    if with_mask:
        row.mask_agreement = _mask_agreement(reference, outputs)
    if row is fp32:
        row.latency_ratio = 1.0
        return
    ab = compare_interleaved(fp32.session, row.session, work.eval, threads=THREADS, rounds=rounds, max_seconds=600.0)
    row.latency_ratio, row.fp32_ms, row.median_ms = ab.ratio, ab.a.median_ms, ab.b.median_ms


def _fail(row: Row, exc: BaseException, log: Path) -> None:
    row.error = f"{type(exc).__name__}: {one_line(str(exc))}" if not isinstance(exc, ContenderFailed) else str(exc)
    log.write_text("".join(traceback.format_exception(exc)))


def _run_workload(work: Workload, rounds: int, with_mask: bool) -> list[Row]:
    out_dir = BENCH_DIR / "int8" / work.folder.name
    out_dir.mkdir(parents=True, exist_ok=True)
    reference = reference_outputs(work.model, work.eval)
    fp32 = Row("fp32", path=work.model, notes=["reference; fp32 run with optimizations off is the cosine baseline"])
    rows = [fp32]
    _measure(work, fp32, fp32, reference, rounds, with_mask)
    for name, quantize in CONTENDERS.items():
        row = Row(name, path=out_dir / _file_name(name))
        for stale in (row.path, row.path.with_suffix(".error.txt")):
            stale.unlink(missing_ok=True)
        print(f"[int8] {work.name}: {name} …", file=sys.stderr, flush=True)
        started = time.perf_counter()
        try:
            quantize(work, row.path, row)
        except NotApplicable:
            continue
        except Exception as exc:  # a peer may raise anything; the row records it
            rows.append(row)
            _fail(row, exc, row.path.with_suffix(".error.txt"))
            continue
        rows.append(row)
        if row.quantize_seconds is None:
            row.quantize_seconds = time.perf_counter() - started
            row.notes.append(f"quantized in {row.quantize_seconds:.1f} s (in this process)")
        try:
            _measure(work, row, fp32, reference, rounds, with_mask)
        except Exception as exc:  # a quantized model that does not run: the row records it
            _fail(row, exc, row.path.with_suffix(".error.txt"))
            continue
        degenerate = _degenerate_scales(row.path)
        if degenerate:
            row.notes.append(f"{len(degenerate)} quantization scales are infinite, NaN or zero "
                             f"(e.g. for `{degenerate[0]}`)")
        twin = next((r for r in rows[:-1] if r.sha256 == row.sha256), None)
        if twin is not None:
            row.notes.append(f"byte-identical to {twin.contender}")
    return rows


def _head_to_head(work: Workload, rows: list[Row], rounds: int, against: str) -> float | None:
    """graphopt / ``against`` median latency, interleaved directly (no fp32 in between)."""
    from graphopt.verify.latency import compare_interleaved

    ours, theirs = _row(rows, GRAPHOPT), _row(rows, against)
    if ours.session is None or theirs.session is None or ours.error or theirs.error:
        return None
    return compare_interleaved(theirs.session, ours.session, work.eval, threads=THREADS, rounds=rounds,
                               max_seconds=600.0).ratio


def _close_sessions(rows: list[Row]) -> None:
    for row in rows:
        row.session = None


def _row(rows: list[Row], name: str) -> Row:
    return next(r for r in rows if r.contender == name)


# --------------------------------------------------------------------------- Markdown


def _num(value: float | None, fmt: str) -> str:
    return "—" if value is None else format(value, fmt)


def _table(rows: list[Row], with_mask: bool) -> str:
    headers = ["contender", "size ×", "latency ×", "cosine mean", "cosine min"]
    headers += ["mask agreement"] if with_mask else []
    headers += ["notes"]
    body = []
    for row in rows:
        cells = [row.contender, _num(row.size_ratio, ".3f"), _num(row.latency_ratio, ".3f"),
                 _num(row.cosine_mean, ".5f"), _num(row.cosine_min, ".5f")]
        cells += [_num(row.mask_agreement, ".5f")] if with_mask else []
        notes = list(row.notes)
        if row.median_ms is not None:
            notes.insert(0, f"median {row.median_ms:.2f} ms vs fp32 {row.fp32_ms:.2f} ms")
        if row.error:
            notes.insert(0, f"**failed**: {row.error}")
        cells.append("; ".join(notes))
        body.append(cells)
    return markdown_table(headers, body)


def _verdict(ok: bool | None, what: str, measured: str) -> str:
    if ok is None:
        return f"- [ ] {what}: **not measured** ({measured})"
    return f"- [{'x' if ok else ' '}] {what}: **{'met' if ok else 'missed'}** ({measured})"


def _acceptance(rows: list[Row], bar: Acceptance, head_to_head: float | None) -> list[str]:
    """One line per criterion of issue #4; a criterion without a measurement is missed."""
    ours = _row(rows, GRAPHOPT)
    criteria: list[tuple[str, float | None, Callable[[float], bool], str]] = [
        (f"size ≤ {bar.max_size:.2f}×", ours.size_ratio, lambda v: v <= bar.max_size, "{:.3f}×"),
        (f"latency ≤ {bar.max_latency:.2f}× fp32", ours.latency_ratio, lambda v: v <= bar.max_latency, "{:.3f}×"),
    ]
    if bar.not_slower_than:
        theirs = _row(rows, bar.not_slower_than)
        fmt = (f"head-to-head graphopt / ORT = {{:.3f}}×; vs fp32 {_num(ours.latency_ratio, '.3f')}× and "
               f"{_num(theirs.latency_ratio, '.3f')}×")
        criteria.append((f"latency ≤ {bar.not_slower_than}", head_to_head, lambda v: v <= 1.0, fmt))
    if bar.min_cosine_mean is not None:
        criteria.append((f"cosine mean ≥ {bar.min_cosine_mean}", ours.cosine_mean,
                         lambda v: v >= bar.min_cosine_mean, "{:.5f}"))
    if bar.min_cosine_min is not None:
        criteria.append((f"cosine min ≥ {bar.min_cosine_min}", ours.cosine_min,
                         lambda v: v >= bar.min_cosine_min, "{:.5f}"))
    if bar.min_mask is not None:
        criteria.append((f"mask agreement ≥ {bar.min_mask}", ours.mask_agreement,
                         lambda v: v >= bar.min_mask, "{:.5f}"))
    if bar.max_quantize_seconds is not None:
        seconds = ours.quantize_seconds if not ours.error else None
        criteria.append((f"quantization ≤ {bar.max_quantize_seconds:.0f} s", seconds,
                         lambda v: v <= bar.max_quantize_seconds, "{:.1f} s wall, whole `graphopt optimize` command"))
    lines = []
    for what, value, holds, fmt in criteria:
        if value is not None:
            lines.append(_verdict(holds(value), what, fmt.format(value)))
        elif ours.error:
            lines.append(_verdict(False, what, f"graphopt row failed: {ours.error}"))
        else:
            theirs_error = _row(rows, bar.not_slower_than).error if bar.not_slower_than else None
            lines.append(_verdict(None, what, f"{bar.not_slower_than} failed: {theirs_error}"))
    return lines


def _model_section(title: str, work: Workload, data: str, rows: list[Row], bar: Acceptance,
                   head_to_head: float | None, with_mask: bool) -> str:
    parts = [f"### {title}", "", data]
    if work.prepared:
        parts += ["", f"Peers were given `{work.peer_input.name}`: {work.prepared}. graphopt and the size and "
                      f"latency ratios start from the original `{work.model.name}`."]
    parts += ["", _table(rows, with_mask), "", "Issue #4 acceptance (graphopt int8 row):", "",
              *_acceptance(rows, bar, head_to_head)]
    return "\n".join(parts)


# --------------------------------------------------------------------------- entry points


def _workload_section(title: str, build: Callable[[], Workload], describe: Callable[[Workload], str],
                      bar: Acceptance, rounds: int, *, with_mask: bool) -> str:
    try:
        work = build()
    except Exception as exc:  # the data or the peers' input could not be made: say so, go on
        traceback.print_exc(file=sys.stderr)
        return f"### {title}\n\n**Not run**: preparing the workload failed: {type(exc).__name__}: {one_line(str(exc))}"
    rows = _run_workload(work, rounds, with_mask)
    head_to_head = _head_to_head(work, rows, rounds, bar.not_slower_than) if bar.not_slower_than else None
    _close_sessions(rows)
    return _model_section(title, work, describe(work), rows, bar, head_to_head, with_mask)


def main(quick: bool = False) -> str:
    """Run both workloads; return the Markdown section for RESULTS.md."""
    rounds = QUICK_ROUNDS if quick else FULL_ROUNDS
    intro = [
        "## int8 quantization: graphopt vs onnxruntime and NNCF (issue #4)",
        "",
        f"Batch 1, {THREADS} onnxruntime threads, default session options with graph optimizations on. "
        f"Latency × is the candidate's median over fp32's, measured interleaved in blocks against the same "
        f"fp32 session ({rounds} timed runs each, first run of each block discarded). Cosine is per sample "
        f"against fp32 run with optimizations off; size × counts external data.",
    ]
    if quick:
        intro += ["", f"**Quick smoke run** ({QUICK_EVAL} eval samples at most, {rounds} rounds): "
                      "these numbers are not evidence."]
    minilm = _workload_section(
        "all-MiniLM-L6-v2 sentence embedding (sequence 128)",
        lambda: minilm_workload(QUICK_EVAL if quick else MINILM_EVAL),
        lambda w: f"Calibration: {len(w.calib)} `split=\"calib\"` sentences; evaluation: {len(w.eval)} "
                  f"`split=\"eval\"` sentences (disjoint).",
        MINILM_ACCEPTANCE, rounds, with_mask=False)
    ppocr = _workload_section(
        "PP-OCRv4 det (320×320 rendered text)",
        lambda: ppocr_workload(QUICK_EVAL if quick else PPOCR_EVAL),
        lambda w: f"Calibration: {len(w.calib)} rendered images (seed 100); evaluation: {len(w.eval)} others "
                  f"(seed 200). Mask agreement: fraction of pixels where (probability > {MASK_THRESHOLD}) "
                  f"agrees with fp32.",
        PPOCR_ACCEPTANCE, rounds, with_mask=True)
    return "\n\n".join(["\n".join(intro), minilm, ppocr]) + "\n"


def cli(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.bench_int8", description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help=f"{QUICK_EVAL} eval samples, {QUICK_ROUNDS} rounds")
    quick = parser.parse_args(argv).quick
    with contextlib.redirect_stdout(sys.stderr):  # the peers' progress bars; stdout carries the Markdown
        section = main(quick=quick)
    print(section)


if __name__ == "__main__":
    cli()
