"""Verification with onnxruntime: feeds, parity, latency, the gate.

The names below are imported on first use, so that a light submodule (``verify.metrics``, the
command line's choices) loads without numpy, onnx and onnx-ir.
"""

import importlib

_HOMES = {
    "CheckResult": "gate",
    "Comparison": "compare",
    "FeedSet": "feeds",
    "InputSpec": "feeds",
    "ParityReport": "parity",
    "Thresholds": "gate",
    "compare_files": "compare",
    "compare_outputs": "parity",
    "gate_checks": "gate",
    "input_specs": "feeds",
    "load_feeds": "feeds",
    "parse_shape_overrides": "feeds",
}


def __getattr__(name: str) -> object:
    if name in _HOMES:
        return getattr(importlib.import_module(f"graphopt.verify.{_HOMES[name]}"), name)
    raise AttributeError(f"module 'graphopt.verify' has no attribute '{name}'")


__all__ = sorted(_HOMES)
