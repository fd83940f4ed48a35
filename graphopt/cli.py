"""The `graphopt` command. Turns every error into one line on stderr and an exit code:
0 success, 1 a gate or parity budget failed, 2 bad input or usage, 3 internal error,
130 interrupted."""

from __future__ import annotations

import argparse
import contextlib
import logging
import signal
import sys
import threading
import time
import traceback
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple, NoReturn

from graphopt import __version__
from graphopt.errors import (
    EXIT_BAD_INPUT,
    EXIT_INTERNAL,
    EXIT_INTERRUPTED,
    EXIT_OK,
    GateFailed,
    GraphoptError,
    UsageError,
    require_extra,
)
from graphopt.cpu import TARGET_CPUS
from graphopt.verify.metrics import METRICS

if TYPE_CHECKING:  # the command line imports what a command needs when it runs
    from graphopt.report.records import ComparisonRecord, OptimizeRecord

logger = logging.getLogger("graphopt")


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        raise UsageError(f"{self.prog.removeprefix('graphopt').strip() or 'usage'}: {message} (see --help)")


def _add_common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("-q", "--quiet", action="store_true",
                        help="errors only on stderr (no progress, no warnings); on stdout nothing but what the "
                        "command exists to print when it writes no file (inspect, bench, recipes)")
    parser.add_argument("--debug", action="store_true", help="show tracebacks of errors")


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def _add_data(parser: argparse.ArgumentParser, *, labels: bool = True, threads: int | None = None,
              threads_help: str = "onnxruntime threads (default: all cores)") -> None:
    """The data a command runs the model on: --data, --batch-size, --shape, --threads, --seed and,
    where the data may hold labels, --labels."""
    parser.add_argument("--data", metavar="DATA", help=".npz (samples on axis 0), folder of .npz, or ONNX "
                        "test_data_set_* folder; default: seeded random inputs (weaker evidence)")
    parser.add_argument("--batch-size", type=_positive_int, default=1,
                        help="samples per run: stacked .npz, or the batch axis of random feeds (default 1)")
    parser.add_argument("--shape", action="append", default=[], metavar="NAME=D1,D2,...",
                        help="concrete shape of a dynamic input for random feeds (repeatable)")
    parser.add_argument("--threads", type=_positive_int, default=threads, help=threads_help)
    parser.add_argument("--seed", type=int, default=0, help="seed of random feeds (default 0)")
    if labels:
        parser.add_argument("--labels", metavar="KEY", help="an array in the .npz data that holds labels, not a "
                            "model input: it is left out of the feeds (and is what check --cv scores against)")


def _add_provider(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--provider", metavar="NAME", help="onnxruntime execution provider to run the candidate on "
                        "(default CPUExecutionProvider; the reference always runs on the CPU)")


