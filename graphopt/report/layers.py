"""Per-layer quantization reports for people: Markdown and a self-contained HTML page with a
bar chart of sensitivity per layer. Built from the JSON report `optimize` writes."""

from __future__ import annotations

import dataclasses
import html
from collections.abc import Mapping
from typing import Any

from graphopt.passes.quantize.precision import BitSearch, BlockLayer
from graphopt.report.records import OptimizeRecord, ParitySummary, PassStepRecord, to_record

_MODE_COLOURS = {"dynamic": "#3b82f6", "static": "#10b981", "weight-only": "#f59e0b", "float": "#9ca3af"}


@dataclasses.dataclass(frozen=True, kw_only=True)
class Int8Layer:
    """One weight layer of ``quantize-int8``'s table: its mode, why, and what it cost alone."""

    node: str
    kind: str  # the op
    mode: str  # "dynamic", "static", "weight-only", "float"
    reason: str = ""
    label: str = ""  # a readable name where the node's is generated
    compute_alone: float | None = None  # budget share used with only this layer in int8 compute
    compute_measured: str = ""
    weight_only_alone: float | None = None  # ... with only this layer weight-only
    weight_only_measured: str = ""
    float_ms: float | None = None
    int8_ms: float | None = None

    @property
    def name(self) -> str:
        return self.label or self.node

    @property
    def damage(self) -> float | None:
        """Share of the budget the layer used alone in its int8 compute form, else weight-only."""
        return self.compute_alone if self.compute_alone is not None else self.weight_only_alone


@dataclasses.dataclass(frozen=True, kw_only=True)
class HeldOutRecord:
    """The search's verdict on the held-out calibration feeds (``verify.judge.Verdict.to_dict``)."""

    measured: str | None = "—"
    budget_used: float | None = None
    allowed: float | None = None
    weak_evidence: bool = False


@dataclasses.dataclass(frozen=True, kw_only=True)
class Int8Table:
    layers: list[Int8Layer]
    held_out: HeldOutRecord = HeldOutRecord()
    held_out_feeds: int | None = None
    budget: str = "—"

    @property
    def float_layers(self) -> list[Int8Layer]:
        return [layer for layer in self.layers if layer.mode == "float"]


@dataclasses.dataclass(frozen=True, kw_only=True)
class BlockwiseTable:
    layers: list[BlockLayer]
    method: str | None
    accuracy_level: Any  # bits → onnxruntime accuracy level
    search: BitSearch | None

    @property
    def float_layers(self) -> list[Int8Layer]:
        return []  # the int8 table's float layers; blockwise layers kept float are rows with method "float"


PrecisionTable = Int8Table | BlockwiseTable


# The passes whose details hold a per-layer precision table (``layers``, one entry per weight
# layer): the ones that choose a precision per layer.
PRECISION_TABLE_PASSES = ("quantize-int8", "quantize-blockwise")


def precision_table(report: OptimizeRecord) -> PrecisionTable | None:
    """The per-layer precision table of the run's last precision-choosing step (None when the
    recipe has none)."""
    for step in reversed(report.steps):
        if step.name in PRECISION_TABLE_PASSES and not step.rolled_back:
            return precision_table_of(step)
    return None


def precision_table_of(step: PassStepRecord) -> PrecisionTable | None:
    """A precision-choosing step's table, from its ``details``: the one place this module reads a
    pass's report by key (blockwise's records are ``passes.quantize.precision``'s)."""
    details = step.details
    layers = details.get("layers")
    if not layers:
        return None
    if step.name == "quantize-blockwise":
        search = details.get("search")
        return BlockwiseTable(layers=[BlockLayer.from_dict(layer) for layer in layers],
                              method=details.get("method"), accuracy_level=details.get("accuracy_level"),
                              search=BitSearch.from_dict(search) if search else None)
    return to_record(Int8Table, details)


def _as_record(report: OptimizeRecord | Mapping[str, Any]) -> OptimizeRecord:
    return report if isinstance(report, OptimizeRecord) else to_record(OptimizeRecord, report)


