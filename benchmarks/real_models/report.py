"""One row per (model, recipe): graphopt's own verdict next to the user-level one, and the
Markdown / JSON they are written as."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

from benchmarks.common import markdown_table
from benchmarks.real_models.registry import ModelSpec
from benchmarks.real_models.user_eval import ACCEPTANCE, UserResult


@dataclasses.dataclass
class Row:
    model: str
    kind: str
    source: dict[str, str]
    local_only: bool
    recipe: str
    exit_code: int | str  # "timeout" when graphopt was stopped
    seconds: float
    stderr_last: str
    command: str
    written: bool = False
    size_ratio: float | None = None
    graphopt_judged: str = ""  # per output: "name (kind): metric value"
    user: UserResult | None = None
    user_error: str = ""

    @property
    def agreement(self) -> str:
        """"disagree" only when graphopt wrote a model (exit 0) that misses the user-level bar."""
        if self.exit_code != 0 or not self.written:
            return "— (nothing written)" if self.exit_code != 0 else "no file despite exit 0"
        if self.user is None:
            return "user eval failed"
        return "agree" if self.user.passes(self.kind) else "**disagree**"


def _headline(output: dict[str, Any]) -> tuple[str, Any]:
    """The number graphopt's judge decided this output on, by the kind it inferred."""
    kind = str(output.get("kind") or "")
    if "detection" in kind and output.get("detections_kept") is not None:
        return "detections_kept", output["detections_kept"]
    if output.get("sequences") and output.get("sequences_same") is not None:
        return "sequences_same", output["sequences_same"]
    if output.get("top1") is not None:
        return "top1", output["top1"]
    return "cosine_mean", output.get("cosine_mean")


def graphopt_judged(report: dict[str, Any]) -> str:
    verification = report.get("verification") or {}
    cells = []
    for output in (verification.get("parity") or {}).get("outputs", []):
        name, value = _headline(output)
        number = f"{value:.4f}" if isinstance(value, (int, float)) else "n/a"
        cells.append(f"{output.get('name')} ({output.get('kind')}: {output.get('metric')}) {name}={number}")
    passed = verification.get("passed")
    verdict = "" if passed is None else ("PASS; " if passed else "FAIL; ")
    return verdict + "; ".join(cells) if cells else "no parity in report"


def size_ratio(report: dict[str, Any]) -> float | None:
    verification = report.get("verification") or {}
    if verification.get("size_ratio") is not None:
        return float(verification["size_ratio"])
    if report.get("input_bytes") and report.get("output_bytes"):
        return report["output_bytes"] / report["input_bytes"]
    return None


def new_row(spec: ModelSpec, provenance: dict[str, str], recipe: str, **run: Any) -> Row:
    return Row(model=spec.name, kind=spec.kind, source=provenance, local_only=spec.source.local_only,
               recipe=recipe, **run)


def _source_cell(row: Row) -> str:
    s = row.source
    label = " — local benchmarking only" if row.local_only else ""
    return f"{s['package']} {s['version']}: {s['file']} ({s['license']}{label})"


def _user_cell(row: Row) -> str:
    if row.user is not None:
        return f"{row.user.summary} (bar: {row.user.metric} >= {ACCEPTANCE[row.kind]})"
    return row.user_error or "—"


def _exit_cell(row: Row) -> str:
    if row.exit_code == 0:
        return f"0 ({row.seconds:.0f} s)"
    return f"{row.exit_code} ({row.seconds:.0f} s): {row.stderr_last[:200]}"


def markdown(rows: list[Row], header: list[str]) -> str:
    table = markdown_table(
        ["model", "kind", "source", "recipe", "exit", "size ratio", "graphopt's judged number",
         "user-level number", "agree?"],
        [[r.model, r.kind, _source_cell(r), r.recipe, _exit_cell(r),
          f"{r.size_ratio:.3f}" if r.size_ratio is not None else "—", r.graphopt_judged or "—",
          _user_cell(r), r.agreement] for r in rows])
    return "\n".join([*header, "", table, ""])


def to_json(rows: list[Row], meta: dict[str, Any]) -> str:
    def encode(row: Row) -> dict[str, Any]:
        data = dataclasses.asdict(row)
        data["agreement"] = row.agreement
        data["user_passes"] = None if row.user is None else row.user.passes(row.kind)
        return data

    return json.dumps({**meta, "rows": [encode(r) for r in rows]}, indent=1, ensure_ascii=False)


def load_report(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None
