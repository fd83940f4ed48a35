"""graphopt.report.records: a report's JSON parsed once into typed records, and the renderers
reading those records giving what they give for the JSON itself."""

from __future__ import annotations

import dataclasses
import json
import math

import pytest

from graphopt.io import to_json
from graphopt.report.checks import check_markdown, checks_text, outputs_text
from graphopt.report.layers import Int8Table, layers_markdown, precision_table
from graphopt.report.records import (
    ComparisonRecord,
    DecoderComparisonRecord,
    OptimizeRecord,
    ParitySummary,
    comparison_record,
    to_record,
)
from graphopt.verify.gate import CheckResult
from graphopt.verify.parity import OutputParity, ParityReport


def _comparison() -> dict:
    parity = ParityReport([OutputParity("Y", max_abs=math.inf, mean_abs=0.1, max_rel=0.2, cosine_mean=0.99,
                                        cosine_min=0.98, top1=0.75, new_nonfinite=0, kind="class scores",
                                        top1_ties=2)], samples=8)
    return {"base": "/m/base.onnx", "candidate": "/m/cand.onnx", "passed": False,
            "data": {"source": "d.npz", "synthetic": False, "feeds": 8, "samples": 8, "evidence": "data"},
            "base_bytes": 2000, "candidate_bytes": 500, "size_ratio": 0.25, "parity": parity.to_dict(),
            "latency": None, "checks": [CheckResult("min_top1", 0.8, 0.75, False, "top-1 agreement 0.75").to_dict()],
            "output_kinds": {"Y": "class scores"}, "peak_rss_mib": None, "runtime_floor": None}


def test_nested_records_lists_and_optionals_are_built_by_field_name():
    record = to_record(ComparisonRecord, _comparison())

    assert record.data.samples == 8 and record.latency is None
    assert record.checks == [CheckResult("min_top1", 0.8, 0.75, False, "top-1 agreement 0.75")]
    assert isinstance(record.parity, ParitySummary) and record.parity.top1 == 0.75
    (out,) = record.parity.outputs
    assert isinstance(out, OutputParity) and out.kind == "class scores" and out.top1_ties == 2


def test_keys_a_record_does_not_name_are_left_out_and_missing_ones_take_defaults():
    record = to_record(OptimizeRecord, {"output": "m.onnx", "unknown": 1, "steps": [{"name": "cleanup"}]})

    assert record.output == "m.onnx" and record.input_bytes == 0 and record.recipe.name is None
    assert record.steps[0].details == {} and not record.steps[0].rolled_back


def test_non_finite_numbers_written_as_strings_come_back_as_floats():
    from_file = json.loads(to_json(_comparison()))
    assert from_file["parity"]["max_abs"] == "inf"

    record = to_record(ComparisonRecord, from_file)

    assert record.parity is not None and record.parity.max_abs == math.inf
    assert record.parity.outputs[0].max_abs == math.inf


def test_a_missing_required_field_is_refused():
    with pytest.raises(TypeError):
        to_record(ParitySummary, {"max_abs": 0.0})


def test_check_results_are_told_apart_from_decoder_comparisons():
    assert isinstance(comparison_record(_comparison()), ComparisonRecord)
    decoder = {"windows": 2, "window_tokens": 8, "perplexity": {"base": 2.0, "candidate": 2.1, "ratio": 1.05},
               "token_agreement": 0.9, "checks": [], "passed": True}
    assert isinstance(comparison_record(decoder), DecoderComparisonRecord)


def test_renderers_give_the_same_text_for_a_record_and_its_json():
    data = _comparison()
    record = to_record(ComparisonRecord, data)

    assert check_markdown(record) == check_markdown(data)
    assert checks_text(record.checks) == checks_text(data["checks"])
    assert record.parity is not None
    assert outputs_text(record.parity) == "  Y (class scores): top-1 agreement 0.75; 2 near-ties forgiven; max abs inf"


def test_the_precision_table_is_the_last_precision_step_not_rolled_back():
    layer = {"node": "mm", "kind": "MatMul", "mode": "float", "reason": "kept", "compute_alone": 2.0}
    report = {"output": "m.onnx", "recipe": {"name": "int8"}, "steps": [
        {"name": "quantize-int8", "details": {"layers": [layer], "budget": "cosine >= 0.99"}},
        {"name": "quantize-int8", "rolled_back": True, "details": {"layers": [{**layer, "mode": "static"}]}},
        {"name": "cleanup", "details": {}}]}

    table = precision_table(to_record(OptimizeRecord, report))

    assert isinstance(table, Int8Table) and [layer.mode for layer in table.layers] == ["float"]
    assert table.float_layers[0].damage == 2.0 and table.budget == "cosine >= 0.99"
    assert "Left in float: `mm`." in layers_markdown(report)


def test_records_are_frozen():
    record = to_record(OptimizeRecord, {"output": "m.onnx"})
    with pytest.raises(dataclasses.FrozenInstanceError):
        record.output = "other.onnx"  # type: ignore[misc]


def test_parts_a_producer_writes_from_its_own_dataclass_come_back_as_that_dataclass():
    from graphopt.report.records import BenchRecord
    from graphopt.verify.latency import LatencyStats
    from graphopt.verify.text import GreedyContinuation

    bench = to_record(BenchRecord, {"model": "m.onnx", "provider": "CPUExecutionProvider", "threads": 2,
                                    "batch_size": 1, "data": {"source": "random"}, "median_ms": 1.5, "p90_ms": 2.0,
                                    "mean_ms": 1.6, "runs": 5, "peak_rss_mib": None, "seconds": 0.1})
    continuation = GreedyContinuation("a b", 0.5, 3, "x y", "x z")
    decoder = to_record(DecoderComparisonRecord, {
        "windows": 2, "window_tokens": 8, "perplexity": {"base": 2.0, "candidate": 2.1, "ratio": 1.05},
        "token_agreement": 0.9, "greedy": {"prompts": 1, "continuations": [dataclasses.asdict(continuation)]}})

    assert isinstance(bench, LatencyStats) and (bench.median_ms, bench.runs, bench.data.source) == (1.5, 5, "random")
    assert decoder.greedy.continuations == [continuation]
    assert (decoder.perplexity.base, decoder.perplexity.candidate, decoder.perplexity.ratio) == (2.0, 2.1, 1.05)
