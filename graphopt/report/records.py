"""Typed records of graphopt's JSON reports, and the one way a report's JSON becomes a record.

A record is a dataclass whose field names are the report's keys. ``to_record`` builds one from
the JSON by its fields' names and type hints (nested records, lists and dicts of them,
``X | None``): the only place a report is read by key. Keys a record does not name are left
out; a key the JSON lacks takes the field's default. Renderers and the command line read
records by attribute; JSON is written from the records (``to_dict``) at the edge.

The records here are the reports whose producers hand over JSON-shaped data (``optimize``'s
report, ``check``'s comparison, ``bench``, ``distill``, ``export``): the command line parses each
once. Where a producer's own dataclass is what a part of its JSON holds (``CheckResult``,
``LatencyStats``, ``OutputParity``, ``GreedyContinuation``), the records use it, not a copy.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import types
import typing
from collections.abc import Mapping, Sequence
from typing import Any, TypeVar

from graphopt.verify.gate import CheckResult
from graphopt.verify.latency import LatencyStats
from graphopt.verify.parity import OutputParity
from graphopt.verify.text import GreedyContinuation

R = TypeVar("R")

# What graphopt.io.to_json writes for a non-finite number.
_NON_FINITE = {"inf": math.inf, "-inf": -math.inf, "nan": math.nan}


def to_record(cls: type[R], data: Mapping[str, Any]) -> R:
    """The record ``cls`` of the JSON object ``data`` (see the module's docstring)."""
    hints = _hints(cls)
    values = {field.name: _value(hints[field.name], data[field.name])
              for field in dataclasses.fields(cls) if field.init and field.name in data}
    return cls(**values)


@functools.cache
def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _value(hint: Any, value: Any) -> Any:
    if value is None:
        return None
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        members = [arg for arg in args if arg is not type(None)]
        return _value(members[0], value) if len(members) == 1 else value
    if dataclasses.is_dataclass(hint) and isinstance(value, Mapping):
        return to_record(hint, value)
    if origin in (list, tuple, Sequence) and isinstance(value, (list, tuple)):
        items = [_value(args[0] if args else Any, item) for item in value]
        return tuple(items) if origin is tuple else items
    if origin in (dict, Mapping) and isinstance(value, Mapping):
        return {key: _value(args[1] if args else Any, item) for key, item in value.items()}
    if hint is float and isinstance(value, str) and value in _NON_FINITE:
        return _NON_FINITE[value]
    return value


@dataclasses.dataclass(frozen=True, kw_only=True)
class DataRecord:
    """Where the feeds came from (``verify.feeds.FeedSet.describe``; ``asdict`` is its JSON)."""

    source: str = ""
    synthetic: bool = False
    feeds: int = 0
    samples: int = 0
    evidence: str = ""


@dataclasses.dataclass(frozen=True, kw_only=True)
class LatencyRecord:
    """Interleaved A/B latency (``verify.latency.ABLatency.to_dict``): ``a`` the base, ``b`` the
    candidate."""

    a: LatencyStats
    b: LatencyStats
    ratio: float
    threads: int


@dataclasses.dataclass(frozen=True, kw_only=True)
class ParitySummary:
    """Parity as a report states it (``verify.parity.ParityReport.to_dict``), what its readers use:
    the worst output's numbers, and each output's."""

    max_abs: float
    cosine_mean: float
    top1: float | None = None
    outputs: list[OutputParity] = dataclasses.field(default_factory=list)


@dataclasses.dataclass(frozen=True, kw_only=True)
class BaseAndCandidate:
    base: float
    candidate: float


@dataclasses.dataclass(frozen=True, kw_only=True)
class Perplexity(BaseAndCandidate):
    ratio: float  # candidate over base


@dataclasses.dataclass(frozen=True, kw_only=True)
class GreedyRecord:
    prompts: int = 0
    new_tokens: int = 0
    agreement: float | None = None
    identical: int = 0
    continuations: list[GreedyContinuation] = dataclasses.field(default_factory=list)


@dataclasses.dataclass(frozen=True, kw_only=True)
class DecoderLatencyRecord:
    """Prefill ms and decode ms/token of both decoders, interleaved, and the candidate's ratios."""

    prefill_ms: BaseAndCandidate
    decode_ms_per_token: BaseAndCandidate
    prefill_ratio: float
    decode_ratio: float


@dataclasses.dataclass(frozen=True, kw_only=True)
class DecoderComparisonRecord:
    """Two decoders judged as text generators (``verify.text.compare_decoders``): the ``text`` of
    ``optimize``'s verification, and with ``base``, ``candidate`` and ``data`` `check`'s result."""

    windows: int
    window_tokens: int
    perplexity: Perplexity
    token_agreement: float
    greedy: GreedyRecord = GreedyRecord()
    latency: DecoderLatencyRecord | None = None
    size_ratio: float | None = None
    checks: list[CheckResult] = dataclasses.field(default_factory=list)
    passed: bool = False
    base: str = ""
    candidate: str = ""
    data: DataRecord = DataRecord()


@dataclasses.dataclass(frozen=True, kw_only=True)
class ComparisonRecord:
    """``check``'s comparison (``verify.compare.Comparison.to_dict``), also the ``verification``
    of ``optimize``'s report, where ``text`` holds a decoder's comparison as text generator."""

    base: str = ""
    candidate: str = ""
    passed: bool = False
    data: DataRecord = DataRecord()
    base_bytes: int = 0
    candidate_bytes: int = 0
    size_ratio: float | None = None
    parity: ParitySummary | None = None
    latency: LatencyRecord | None = None
    checks: list[CheckResult] = dataclasses.field(default_factory=list)
    text: DecoderComparisonRecord | None = None


def comparison_record(data: Mapping[str, Any]) -> ComparisonRecord | DecoderComparisonRecord:
    """The record of `check`'s result: two decoders' (it states perplexity) or two model files'."""
    return to_record(DecoderComparisonRecord if "perplexity" in data else ComparisonRecord, data)


@dataclasses.dataclass(frozen=True, kw_only=True)
class RecipeRecord:
    name: str | None = None
    description: str = ""


@dataclasses.dataclass(frozen=True, kw_only=True)
class PassStepRecord:
    """One step of ``optimize``'s report (``passes.pipeline.StepRecord.to_dict``): what the
    renderers use of it. ``details`` is the pass's own report (see ``report.layers``)."""

    name: str
    details: dict[str, Any] = dataclasses.field(default_factory=dict)
    rolled_back: bool = False


@dataclasses.dataclass(frozen=True, kw_only=True)
class OptimizeRecord:
    """``optimize``'s report (``optimize.OptimizeReport.to_dict``): what the renderers use of it."""

    output: str = ""
    input_bytes: int = 0
    output_bytes: int = 0
    recipe: RecipeRecord = RecipeRecord()
    steps: list[PassStepRecord] = dataclasses.field(default_factory=list)
    verification: ComparisonRecord = ComparisonRecord()
    retreats: int = 0
    seconds: float = 0.0


@dataclasses.dataclass(kw_only=True)  # not frozen: LatencyStats is not
class BenchRecord(LatencyStats):
    """``bench``'s result (``api.bench``): the model's latency, and what it ran on."""

    model: str
    threads: int
    data: DataRecord
    peak_rss_mib: float | None = None


@dataclasses.dataclass(frozen=True, kw_only=True)
class DistillSummary:
    history: list[dict[str, float]]  # one entry per epoch
    best_metric: float | None
    metric: str
    stopped: str


@dataclasses.dataclass(frozen=True, kw_only=True)
class DistilledFiles:
    state_dict: str  # the ONNX file is the export's ``path``


@dataclasses.dataclass(frozen=True, kw_only=True)
class StudentExport:
    path: str  # the student's ONNX file
    exporter: str
    parity: ParitySummary  # against torch


@dataclasses.dataclass(frozen=True, kw_only=True)
class DistillRecord:
    """``distill``'s report (``torch.config.run_config``); ``outputs`` and ``export`` once written."""

    teacher_params: int
    student_params: int
    distill: DistillSummary
    outputs: DistilledFiles | None = None
    export: StudentExport | None = None


@dataclasses.dataclass(frozen=True, kw_only=True)
class FusionRecord:
    changes: dict[str, int] = dataclasses.field(default_factory=dict)  # what the fusion made, e.g. "attention nodes"


@dataclasses.dataclass(frozen=True, kw_only=True)
class DecoderExportParity:
    """An exported decoder against torch: logits on each prompt's prefill and cached steps, greedy forks."""

    prompts: int
    decode_steps: int
    prefill_max_abs: float
    decode_max_abs: float
    greedy_identical: int
    forks: list[dict[str, Any]] = dataclasses.field(default_factory=list)


@dataclasses.dataclass(frozen=True, kw_only=True)
class DecoderExportRecord:
    """``export``'s report (``torch.decoder.export_decoder``)."""

    output: str
    architecture: str
    layers: int
    fusion: FusionRecord
    parity: DecoderExportParity


__all__ = ["BaseAndCandidate", "BenchRecord", "ComparisonRecord", "DataRecord", "DecoderComparisonRecord",
           "DecoderExportParity", "DecoderExportRecord", "DecoderLatencyRecord", "DistillRecord", "DistillSummary",
           "DistilledFiles", "FusionRecord", "GreedyRecord", "LatencyRecord", "OptimizeRecord", "ParitySummary",
           "PassStepRecord", "Perplexity", "RecipeRecord", "StudentExport", "comparison_record", "to_record"]
