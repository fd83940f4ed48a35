"""Per-layer quantization reports for people: Markdown and a self-contained HTML page with a
bar chart of sensitivity per layer. Built from the JSON report `optimize` writes."""

from __future__ import annotations

import html
from typing import Any

_MODE_COLOURS = {"dynamic": "#3b82f6", "static": "#10b981", "weight-only": "#f59e0b", "float": "#9ca3af"}


# The passes whose report holds a per-layer precision table (``details["layers"]``, one entry
# per weight layer with its ``mode``): the ones that choose a precision per layer.
PRECISION_TABLE_PASSES = ("quantize-int8", "quantize-blockwise")


def quantization_layers(report: dict[str, Any]) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """The per-layer precision table of the run's last precision-choosing step, and that step's
    details (empty when the recipe has none)."""
    for step in reversed(report.get("steps", [])):
        if step["name"] in PRECISION_TABLE_PASSES and not step.get("rolled_back"):
            return step["details"].get("layers", []), {**step["details"], "pass": step["name"]}
    return [], {}


_BLOCKWISE_COLUMNS = ("layer", "role", "shape", "bits", "accuracy level", "method", "relative error",
                      "output loss")


def _blockwise_rows(layers: list[dict[str, Any]]) -> list[list[str]]:
    return [[layer["node"], layer["role"], "×".join(map(str, layer["shape"])), str(layer["bits"]),
             str(layer.get("accuracy_level", "—")), layer.get("method", "—"), _fmt(layer.get("relative_error"), 3),
             _fmt(layer.get("sensitivity"), 3)] for layer in layers]


def _search_rows(details: dict[str, Any]) -> list[list[str]]:
    return [[trial["step"], str(trial["eight_bit_layers"]), str(trial["float_compute_layers"]),
             f"{trial['ppl_ratio']:.4f}", f"{trial['token_agreement']:.4f}", "yes" if trial["meets"] else "no"]
            for trial in (details.get("search") or {}).get("trials", [])]


def _blockwise_intro(details: dict[str, Any]) -> str:
    search = details.get("search") or {}
    text = (f"Blockwise weights ({details.get('method')}); accuracy level per bit width "
            f"{details.get('accuracy_level')}.")
    if search:
        text += (f" Searched on {search.get('windows')} calibration windows for perplexity ratio ≤ "
                 f"{_fmt(search.get('target_ppl_ratio'))} and token agreement ≥ {_fmt(search.get('target_token_agree'))}.")
    return text


def _blockwise_markdown(report: dict[str, Any], layers: list[dict[str, Any]], details: dict[str, Any]) -> str:
    lines = [f"### Per-layer precision — `{report.get('output', '')}`", "", _blockwise_intro(details), ""]
    trials = _search_rows(details)
    if trials:
        lines += ["| search step | 8-bit layers | float-compute layers | perplexity × | token agreement | meets |",
                  "|---|---|---|---|---|---|", *("| " + " | ".join(row) + " |" for row in trials), ""]
    lines += ["| " + " | ".join(_BLOCKWISE_COLUMNS) + " |", "|" + "---|" * len(_BLOCKWISE_COLUMNS)]
    lines += ["| " + " | ".join(row) + " |" for row in _blockwise_rows(layers)]
    return "\n".join(lines) + "\n"


