"""onnxruntime sessions as the user-level judge runs them: the reference exactly as written
(graph optimizations off, so the runtime cannot hide a change), the candidate as deployed."""

from __future__ import annotations

from pathlib import Path

THREADS = 2


def session(path: Path, *, optimized: bool):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = THREADS
    options.log_severity_level = 3
    if not optimized:
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