def _add_thresholds(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("thresholds (each optional; only stated ones are checked)")
    group.add_argument("--min-cosine", type=float, help="mean per-sample cosine similarity to the base, at least")
    group.add_argument("--max-abs", type=float, help="largest absolute output difference, at most")
    group.add_argument("--min-top1", type=float, help="argmax agreement along the last axis, at least (class score "
                       "sequences: also the share of identical greedy-decoded sequences)")
    group.add_argument("--min-detections", type=float, help="detector outputs: share of the reference's detections "
                       "kept (same class, IoU >= 0.5; an appeared detection counts as one lost), at least")
    group.add_argument("--det-threshold", type=float, help="score a detection needs to count (default 0.25, "
                       "YOLO's own default)")
    group.add_argument("--max-latency-ratio", type=float, help="candidate/base median latency, at most")
    group.add_argument("--max-size-ratio", type=float, help="candidate/base file size, at most")


def _add_judging(parser: argparse.ArgumentParser, *, cross_validation: bool = False) -> None:
    """What optimize and check judge a model on: data, thresholds (the --cv gate for check), the
    decoder measures."""
    _add_data(parser)
    _add_thresholds(parser)
    if cross_validation:
        _add_cv_gate(parser)
    _add_decoder_gate(parser)


def _add_decoder_gate(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group(
        "decoder LLMs (model folders; --data is prose, a .txt file, cut into token windows)")
    group.add_argument("--prompts", metavar="FILE", help="JSON list of prompts for greedy continuations")
    group.add_argument("--window", type=_positive_int, default=128, help="tokens per text window (default 128)")
    group.add_argument("--windows", type=_positive_int, default=16, help="text windows scored, at most (default 16)")
    group.add_argument("--new-tokens", type=_positive_int, default=32,
                       help="greedy tokens per prompt (default 32)")
    group.add_argument("--max-ppl-ratio", type=float, help="candidate/base perplexity on the text, at most")
    group.add_argument("--min-token-agree", type=float, help="teacher-forced next-token agreement, at least")
    group.add_argument("--min-greedy-agree", type=float, help="greedy continuation token agreement, at least")
    group.add_argument("--max-decode-ratio", type=float,
                       help="candidate/base decode ms per token, at most (a decoder recipe without a text bound: "
                            "the most faithful model within it)")
    group.add_argument("--max-prefill-ratio", type=float, help="candidate/base prefill ms, at most")


def _decoder_check(args: argparse.Namespace) -> dict[str, Any]:
    from graphopt.api import check_decoder

    if args.data is None:
        raise UsageError("check: decoder folders are judged on text: give --data PROSE.txt")
    return check_decoder(args.base, args.candidate, data=args.data, prompts=args.prompts, window=args.window,
                         windows=args.windows, new_tokens=args.new_tokens, latency=args.latency, threads=args.threads,
                         max_ppl_ratio=args.max_ppl_ratio, min_token_agree=args.min_token_agree,
                         min_greedy_agree=args.min_greedy_agree, max_decode_ratio=args.max_decode_ratio,
                         max_prefill_ratio=args.max_prefill_ratio, max_size_ratio=args.max_size_ratio)


def _decoder_text(args: argparse.Namespace) -> Any:
    """optimize --data PROSE.txt on a decoder: how it is judged as a text generator (or None)."""
    from graphopt.verify.text import DecoderText
    from graphopt.verify.text import DecoderThresholds

    asked = args.prompts or any(getattr(args, name) is not None for name in _DECODER_FLAGS)
    data = args.data
    if data is None and asked:  # judged on the bundled corpus, as the int4 recipe's own budget is
        from graphopt.samples import SENTENCES_FILE

        data = SENTENCES_FILE
    if data is None or not str(data).endswith(".txt"):
        if asked:
            raise UsageError(f"{data}: the decoder measures are judged on prose: give --data PROSE.txt")
        return None
    return DecoderText(data=data, prompts=args.prompts, window=args.window, windows=args.windows,
                       new_tokens=args.new_tokens, thresholds=DecoderThresholds(
                           **{name: getattr(args, name) for name in _DECODER_FLAGS}))


_DECODER_FLAGS = ("max_ppl_ratio", "min_token_agree", "min_greedy_agree", "max_decode_ratio", "max_prefill_ratio")


def _thresholds(args: argparse.Namespace) -> Any:
    from graphopt.verify.gate import Thresholds

    return Thresholds(
        min_cosine=args.min_cosine,
        max_abs=args.max_abs,
        min_top1=args.min_top1,
        min_detections=args.min_detections,
        det_threshold=args.det_threshold,
        max_latency_ratio=args.max_latency_ratio,
        max_size_ratio=args.max_size_ratio,
    )


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="graphopt", description="Compress, verify and package ONNX models.")
    parser.add_argument("--version", action="version", version=f"graphopt {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    for command in _SUBCOMMANDS:
        p = sub.add_parser(command.name, help=command.help, description=command.description)
        command.add_arguments(p)
        _add_common(p)
        p.set_defaults(func=command.run)
    return parser


def _add_inspect_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model")
    p.add_argument("--json", dest="json_out", nargs="?", const="-", metavar="FILE",
                   help="write the description as JSON to FILE (bare --json: to stdout)")


def _add_optimize_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model")
    p.add_argument("-o", "--output", required=True, help="output .onnx (never the input)")
    p.add_argument("--recipe", default="lossless", help="built-in recipe name or a .toml file (default lossless)")
    p.add_argument("--report", "--json", dest="report", metavar="FILE", help="write the JSON report here")
    p.add_argument("--html", metavar="FILE", help="per-layer precision page with a sensitivity chart "
                   "(measures every int8 layer's sensitivity: one model build and run per layer)")
    p.add_argument("--layers-markdown", metavar="FILE", help="per-layer precision table in Markdown (as --html)")
    p.add_argument("--calib", metavar="DATA", help="calibration data (any --data format) for quantization recipes; "
                   "decoder LLMs: prose (.txt)")
    p.add_argument("--cache-dir", help="per-machine speed profile cache (default ~/.cache/graphopt)")
    p.add_argument("--latency", action=argparse.BooleanOptionalAction, default=True,
                   help="measure before/after latency (default: on; --no-latency skips it)")
    p.add_argument("--exclude", action="append", default=[], metavar="PATTERN",
                   help="leave nodes alone in every quantizing, pruning and factorizing pass: a glob over node "
                   "names, op types (e.g. Conv) or weight names (repeatable)")
    p.add_argument("--fix-shape", action="append", default=[], metavar="NAME=D1,D2,...",
                   help="write the model with this static input shape (verified on data of that shape; repeatable)")
    p.add_argument("--external-data", action=argparse.BooleanOptionalAction, default=None,
                   help="store weights in OUTPUT.data (default: as the input, or above ~1.8 GB)")
    p.add_argument("--target-cpu", choices=TARGET_CPUS, default=None,
                   help="the x86 CPU the model is for: int8 weights exact on it (avx2: no VNNI, where uint8 x int8 "
                   "products saturate; vnni: AVX-VNNI, AVX-512 VNNI or AMX); default: this machine's")
    _add_judging(p)


def _add_check_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("base")
    p.add_argument("candidate")
    p.add_argument("--latency", action=argparse.BooleanOptionalAction, default=None,
                   help="measure latency (default: only when --max-latency-ratio is given)")
    _add_provider(p)
    p.add_argument("--json", dest="json_out", metavar="FILE", help="write the JSON report")
    p.add_argument("--junit", metavar="FILE", help="write JUnit XML (one testcase per threshold)")
    p.add_argument("--markdown", metavar="FILE", help="write a Markdown summary for a pull request")
    _add_judging(p, cross_validation=True)


def _add_bench_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model")
    p.add_argument("--runs", type=_positive_int, default=100, help="timed runs (default 100, at most 30 s)")
    p.add_argument("--warmup", type=int, default=5)
    _add_provider(p)
    p.add_argument("--json", dest="json_out", metavar="FILE", help="write the result as JSON")
    _add_data(p)


def _add_package_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model")
    p.add_argument("-o", "--output", required=True, help="bundle.zip, or a folder (never the input)")
    p.add_argument("--target", help="built-in target name or a .toml file: operator allow-list, opset range")
    p.add_argument("--optimize-report", "--report", dest="optimize_report", metavar="FILE",
                   help="the JSON report `optimize` wrote for MODEL, embedded in the manifest "
                   "(--report: the old spelling, still accepted)")
    p.add_argument("--max-abs", type=float, default=1e-4,
                   help="largest .ort vs .onnx output difference, at most (default 1e-4)")
    _add_data(p, labels=False, threads=1, threads_help="onnxruntime threads of the verification (default 1, so "
              "the manifest does not depend on the machine's core count)")


def _add_evaluate_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model")
    p.add_argument("--data", required=True, metavar="DATA.npz",
                   help=".npz: one array per model input plus the labels, samples on axis 0")
    p.add_argument("--labels", metavar="KEY", help="the labels' array in --data (integers; not needed for cosine)")
    split = p.add_mutually_exclusive_group(required=True)
    split.add_argument("--holdout", type=float, metavar="FRACTION", help="one shuffled split holding out FRACTION")
    split.add_argument("--folds", type=int, metavar="K", help="K-fold cross-validation")
    order = p.add_mutually_exclusive_group()
    order.add_argument("--stratified", action="store_true", help="keep the class ratios in every part")
    order.add_argument("--cyclic", action="store_true", help="K contiguous folds in data order (with --folds)")
    against = p.add_mutually_exclusive_group(required=True)
    against.add_argument("--recipe", help="compress in each fold with this recipe (name or .toml)")
    against.add_argument("--candidate", metavar="MODEL", help="compare with this given model")
    p.add_argument("--metric", default="accuracy", choices=METRICS,
                   help="accuracy / top5 (argmax over the last axis), macro f1, or cosine to the base "
                   "per sample (default accuracy)")
    p.add_argument("--output", metavar="NAME", help="model output to score (default: the first)")
    p.add_argument("--json", dest="json_out", metavar="FILE", help="write the result as JSON (format: README)")
    p.add_argument("--seed", type=int, default=0, help="seed of the split and the bootstrap (default 0)")
    p.add_argument("--batch-size", type=_positive_int, default=64, help="samples per run (default 64)")
    p.add_argument("--resamples", type=_positive_int, default=2000, help="bootstrap resamples (default 2000)")
    p.add_argument("--threads", type=_positive_int, default=None, help="onnxruntime threads (default: all cores)")
    p.add_argument("--cache-dir", help="per-machine speed profile cache (default ~/.cache/graphopt)")


def _add_distill_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", help="TOML naming teacher, student and data factories (package.module:function)")


def _add_export_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("source", help="a Hugging Face model folder or a .gguf file")
    p.add_argument("-o", "--output", required=True, metavar="DIR", help="the model folder to write (new or empty)")
    p.add_argument("--task", choices=["text-generation"], default="text-generation",
                   help="what the model does (default and only: text-generation, from the config)")
    p.add_argument("--no-fuse", dest="fuse", action="store_false",
                   help="keep attention, rotary and norms as plain ONNX ops (no onnxruntime contrib kernels)")
    p.add_argument("--max-abs", type=float, default=1e-3, help="largest logit difference to torch (default 1e-3)")
    p.add_argument("--prompts", metavar="FILE", help="JSON list of prompts to verify on (default: 16 built in)")
    p.add_argument("--decode-steps", type=_positive_int, default=32, help="cached greedy steps per prompt (default 32)")
    p.add_argument("--allow-pickle", action="store_true", help="load pickled weights (pytorch_model.bin) with torch's "
                   "weights_only loader; without it a folder with only pickled weights is refused (exit 2)")
    p.add_argument("--threads", type=_positive_int, help="onnxruntime threads (default: all cores)")
    p.add_argument("--json", dest="json_out", metavar="FILE", help="also write the export report here")


def _add_generate_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("folder", help="a model folder graphopt export (or optimize) wrote")
    p.add_argument("--prompt", required=True, help="the text to continue")
    p.add_argument("--max-new-tokens", type=_positive_int, default=64, help="at most this many tokens (default 64)")
    p.add_argument("--no-stop", dest="stop", action="store_false", help="do not stop at the end-of-sequence token")
    p.add_argument("--threads", type=_positive_int, help="onnxruntime threads (default: all cores)")


def _add_recipes_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("name", nargs="?", help="a built-in recipe (prints its TOML) or a pass (prints its options)")


# -- commands -------------------------------------------------------------------------------


def cmd_inspect(args: argparse.Namespace) -> int:
    from graphopt.io import load_model, to_json, write_text
    from graphopt.report.inspection import describe, format_text

    if args.json_out not in (None, "-"):
        _check_output_folders(args.json_out)
    info = describe(load_model(args.model))
    if args.json_out == "-":
        sys.stdout.write(to_json(info.to_dict()))
    elif args.json_out:
        write_text(args.json_out, to_json(info.to_dict()))
    if args.json_out != "-" and not (args.quiet and args.json_out):
        sys.stdout.write(format_text(info) + "\n")
    return EXIT_OK


def cmd_optimize(args: argparse.Namespace) -> int:
    from graphopt.optimize import OptimizeOptions, optimize
    from graphopt.verify.feeds import parse_shape_overrides

    text = _decoder_text(args)
    options = OptimizeOptions(
        recipe=args.recipe,
        data=None if text else args.data,
        text=text,
        calib=args.calib,
        cache_dir=args.cache_dir,
        batch_size=args.batch_size,
        shapes=parse_shape_overrides(args.shape),
        thresholds=_thresholds(args),
        measure_latency=args.latency,
        threads=args.threads,
        external_data=args.external_data,
        seed=args.seed,
        labels=args.labels,
        exclude=tuple(args.exclude),
        fix_shapes=tuple(args.fix_shape),
        analyze=bool(args.html or args.layers_markdown),
        target_cpu=args.target_cpu,
    )
    _refuse_same_path(args.model, args.output)
    _check_output_folders(None if Path(args.model).is_dir() else args.output, args.report, args.html,
                          args.layers_markdown)
    try:
        report = optimize(args.model, args.output, options).to_dict()
    except GateFailed as exc:
        if exc.report:
            record = _write_optimize_reports(args, exc.report)
            if not args.quiet:  # the same numbers and PASS/FAIL table a failed `check` prints
                print(_verification_text(record.verification))
        raise
    record = _write_optimize_reports(args, report)
    if not args.quiet:
        print(_optimize_summary(record))
        print(_verification_text(record.verification))
    return EXIT_OK


def _write_optimize_reports(args: argparse.Namespace, report: dict[str, Any]) -> OptimizeRecord:
    """The JSON report and the pages made from it; returns the report's record."""
    from graphopt.io import to_json, write_text
    from graphopt.report.layers import layers_html, layers_markdown
    from graphopt.report.records import OptimizeRecord, to_record

    if args.report:
        write_text(args.report, to_json(report))
    record = to_record(OptimizeRecord, report)
    if args.html:
        write_text(args.html, layers_html(record))
    if args.layers_markdown:
        write_text(args.layers_markdown, layers_markdown(record))
    return record


def _verification_text(verification: ComparisonRecord) -> str:
    """Each output's numbers (where parity was measured) and the PASS/FAIL table."""
    from graphopt.report.checks import checks_text, outputs_text

    return "\n".join(([outputs_text(verification.parity)] if verification.parity else [])
                     + [checks_text(verification.checks)])


def _refuse_same_path(model: str, output: str) -> None:
    if Path(model).resolve() == Path(output).resolve():
        raise UsageError(f"{output}: output path equals the input; choose another -o")


def _optimize_summary(report: OptimizeRecord) -> str:
    """What was written, its parity, text measures and latency."""
    from graphopt.report.checks import decoder_text
    from graphopt.report.layers import precision_table

    verification, data, parity = report.verification, report.verification.data, report.verification.parity
    lines = [
        f"wrote {report.output}: {report.output_bytes:,} bytes "
        f"({report.output_bytes / report.input_bytes:.3f}× of {report.input_bytes:,}) "
        f"with recipe '{report.recipe.name}' in {report.seconds:.1f}s",
        f"parity on {data.samples} samples ({data.source}): "
        f"max abs {parity.max_abs:.3g}, cosine mean {parity.cosine_mean:.6f}"
        + (f", top-1 agreement {parity.top1:.6f}" if parity.top1 is not None else ""),
    ]
    if verification.text:
        lines.append(decoder_text(verification.text))
    table = precision_table(report)
    if table is not None and table.float_layers:
        lines.append(f"left in float for accuracy: {len(table.float_layers)} layer(s) (see the report's steps)")
    if report.retreats:
        lines.append(f"the final verification sent the search {report.retreats} step(s) further down its ladder")
    lat = verification.latency
    if lat:
        lines.append(f"latency: {lat.a.median_ms:.2f} ms → {lat.b.median_ms:.2f} ms "
                     f"(ratio {lat.ratio:.3f}, {_count(lat.threads, 'thread')}, interleaved)")
    return "\n".join(lines)


def _count(number: int, noun: str) -> str:
    return f"{number} {noun}" + ("" if number == 1 else "s")


def _check_output_folders(*paths: str | None) -> None:
    """Every file a command will write, checked before any work starts (not after minutes of
    quantization): its folder exists and it is not itself a folder."""
    for path in paths:
        if not path:
            continue
        if not Path(path).parent.is_dir():
            raise UsageError(f"{path}: folder {Path(path).parent} does not exist")
        if Path(path).is_dir():
            raise UsageError(f"{path}: is a folder; give a file name to write")


def cmd_check(args: argparse.Namespace) -> int:
    from graphopt.api import check
    from graphopt.evaluate import cross_validated_gate
    from graphopt.verify.feeds import parse_shape_overrides

    started = time.perf_counter()
    _check_output_folders(args.json_out, args.junit, args.markdown)
    decoder_flags = (args.prompts, args.max_ppl_ratio, args.min_token_agree, args.min_greedy_agree,
                     args.max_decode_ratio, args.max_prefill_ratio)
    text = args.data is not None and str(args.data).endswith(".txt")
    if (Path(args.base).is_dir() or Path(args.candidate).is_dir()) and (text or any(
            flag is not None for flag in decoder_flags)):  # decoder LLM folders, judged on text
        try:
            data, failure = _decoder_check(args), None
        except GateFailed as exc:
            data, failure = exc.report, exc
        return _check_reports(args, data, failure, started)
    cv_checks, cv_result = cross_validated_gate(
        args.base, args.candidate, args.data, folds=args.cv, max_drop=args.max_drop, metric=args.metric,
        labels=args.labels, seed=args.seed, batch_size=args.batch_size, threads=args.threads)
    thresholds = _thresholds(args)
    try:
        data = check(args.base, args.candidate, data=args.data, labels=args.labels, latency=args.latency,
                     threads=args.threads, batch_size=args.batch_size, shapes=parse_shape_overrides(args.shape),
                     seed=args.seed, extra_checks=cv_checks, provider=args.provider, **thresholds.stated())
        failure = None
    except GateFailed as exc:
        data, failure = exc.report, exc
    if cv_result is not None:
        data["cross_validation"] = cv_result.to_dict()
    return _check_reports(args, data, failure, started)


def _check_reports(args: argparse.Namespace, data: dict[str, Any], failure: GateFailed | None, started: float) -> int:
    from graphopt.io import to_json, write_text
    from graphopt.report.checks import check_markdown, checks_text, decoder_text, junit_xml, outputs_text
    from graphopt.report.records import DecoderComparisonRecord, comparison_record

    if args.json_out:
        write_text(args.json_out, to_json(data))
    result = comparison_record(data)
    if args.junit:
        write_text(args.junit, junit_xml(result.checks, suite="graphopt.check", seconds=time.perf_counter() - started))
    if args.markdown:
        write_text(args.markdown, check_markdown(result))
    if not args.quiet:
        if isinstance(result, DecoderComparisonRecord):
            print(decoder_text(result))
        else:
            print(outputs_text(result.parity))
        print(checks_text(result.checks))
    if failure is not None:
        raise failure
    if not args.quiet:
        print(f"check passed ({len(result.checks)} checks, {result.data.samples} samples"
              + (", random inputs" if result.data.synthetic else "") + ")")
    return EXIT_OK


def cmd_bench(args: argparse.Namespace) -> int:
    from graphopt.api import bench
    from graphopt.io import to_json, write_text
    from graphopt.report.records import BenchRecord, to_record
    from graphopt.verify.feeds import parse_shape_overrides

    _check_output_folders(args.json_out)
    result = bench(args.model, data=args.data, labels=args.labels, runs=args.runs, warmup=args.warmup,
                   threads=args.threads, batch_size=args.batch_size, shapes=parse_shape_overrides(args.shape),
                   seed=args.seed, provider=args.provider)
    if args.json_out:
        write_text(args.json_out, to_json(result))
    if args.quiet and args.json_out:
        return EXIT_OK
    timing = to_record(BenchRecord, result)
    peak_text = f", peak RSS {timing.peak_rss_mib:.0f} MiB" if timing.peak_rss_mib else ""
    print(f"{Path(timing.model).name}: median {timing.median_ms:.3f} ms, p90 {timing.p90_ms:.3f} ms over "
          f"{timing.runs} runs ({_count(timing.threads, 'thread')}{peak_text}; {timing.data.source})")
    return EXIT_OK


def cmd_package(args: argparse.Namespace) -> int:
    from graphopt.package import PackageOptions, package
    from graphopt.verify.feeds import parse_shape_overrides

    options = PackageOptions(
        data=args.data,
        batch_size=args.batch_size,
        shapes=parse_shape_overrides(args.shape),
        seed=args.seed,
        threads=args.threads,
        max_abs=args.max_abs,
        target=args.target,
        report=args.optimize_report,
    )
    manifest = package(args.model, args.output, options)
    if not args.quiet:
        verification, data = manifest.verification, manifest.verification.data
        print(f"wrote {args.output}: manifest.json, {', '.join(f.path for f in manifest.files)}")
        print(f"{manifest.names.ort} matches {manifest.model.file}: max abs "
              f"{verification.parity.max_abs:.3g} (budget {verification.max_abs_budget:.3g}) on {data.samples} samples"
              + (" of random inputs" if data.synthetic else f" from {data.source}"))
    return EXIT_OK


def _add_cv_gate(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group(
        "cross-validated gate (graphopt evaluate --candidate inside check)",
        "With --cv K and --max-drop X, the check fails only when the drop exceeds the budget with "
        "confidence: when the upper bound of the 95% paired bootstrap interval of (candidate - base) "
        "--metric, over K folds of --data, is below -X.")
    group.add_argument("--cv", type=int, metavar="K", help="K-fold cross-validated metric gate (needs --max-drop)")
    group.add_argument("--max-drop", type=float, metavar="X", help="largest tolerated metric drop, e.g. 0.01")
    group.add_argument("--metric", default="accuracy", choices=METRICS,
                       help="metric of the --cv gate (default accuracy)")


def cmd_evaluate(args: argparse.Namespace) -> int:
    from graphopt.evaluate import EvaluateOptions, evaluate
    from graphopt.io import to_json, write_text
    from graphopt.report.evaluation import evaluation_text

    _check_output_folders(args.json_out)
    options = EvaluateOptions(
        labels=args.labels, holdout=args.holdout, folds=args.folds, stratified=args.stratified,
        cyclic=args.cyclic, recipe=args.recipe, candidate=args.candidate, metric=args.metric,
        output=args.output, seed=args.seed, batch_size=args.batch_size, threads=args.threads,
        cache_dir=args.cache_dir, resamples=args.resamples,
    )
    result = evaluate(args.model, args.data, options)
    if args.json_out:
        write_text(args.json_out, to_json(result.to_dict()))
    if not args.quiet:
        print(evaluation_text(result))
    return EXIT_OK


def cmd_distill(args: argparse.Namespace) -> int:
    require_extra("torch", extra="torch", purpose="distill")
    from graphopt.report.records import DistillRecord, to_record
    from graphopt.torch.config import run_config

    report = to_record(DistillRecord, run_config(args.config, quiet=args.quiet))
    if not args.quiet and report.outputs is not None and report.export is not None:
        distill = report.distill
        print(f"distilled {report.teacher_params:,} → {report.student_params:,} parameters in "
              f"{len(distill.history)} epochs ({distill.stopped})"
              + (f"; best validation {distill.metric} {distill.best_metric:.4f}"
                 if distill.best_metric is not None else ""))
        print(f"wrote {report.outputs.state_dict} and {report.export.path} "
              f"({report.export.exporter}, max abs {report.export.parity.max_abs:.3g} vs torch)")
    return EXIT_OK


def cmd_export(args: argparse.Namespace) -> int:
    require_extra("torch", extra="llm", purpose="export")
    require_extra("transformers", extra="llm", purpose="export")
    from graphopt.io import to_json, write_text
    from graphopt.report.records import DecoderExportRecord, to_record
    from graphopt.torch.decoder import DecoderExportOptions, export_decoder
    from graphopt.verify.text import load_prompts

    options = DecoderExportOptions(fuse=args.fuse, max_abs=args.max_abs, decode_steps=args.decode_steps,
                                   threads=args.threads, allow_pickle=args.allow_pickle, **({"prompts": tuple(load_prompts(args.prompts))} if args.prompts else {}))
    report = export_decoder(args.source, args.output, options)
    if args.json_out:
        write_text(args.json_out, to_json(report))
    if not args.quiet:
        exported = to_record(DecoderExportRecord, report)
        parity = exported.parity
        fused = ", ".join(f"{n} {op.removesuffix(' nodes')}" for op, n in exported.fusion.changes.items()) or "none"
        print(f"wrote {exported.output}: {exported.architecture}, {exported.layers} layers, fused: {fused}")
        print(f"vs torch on {parity.prompts} prompts: logits max abs {parity.prefill_max_abs:.3g} (prefill), "
              f"{parity.decode_max_abs:.3g} ({parity.decode_steps} cached steps); greedy identical on "
              f"{parity.greedy_identical} of {parity.prompts}"
              + (f", {len(parity.forks)} fork(s) at near ties" if parity.forks else ""))
    return EXIT_OK


def cmd_generate(args: argparse.Namespace) -> int:
    from graphopt.generate import generate

    for piece in generate(args.folder, args.prompt, max_new_tokens=args.max_new_tokens, threads=args.threads,
                          stop=args.stop):
        sys.stdout.write(piece)
        sys.stdout.flush()
    sys.stdout.write("\n")
    return EXIT_OK


def cmd_recipes(args: argparse.Namespace) -> int:
    from graphopt.passes import available_passes, get_pass
    from graphopt.presets import builtin_text
    from graphopt.recipe import builtin_recipes, load_recipe

    if args.name in builtin_recipes():
        sys.stdout.write(builtin_text("graphopt.recipes", args.name))
        return EXIT_OK
    if args.name is not None:
        if args.name not in available_passes():
            raise UsageError(f"recipes: '{args.name}' is neither a built-in recipe ({', '.join(builtin_recipes())}) "
                             f"nor a pass ({', '.join(available_passes())})")
        print(_pass_options(get_pass(args.name)))
        return EXIT_OK
    print("recipes:")
    for name in builtin_recipes():
        recipe = load_recipe(name)
        print(f"  {name:<16} {' → '.join(p.name for p in recipe.passes)}: {recipe.description}")
    print("passes:")
    for name in available_passes():
        print(f"  {name:<16} {get_pass(name).summary}")
    print("`graphopt recipes NAME` prints a recipe's TOML or a pass's options.")
    return EXIT_OK


def _pass_options(cls: Any) -> str:
    """A pass's options as a recipe writes them, each with its type, default and meaning."""
    import dataclasses
    import typing

    from graphopt.passes.base import option_docs

    hints = typing.get_type_hints(cls.Options)
    docs = option_docs(cls.Options)
    lines = [f"{cls.name}: {cls.summary}", "", "[[steps]]", f'pass = "{cls.name}"']
    for field in dataclasses.fields(cls.Options):
        default = field.default if field.default is not dataclasses.MISSING else field.default_factory()
        hint = hints[field.name]
        kind = ("one of " + "|".join(map(str, typing.get_args(hint)))) if typing.get_origin(hint) is typing.Literal \
            else getattr(hint, "__name__", str(hint).replace("typing.", ""))
        doc = " ".join(docs.get(field.name, "").split())
        lines.append(f"# {field.name} = {_toml_value(default)}  ({kind})" + (f": {doc}" if doc else ""))
    return "\n".join(lines)


def _toml_value(value: Any) -> str:
    import json

    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (tuple, list)):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    return json.dumps(value) if isinstance(value, str) else repr(value)


# -- entry point ----------------------------------------------------------------------------


class _Subcommand(NamedTuple):
    name: str
    help: str
    add_arguments: Callable[[argparse.ArgumentParser], None]  # all but the common options
    run: Callable[[argparse.Namespace], int]
    description: str | None = None


# The subcommands, in the order --help lists them.
_SUBCOMMANDS = (
    _Subcommand("inspect", "signature, opsets, ops, parameters, output kinds and files of a model",
                _add_inspect_arguments, cmd_inspect),
    _Subcommand("optimize", "run a recipe of passes, verify the result, write it", _add_optimize_arguments,
                cmd_optimize),
    _Subcommand("check", "CI gate: compare a candidate with its base against thresholds", _add_check_arguments,
                cmd_check),
    _Subcommand("bench", "latency of one model in onnxruntime", _add_bench_arguments, cmd_bench),
    _Subcommand("package", "edge bundle: .onnx, verified .ort, operator config, manifest", _add_package_arguments,
                cmd_package),
    _Subcommand("evaluate", "cross-validated cost of compression on labelled data (folds, CI, McNemar)",
                _add_evaluate_arguments, cmd_evaluate,
                description="Score MODEL and its compressed form (or --candidate) on held-out parts of labelled "
                "data. With --recipe, each fold compresses the model calibrated and verified on its training part "
                "only. Reports per-fold metrics, mean ± std, the paired difference (candidate − base) with a 95% "
                "bootstrap interval, and McNemar's test."),
    _Subcommand("distill", "torch: distill a student from a teacher, export it with parity (needs the torch extra)",
                _add_distill_arguments, cmd_distill),
    _Subcommand("export", "torch: a causal LM (Hugging Face folder or .gguf) → an ONNX decoder folder with a KV "
                "cache, verified against torch (needs the llm extra)", _add_export_arguments, cmd_export),
    _Subcommand("generate", "greedy continuation of a prompt from a decoder folder, streamed",
                _add_generate_arguments, cmd_generate),
    _Subcommand("recipes", "list built-in recipes and passes; with NAME, a recipe's TOML or a pass's options",
                _add_recipes_arguments, cmd_recipes),
)


def _configure_logging(quiet: bool) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_Formatter())
    logger.handlers[:] = [handler]
    logger.setLevel(logging.ERROR if quiet else logging.INFO)
    logger.propagate = False
    # Libraries underneath (onnx-ir, onnxsim) log warnings of their own; without a root
    # handler Python would print them raw. graphopt's report says what matters.
    logging.getLogger().addHandler(logging.NullHandler())


class _Formatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        prefix = "graphopt: warning: " if record.levelno >= logging.WARNING else "graphopt: "
        return prefix + record.getMessage()


def _one_line(text: str) -> str:
    return " ".join(text.split()) or "unknown error"


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    try:
        args = build_parser().parse_args(argv)
        _configure_logging(args.quiet)
        func: Callable[[argparse.Namespace], int] = args.func
        with _sigterm_as_interrupt():
            _import_native_libraries(args.command)
            return func(args)
    except GraphoptError as exc:
        return _fail(exc, f"graphopt: {_one_line(str(exc))}", exc.exit_code, debug)
    except KeyboardInterrupt:
        print("graphopt: interrupted; nothing was written", file=sys.stderr)
        return EXIT_INTERRUPTED
    except OSError as exc:
        where = f"{exc.filename}: " if exc.filename else ""
        return _fail(exc, f"graphopt: {where}{exc.strerror or exc}", EXIT_BAD_INPUT, debug)
    except MemoryError as exc:
        return _fail(exc, "graphopt: out of memory", EXIT_INTERNAL, debug)
    except Exception as exc:  # the last line of defence: a bug must still be one line
        return _fail(exc, f"graphopt: internal error: {type(exc).__name__}: {_one_line(str(exc))[:300]} "
                     "(rerun with --debug for the traceback)", EXIT_INTERNAL, debug)


def _import_native_libraries(command: str) -> None:
    """Import the native extensions the command uses with Ctrl-C held back until they are
    complete: a KeyboardInterrupt raised while onnx initializes makes the interpreter crash with
    SIGSEGV at exit (about half of the attempts), and one inside onnxruntime's turns into an
    ImportError (exit 3), instead of exiting 130."""
    if threading.current_thread() is not threading.main_thread():
        return
    held: list[int] = []
    previous = {sig: signal.signal(sig, lambda signum, frame: held.append(signum))
                for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        import numpy  # noqa: F401
        import onnx  # noqa: F401
        import onnx_ir  # noqa: F401

        if command not in ("inspect", "recipes"):
            import onnxruntime  # noqa: F401
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    if held:
        raise KeyboardInterrupt


@contextlib.contextmanager
def _sigterm_as_interrupt() -> Iterator[None]:
    """A CI runner's cancel and `timeout` send SIGTERM: clean up and exit as for Ctrl-C."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def interrupt(signum: int, frame: Any) -> NoReturn:
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _fail(exc: BaseException, line: str, code: int, debug: bool) -> int:
    if debug:
        traceback.print_exception(exc, file=sys.stderr)
    print(line, file=sys.stderr)
    return code


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