_BLOCKWISE_COLUMNS = ("layer", "role", "shape", "bits", "accuracy level", "method", "relative error",
                      "output loss")


def _blockwise_rows(table: BlockwiseTable) -> list[list[str]]:
    return [[layer.node, layer.role, "×".join(map(str, layer.shape)), str(layer.bits), str(layer.accuracy_level),
             layer.method, _fmt(layer.relative_error, 3), _fmt(layer.sensitivity, 3)] for layer in table.layers]


_SEARCH_COLUMNS = ("search step", "8-bit layers", "float-compute layers", "float layers", "size ×", "decode ×",
                   "perplexity ×", "token agreement", "meets")


def _search_rows(table: BlockwiseTable) -> list[list[str]]:
    """The trials: the frontier the search measured (size, perplexity, agreement), the chosen
    rung marked."""
    search = table.search
    trials = search.trials if search else []
    chosen = max((i for i, t in enumerate(trials) if t.rungs == search.taken), default=None) if search else None
    return [[trial.step + (" ← chosen" if i == chosen else ""), str(trial.eight_bit_layers),
             str(trial.float_compute_layers), str(trial.float_layers), _fmt(trial.size_ratio, 3),
             _fmt(trial.decode_ratio, 3), f"{trial.ppl_ratio:.4f}", f"{trial.token_agreement:.4f}", "yes" if trial.meets else "no"]
            for i, trial in enumerate(trials)]


def _blockwise_intro(table: BlockwiseTable) -> str:
    search = table.search
    text = f"Blockwise weights ({table.method}); accuracy level per bit width {table.accuracy_level}."
    if search:
        text += (f" Searched on {search.windows} calibration windows for perplexity ratio ≤ "
                 f"{_fmt(search.target_ppl_ratio)} and token agreement ≥ {_fmt(search.target_token_agree)}"
                 + (f", the most faithful model within size {search.max_size_ratio:g}" if search.max_size_ratio else "")
                 + (f", the most faithful model decoding within {search.max_decode_ratio:g}× the original's time"
                    if search.max_decode_ratio else "") + ".")
    return text


def _blockwise_markdown(report: OptimizeRecord, table: BlockwiseTable) -> str:
    lines = [f"### Per-layer precision — `{report.output}`", "", _blockwise_intro(table), ""]
    trials = _search_rows(table)
    if trials:
        lines += ["| " + " | ".join(_SEARCH_COLUMNS) + " |", "|" + "---|" * len(_SEARCH_COLUMNS),
                  *("| " + " | ".join(row) + " |" for row in trials), ""]
    lines += ["| " + " | ".join(_BLOCKWISE_COLUMNS) + " |", "|" + "---|" * len(_BLOCKWISE_COLUMNS)]
    lines += ["| " + " | ".join(row) + " |" for row in _blockwise_rows(table)]
    return "\n".join(lines) + "\n"