def _blockwise_html(report: dict[str, Any], title: str, layers: list[dict[str, Any]], details: dict[str, Any]) -> str:
    def table(header: tuple[str, ...] | list[str], rows: list[list[str]]) -> str:
        head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
        body = "".join("<tr>" + "".join(f"<td>{html.escape(cell)}</td>" for cell in row) + "</tr>" for row in rows)
        return f"<table><tr>{head}</tr>{body}</table>"

    trials = _search_rows(details)
    search = table(["search step", "8-bit layers", "float-compute layers", "perplexity ×", "token agreement", "meets"],
                   trials) if trials else ""
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{title}</title>
<style>
body{{font-family:system-ui,-apple-system,Segoe UI,sans-serif;margin:2rem;color:#111;max-width:1100px}}
table{{border-collapse:collapse;font-size:13px;width:100%;margin-bottom:1.5rem}} td,th{{border-bottom:1px solid #e5e7eb;padding:4px 8px;text-align:left}}
th{{background:#f3f4f6}}
</style></head><body>
<h1>Per-layer precision</h1>
<p>Size {report.get('output_bytes', 0):,} of {report.get('input_bytes', 0):,} bytes. {html.escape(_blockwise_intro(details))}</p>
{search}{table(_BLOCKWISE_COLUMNS, _blockwise_rows(layers))}
</body></html>
"""


def _damage(layer: dict[str, Any]) -> float | None:
    """Share of the budget the layer used alone in its int8 compute form, else weight-only."""
    alone = layer.get("compute_alone")
    return alone if alone is not None else layer.get("weight_only_alone")


def _name(layer: dict[str, Any]) -> str:
    return layer.get("label") or layer["node"]


def most_sensitive(layers: list[dict[str, Any]], count: int = 5) -> list[dict[str, Any]]:
    measured = [layer for layer in layers if _damage(layer) is not None]
    return sorted(measured, key=lambda layer: -_damage(layer))[:count]


def _held_out(details: dict[str, Any]) -> str:
    held = details.get("held_out") or {}
    used = held.get("budget_used")
    return (f"Held-out {held.get('measured', '—')} ({_fmt(used, 3)} of the budget used, the search allows "
            f"{_fmt(held.get('allowed'), 3)}) on {details.get('held_out_feeds')} held-out calibration feeds"
            + (" (weak evidence: one feed)" if held.get("weak_evidence") else "")
            + f"; budget: {details.get('budget', '—')}.")


def _fmt(value: Any, digits: int = 4) -> str:
    if value is None:
        return "—"
    if isinstance(value, float):
        return f"{value:.{digits}g}"
    return str(value)


def layers_markdown(report: dict[str, Any]) -> str:
    layers, details = quantization_layers(report)
    if not layers:
        return (f"Recipe '{report.get('recipe', {}).get('name')}' has no quantization step, so there is no "
                "per-layer table (the int8 recipe has one).\n")
    if details.get("pass") == "quantize-blockwise":
        return _blockwise_markdown(report, layers, details)
    lines = [
        f"### Per-layer precision — `{report.get('output', '')}`",
        "",
        _held_out(details),
        "",
    ]
    top = most_sensitive(layers)
    if top:
        lines.append("Most sensitive layers (share of the budget used with only that layer quantized): "
                     + ", ".join(f"`{_name(layer)}` {_fmt(_damage(layer), 3)}" for layer in top) + ".")
        lines.append("")
    kept = [layer for layer in layers if layer["mode"] == "float"]
    if kept:
        lines.append(f"Left in float: {', '.join(f'`{_name(layer)}`' for layer in kept)}.")
        lines.append("")
    lines += [
        "| layer | op | mode | budget used alone (int8 compute) | budget used alone (weight-only) | float ms | int8 ms | reason |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for layer in layers:
        lines.append(
            f"| `{_name(layer)}` | {layer['kind']} | {layer['mode']} | {_fmt(layer.get('compute_alone'), 3)} | "
            f"{_fmt(layer.get('weight_only_alone'), 3)} | {_fmt(layer.get('float_ms'))} | {_fmt(layer.get('int8_ms'))} | "
            f"{layer.get('reason', '')} |"
        )
    return "\n".join(lines) + "\n"


def _judged_outputs(parity: dict[str, Any]) -> str:
    """Each output's kind and the number behind its verdict (``report.checks.headline``)."""
    from graphopt.report.checks import headline

    parts = []
    for out in parity.get("outputs", []):
        label, value = headline(out)
        parts.append(f"{out['name']} ({out.get('kind') or 'output'}): {label} {_fmt(value, 6)}")
    return "; ".join(parts) or "no outputs compared"


def layers_html(report: dict[str, Any]) -> str:
    """A page that needs nothing but a browser: inline CSS and SVG, no scripts."""
    layers, details = quantization_layers(report)
    title = f"graphopt — per-layer precision of {html.escape(str(report.get('output', 'model')))}"
    if not layers:
        return (f"<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\"><title>{title}</title></head>"
                f"<body><h1>Per-layer precision</h1><p>Recipe '{html.escape(str(report.get('recipe', {}).get('name')))}' "
                "has no quantization step, so there is no per-layer table (the int8 recipe has one).</p></body></html>\n")
    if details.get("pass") == "quantize-blockwise":
        return _blockwise_html(report, title, layers, details)
    measured = [layer for layer in layers if _damage(layer) is not None]
    chart = _bar_chart(measured) if measured else "<p>Sensitivity was not measured (run with --html or a budget).</p>"
    top = most_sensitive(layers)
    top_html = "".join(
        f"<li><code>{html.escape(_name(layer))}</code> — {_damage(layer):.3g} of the budget used alone "
        f"({html.escape(layer.get('compute_measured') or layer.get('weight_only_measured') or '')}); "
        f"now {html.escape(layer['mode'])}</li>"
        for layer in top
    )
    rows = "".join(
        "<tr>"
        f"<td><code>{html.escape(_name(layer))}</code></td><td>{html.escape(layer['kind'])}</td>"
        f"<td><span class='mode' style='background:{_MODE_COLOURS.get(layer['mode'], '#999')}'>"
        f"{html.escape(layer['mode'])}</span></td>"
        f"<td>{_fmt(layer.get('compute_alone'), 3)}</td><td>{_fmt(layer.get('weight_only_alone'), 3)}</td>"
        f"<td>{_fmt(layer.get('float_ms'))}</td>"
        f"<td>{_fmt(layer.get('int8_ms'))}</td><td>{html.escape(str(layer.get('reason', '')))}</td>"
        "</tr>"
        for layer in layers
    )
    verification = report.get("verification", {})
    parity = verification.get("parity", {})
    summary = (
        f"Size {report.get('output_bytes', 0):,} of {report.get('input_bytes', 0):,} bytes; "
        f"{html.escape(_judged_outputs(parity))} on "
        f"{verification.get('data', {}).get('samples', '?')} samples "
        f"({html.escape(str(verification.get('data', {}).get('source', '')))}). {html.escape(_held_out(details))}"
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


def _bar_chart(layers: list[dict[str, Any]]) -> str:
    import math

    damages = [max(_damage(layer) or 0.0, 1e-9) for layer in layers]
    low, high = math.log10(min(damages)), math.log10(max(damages))
    span = max(high - low, 1e-9)
    row, label_width, bar_width = 18, 420, 560
    bars = []
    for index, (layer, damage) in enumerate(zip(layers, damages)):
        y = index * row
        length = 4 + (bar_width - 4) * (math.log10(damage) - low) / span
        colour = _MODE_COLOURS.get(layer["mode"], "#999")
        name = html.escape(_name(layer)[-64:])
        bars.append(
            f'<text x="{label_width - 6}" y="{y + 13}" text-anchor="end" font-size="11">{name}</text>'
            f'<rect x="{label_width}" y="{y + 3}" width="{length:.1f}" height="{row - 6}" fill="{colour}">'
            f"<title>{html.escape(_name(layer))}: {damage:.3g} of the budget</title></rect>"
            f'<text x="{label_width + length + 4:.1f}" y="{y + 13}" font-size="10">{damage:.2g}</text>'
        )
    height = row * len(layers) + 4
    return (f'<svg xmlns="http://www.w3.org/2000/svg" width="{label_width + bar_width + 60}" height="{height}" '
            f'role="img" aria-label="sensitivity per layer">{"".join(bars)}</svg>')
