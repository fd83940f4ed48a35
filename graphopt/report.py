"""Reports for people and CI systems: JSON, JUnit XML, Markdown. Written atomically."""

from __future__ import annotations

import json
import math
import os
import tempfile
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

from graphopt.errors import UsageError
from graphopt.verify.gate import CheckResult


def _jsonable(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)  # JSON has no NaN/Infinity
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if hasattr(value, "item") and callable(value.item):  # numpy scalars
        return _jsonable(value.item())
    return value


def to_json(data: dict[str, Any]) -> str:
    return json.dumps(_jsonable(data), indent=2, sort_keys=False) + "\n"


def write_text(path: str | os.PathLike, text: str) -> None:
    """Write a small text file atomically (temporary file in the same folder, then rename)."""
    path = Path(path)
    if not path.parent.is_dir():
        raise UsageError(f"{path}: folder {path.parent} does not exist")
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp creates 0600; a report is for everyone
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


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


def check_markdown(comparison: dict[str, Any]) -> str:
    """A pull-request comment: verdict, the checks, and the headline numbers."""
    verdict = "✅ passed" if comparison["passed"] else "❌ failed"
    lines = [
        f"### graphopt check: {verdict}",
        "",
        f"`{Path(comparison['candidate']).name}` against `{Path(comparison['base']).name}` "
        f"on {comparison['data']['samples']} samples from {comparison['data']['source']}"
        + (" — **random inputs, weaker evidence**" if comparison["data"]["synthetic"] else ""),
        "",
        "| check | measured | threshold | result |",
        "|---|---|---|---|",
    ]
    for check in comparison["checks"]:
        lines.append(
            f"| {check['name']} | {_fmt(check['measured'])} | {_fmt(check['threshold'])} | "
            f"{'pass' if check['passed'] else '**FAIL**'} |"
        )
    parity = comparison["parity"]
    lines += [
        "",
        "| output | max abs | mean abs | cosine mean | cosine min | top-1 |",
        "|---|---|---|---|---|---|",
    ]
    for out in parity["outputs"]:
        lines.append(
            f"| {out['name']} | {_fmt(out['max_abs'])} | {_fmt(out['mean_abs'])} | {_fmt(out['cosine_mean'])} | "
            f"{_fmt(out['cosine_min'])} | {_fmt(out['top1'])} |"
        )
    lines.append("")
    lines.append(f"Size: {comparison['candidate_bytes']:,} / {comparison['base_bytes']:,} bytes "
                 f"(ratio {comparison['size_ratio']:.3f}).")
    if comparison.get("latency"):
        lat = comparison["latency"]
        lines.append(f"Latency (median, interleaved, {lat['threads']} thread{'' if lat['threads'] == 1 else 's'}): {lat['b']['median_ms']:.2f} ms vs "
                     f"{lat['a']['median_ms']:.2f} ms (ratio {lat['ratio']:.3f}).")
    return "\n".join(lines) + "\n"


def checks_text(checks: list[dict[str, Any]]) -> str:
    width = max(len(c["name"]) for c in checks)
    return "\n".join(f"  {'PASS' if c['passed'] else 'FAIL'}  {c['name']:<{width}}  {c['message']}" for c in checks)