def _blockwise_html(report: OptimizeRecord, title: str, table: BlockwiseTable) -> str:
    def html_table(header: tuple[str, ...] | list[str], rows: list[list[str]]) -> str:
        head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
        body = "".join("<tr>" + "".join(f"<td>{html.escape(cell)}</td>" for cell in row) + "</tr>" for row in rows)
        return f"<table><tr>{head}</tr>{body}</table>"

    trials = _search_rows(table)
    search = html_table(_SEARCH_COLUMNS, trials) if trials else ""
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{title}</title>
<style>
body{{font-family:system-ui,-apple-system,Segoe UI,sans-serif;margin:2rem;color:#111;max-width:1100px}}
table{{border-collapse:collapse;font-size:13px;width:100%;margin-bottom:1.5rem}} td,th{{border-bottom:1px solid #e5e7eb;padding:4px 8px;text-align:left}}
th{{background:#f3f4f6}}
</style></head><body>
<h1>Per-layer precision</h1>
<p>Size {report.output_bytes:,} of {report.input_bytes:,} bytes. {html.escape(_blockwise_intro(table))}</p>
{search}{html_table(_BLOCKWISE_COLUMNS, _blockwise_rows(table))}
</body></html>
"""


def most_sensitive(layers: list[Int8Layer], count: int = 5) -> list[Int8Layer]:
    measured = [layer for layer in layers if layer.damage is not None]
    return sorted(measured, key=lambda layer: -(layer.damage or 0.0))[:count]


def _held_out(table: Int8Table) -> str:
    held = table.held_out
    return (f"Held-out {held.measured} ({_fmt(held.budget_used, 3)} of the budget used, the search allows "
            f"{_fmt(held.allowed, 3)}) on {table.held_out_feeds} held-out calibration feeds"
            + (" (weak evidence: one feed)" if held.weak_evidence else "")
            + f"; budget: {table.budget}.")


def _fmt(value: Any, digits: int = 4) -> str:
    if value is None:
        return "—"
    if isinstance(value, float):
        return f"{value:.{digits}g}"
    return str(value)


def _no_table(recipe: str) -> str:
    return f"Recipe '{recipe}' has no quantization step, so there is no per-layer table (the int8 recipe has one)."


def layers_markdown(report: OptimizeRecord | Mapping[str, Any]) -> str:
    """The per-layer table of ``optimize``'s report (its record, or its JSON) in Markdown."""
    report = _as_record(report)
    table = precision_table(report)
    if table is None:
        return _no_table(str(report.recipe.name)) + "\n"
    if isinstance(table, BlockwiseTable):
        return _blockwise_markdown(report, table)
    lines = [f"### Per-layer precision — `{report.output}`", "", _held_out(table), ""]
    top = most_sensitive(table.layers)
    if top:
        lines.append("Most sensitive layers (share of the budget used with only that layer quantized): "
                     + ", ".join(f"`{layer.name}` {_fmt(layer.damage, 3)}" for layer in top) + ".")
        lines.append("")
    kept = table.float_layers
    if kept:
        lines.append(f"Left in float: {', '.join(f'`{layer.name}`' for layer in kept)}.")
        lines.append("")
    lines += [
        "| layer | op | mode | budget used alone (int8 compute) | budget used alone (weight-only) | float ms | int8 ms | reason |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for layer in table.layers:
        lines.append(
            f"| `{layer.name}` | {layer.kind} | {layer.mode} | {_fmt(layer.compute_alone, 3)} | "
            f"{_fmt(layer.weight_only_alone, 3)} | {_fmt(layer.float_ms)} | {_fmt(layer.int8_ms)} | "
            f"{layer.reason} |"
        )
    return "\n".join(lines) + "\n"


def _judged_outputs(parity: ParitySummary | None) -> str:
    """Each output's kind and the number behind its verdict (``report.checks.headline``)."""
    from graphopt.report.checks import headline

    parts = []
    for out in parity.outputs if parity else []:
        label, value = headline(out)
        parts.append(f"{out.name} ({out.kind or 'output'}): {label} {_fmt(value, 6)}")
    return "; ".join(parts) or "no outputs compared"


def layers_html(report: OptimizeRecord | Mapping[str, Any]) -> str:
    """A page that needs nothing but a browser: inline CSS and SVG, no scripts (``report``:
    ``optimize``'s report, its record or its JSON)."""
    report = _as_record(report)
    table = precision_table(report)
    title = f"graphopt — per-layer precision of {html.escape(report.output or 'model')}"
    if table is None:
        return (f"<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\"><title>{title}</title></head>"
                f"<body><h1>Per-layer precision</h1><p>{_no_table(html.escape(str(report.recipe.name)))}</p>"
                "</body></html>\n")
    if isinstance(table, BlockwiseTable):
        return _blockwise_html(report, title, table)
    measured = [layer for layer in table.layers if layer.damage is not None]
    chart = _bar_chart(measured) if measured else "<p>Sensitivity was not measured (run with --html or a budget).</p>"
    top_html = "".join(
        f"<li><code>{html.escape(layer.name)}</code> — {layer.damage:.3g} of the budget used alone "
        f"({html.escape(layer.compute_measured or layer.weight_only_measured or '')}); "
        f"now {html.escape(layer.mode)}</li>"
        for layer in most_sensitive(table.layers)
    )
    rows = "".join(
        "<tr>"
        f"<td><code>{html.escape(layer.name)}</code></td><td>{html.escape(layer.kind)}</td>"
        f"<td><span class='mode' style='background:{_MODE_COLOURS.get(layer.mode, '#999')}'>"
        f"{html.escape(layer.mode)}</span></td>"
        f"<td>{_fmt(layer.compute_alone, 3)}</td><td>{_fmt(layer.weight_only_alone, 3)}</td>"
        f"<td>{_fmt(layer.float_ms)}</td>"
        f"<td>{_fmt(layer.int8_ms)}</td><td>{html.escape(str(layer.reason))}</td>"
        "</tr>"
        for layer in table.layers
    )
    verification = report.verification
    summary = (
        f"Size {report.output_bytes:,} of {report.input_bytes:,} bytes; "
        f"{html.escape(_judged_outputs(verification.parity))} on "
        f"{verification.data.samples or '?'} samples "
        f"({html.escape(verification.data.source)}). {html.escape(_held_out(table))}"
    )
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{title}</title>
<style>
body{{font-family:system-ui,-apple-system,Segoe UI,sans-serif;margin:2rem;color:#111;max-width:1100px}}
table{{border-collapse:collapse;font-size:13px;width:100%}} td,th{{border-bottom:1px solid #e5e7eb;padding:4px 8px;text-align:left}}
th{{background:#f3f4f6}} code{{font-size:12px}} .mode{{color:#fff;border-radius:4px;padding:1px 6px}}
.legend span{{display:inline-block;margin-right:1rem}} .legend i{{display:inline-block;width:12px;height:12px;margin-right:4px;vertical-align:middle}}
</style></head><body>
<h1>Per-layer precision</h1>
<p>{summary}</p>
<h2>Most sensitive layers</h2><ol>{top_html or '<li>not measured</li>'}</ol>
<h2>Sensitivity per layer</h2>
<p>Bar length: share of the budget used when only that layer is quantized (its int8 compute form where it
has one, else weight-only), every other layer float (log scale).</p>
<div class="legend">{''.join(f'<span><i style="background:{c}"></i>{m}</span>' for m, c in _MODE_COLOURS.items())}</div>
{chart}
<h2>All layers</h2>
<table><tr><th>layer</th><th>op</th><th>mode</th><th>budget used alone (int8 compute)</th>
<th>budget used alone (weight-only)</th><th>float ms</th><th>int8 ms</th><th>reason</th></tr>
{rows}</table>
</body></html>
"""


def _bar_chart(layers: list[Int8Layer]) -> str:
    import math

    damages = [max(layer.damage or 0.0, 1e-9) for layer in layers]
    low, high = math.log10(min(damages)), math.log10(max(damages))
    span = max(high - low, 1e-9)
    row, label_width, bar_width = 18, 420, 560
    bars = []
    for index, (layer, damage) in enumerate(zip(layers, damages)):
        y = index * row
        length = 4 + (bar_width - 4) * (math.log10(damage) - low) / span
        colour = _MODE_COLOURS.get(layer.mode, "#999")
        name = html.escape(layer.name[-64:])
        bars.append(
            f'<text x="{label_width - 6}" y="{y + 13}" text-anchor="end" font-size="11">{name}</text>'
            f'<rect x="{label_width}" y="{y + 3}" width="{length:.1f}" height="{row - 6}" fill="{colour}">'
            f"<title>{html.escape(layer.name)}: {damage:.3g} of the budget</title></rect>"
            f'<text x="{label_width + length + 4:.1f}" y="{y + 13}" font-size="10">{damage:.2g}</text>'
        )
    height = row * len(layers) + 4
    return (f'<svg xmlns="http://www.w3.org/2000/svg" width="{label_width + bar_width + 60}" height="{height}" '
            f'role="img" aria-label="sensitivity per layer">{"".join(bars)}</svg>')
