"""Verification with onnxruntime: feeds, parity, latency, the gate."""

from graphopt.verify.compare import Comparison, compare_files
from graphopt.verify.feeds import FeedSet, InputSpec, input_specs, load_feeds, parse_shape_overrides
from graphopt.verify.gate import CheckResult, Thresholds, gate_checks
from graphopt.verify.parity import ParityReport, compare_outputs

__all__ = [
    "CheckResult",
    "Comparison",
    "FeedSet",
    "InputSpec",
    "ParityReport",
    "Thresholds",
    "compare_files",
    "compare_outputs",
    "gate_checks",
    "input_specs",
    "load_feeds",
    "parse_shape_overrides",
]
