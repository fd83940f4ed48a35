"""How a comparison went, for CI systems and people: JUnit XML, Markdown, plain text."""

from __future__ import annotations

import xml.etree.ElementTree as ET
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from graphopt.report.records import (
    ComparisonRecord,
    DecoderComparisonRecord,
    ParitySummary,
    comparison_record,
    to_record,
)
from graphopt.verify.gate import CheckResult
from graphopt.verify.parity import OutputParity


def _fmt(value: float | None) -> str:
    if value is None:
        return "—"
    return f"{value:.6g}"


def junit_xml(checks: list[CheckResult], *, suite: str, seconds: float = 0.0) -> str:
    """One testcase per check; a failed check carries its measured value in <failure>."""
    failed = [c for c in checks if not c.passed]
    suites = ET.Element("testsuites", tests=str(len(checks)), failures=str(len(failed)), errors="0",
                        time=f"{seconds:.3f}")
    node = ET.SubElement(suites, "testsuite", name=suite, tests=str(len(checks)), failures=str(len(failed)),
                         errors="0", skipped="0", time=f"{seconds:.3f}")
    for check in checks:
        case = ET.SubElement(node, "testcase", classname=suite, name=check.name, time="0")
        if not check.passed:
            failure = ET.SubElement(case, "failure", message=check.message, type="ThresholdFailed")
            failure.text = f"measured={_fmt(check.measured)} threshold={_fmt(check.threshold)}: {check.message}"
    ET.indent(suites)
    return '<?xml version="1.0" encoding="UTF-8"?>\n' + ET.tostring(suites, encoding="unicode") + "\n"


def _check_rows(checks: Sequence[CheckResult]) -> list[str]:
    return ["| check | measured | threshold | result |", "|---|---|---|---|",
            *(f"| {check.name} | {_fmt(check.measured)} | {_fmt(check.threshold)} | "
              f"{'pass' if check.passed else '**FAIL**'} |" for check in checks)]


def check_markdown(comparison: ComparisonRecord | DecoderComparisonRecord | Mapping[str, Any]) -> str:
    """A pull-request comment: verdict, the checks, and the headline numbers, of `check`'s result
    (its record, or its JSON)."""
    if isinstance(comparison, Mapping):
        comparison = comparison_record(comparison)
    if isinstance(comparison, DecoderComparisonRecord):
        return decoder_markdown(comparison)
    verdict = "✅ passed" if comparison.passed else "❌ failed"
    data = comparison.data
    lines = [
        f"### graphopt check: {verdict}",
        "",
        f"`{Path(comparison.candidate).name}` against `{Path(comparison.base).name}` "
        f"on {data.samples} samples from {data.source}"
        + (" — **random inputs, weaker evidence**" if data.synthetic else ""),
        "",
        *_check_rows(comparison.checks),
        "",
        "| output | kind | judged by | value | max abs | cosine mean | top-1 |",
        "|---|---|---|---|---|---|---|",
    ]
    for out in comparison.parity.outputs if comparison.parity else []:
        label, value = headline(out)
        lines.append(
            f"| {out.name} | {out.kind or '—'} | {label} | {_fmt(value)} | {_fmt(out.max_abs)} | "
            f"{_fmt(out.cosine_mean)} | {_fmt(out.top1)} |"
        )
    lines.append("")
    lines.append(f"Size: {comparison.candidate_bytes:,} / {comparison.base_bytes:,} bytes "
                 f"(ratio {comparison.size_ratio:.3f}).")
    lat = comparison.latency
    if lat is not None:
        lines.append(f"Latency (median, interleaved, {lat.threads} thread{'' if lat.threads == 1 else 's'}): "
                     f"{lat.b.median_ms:.2f} ms vs {lat.a.median_ms:.2f} ms (ratio {lat.ratio:.3f}).")
    return "\n".join(lines) + "\n"


def headline(out: OutputParity) -> tuple[str, float | None]:
    """The number a user of one output looks at (``verify.parity.OutputParity.metric``)."""
    if out.detections_kept is not None:
        return "detections kept", out.detections_kept
    if out.sequences_same is not None:
        return "decoded sequences identical", out.sequences_same
    if out.top1 is not None:
        return "top-1 agreement", out.top1
    if out.across_samples:
        return "cosine across samples", out.cosine_mean
    if out.constant_share:
        return "cosine on what varies", out.cosine_mean
    return "cosine", out.cosine_mean


def outputs_text(parity: ParitySummary) -> str:
    """One line per output: its kind, how it is judged, and the numbers behind the verdict."""
    lines = []
    for out in parity.outputs:
        if out.shape_mismatch:
            lines.append(f"  {out.name}: shape {out.shape_mismatch}")
            continue
        label, value = headline(out)
        extra = []
        if out.detections_kept is not None:
            extra.append(f"{out.detections_reference} in the reference, {out.detections_appeared} appeared, "
                         f"largest score change {_fmt(out.largest_score_change)}")
        if out.sequences_same is not None:
            extra.append(f"{out.sequences} sequences, top-1 {_fmt(out.top1)}"
                         + (f", {out.top1_ties} near-ties forgiven" if out.top1_ties else ""))
        elif out.top1 is not None and out.top1_ties:
            extra.append(f"{out.top1_ties} near-ties forgiven")
        if out.constant_share:
            extra.append(f"{out.constant_share:.0%} of the reference constant, left out")
        extra.append(f"max abs {_fmt(out.max_abs)}")
        kind = f" ({out.kind})" if out.kind else ""
        lines.append(f"  {out.name}{kind}: {label} {_fmt(value)}; {'; '.join(extra)}")
    return "\n".join(lines)


def checks_text(checks: Sequence[CheckResult | Mapping[str, Any]]) -> str:
    """One line per check: PASS or FAIL, its name and its message (``checks``: records or their JSON)."""
    results = [c if isinstance(c, CheckResult) else to_record(CheckResult, c) for c in checks]
    width = max(len(c.name) for c in results)
    return "\n".join(f"  {'PASS' if c.passed else 'FAIL'}  {c.name:<{width}}  {c.message}" for c in results)


def decoder_text(comparison: DecoderComparisonRecord) -> str:
    """The headline numbers of a decoder comparison (``verify.text``), one per line."""
    ppl, greedy = comparison.perplexity, comparison.greedy
    lines = [f"perplexity {ppl.candidate:.4g} vs {ppl.base:.4g} (ratio {ppl.ratio:.4f}) on "
             f"{comparison.windows} windows of {comparison.window_tokens} tokens",
             f"teacher-forced next-token agreement {comparison.token_agreement:.4f}"]
    if greedy.prompts:
        lines.append(f"greedy continuations: {greedy.agreement:.4f} of tokens agree, {greedy.identical} of "
                     f"{greedy.prompts} identical over {greedy.new_tokens} tokens")
    latency = comparison.latency
    if latency:
        prefill, decode = latency.prefill_ms, latency.decode_ms_per_token
        lines.append(f"prefill {prefill.candidate:.1f} ms vs {prefill.base:.1f} ms "
                     f"(ratio {latency.prefill_ratio:.3f}); decode {decode.candidate:.2f} "
                     f"vs {decode.base:.2f} ms/token (ratio {latency.decode_ratio:.3f})")
    if comparison.size_ratio is not None:
        lines.append(f"size ratio {comparison.size_ratio:.3f}")
    return "\n".join(lines)


def decoder_markdown(comparison: DecoderComparisonRecord) -> str:
    """A pull-request comment for two decoder LLMs: verdict, checks, the text measures."""
    verdict = "✅ passed" if comparison.passed else "❌ failed"
    lines = [f"### graphopt check (decoder): {verdict}", "",
             f"`{Path(comparison.candidate).name}` against `{Path(comparison.base).name}` on "
             f"{comparison.windows} windows of {comparison.window_tokens} tokens from "
             f"{Path(comparison.data.source).name}", "",
             *_check_rows(comparison.checks)]
    lines += ["", *(f"- {line}" for line in decoder_text(comparison).splitlines())]
    for item in comparison.greedy.continuations[:5]:
        if item.fork_at is not None:
            lines.append(f"- `{item.prompt}` forks at token {item.fork_at}: base {item.base!r}, "
                         f"candidate {item.candidate!r}")
    return "\n".join(lines) + "\n"
