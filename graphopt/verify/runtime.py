"""onnxruntime sessions. The only module of graphopt's core that imports onnxruntime,
and only when a function here is called."""

from __future__ import annotations

import os
from typing import Any

import onnx
import onnx_ir as ir

from graphopt.errors import InvalidModelError, UsageError, reason
from graphopt.io import EXTERNAL_DATA_THRESHOLD_BYTES, weights_nbytes


def _ort() -> Any:
    import onnxruntime

    # onnxruntime prints its own errors, coloured, before graphopt's one line says the same.
    onnxruntime.set_default_logger_severity(4)
    return onnxruntime


def default_threads() -> int:
    return os.cpu_count() or 1


def make_session(
    model: str | os.PathLike | bytes, *, optimize: bool = True, threads: int | None = None, level: str | None = None,
    provider: str | None = None,
) -> Any:
    """An onnxruntime CPU session. ``optimize=False`` turns graph optimizations off, so that a
    reference run cannot hide a broken rewrite behind the runtime's own fusions. ``level``
    ("basic", "extended", "all") picks a level in between where one must be matched. ``provider``:
    an onnxruntime execution provider (default CPUExecutionProvider)."""
    ort = _ort()
    options = ort.SessionOptions()
    levels = {"basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
              "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
              "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL}
    options.graph_optimization_level = (
        levels[level] if level else
        ort.GraphOptimizationLevel.ORT_ENABLE_ALL if optimize else ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    )
    options.intra_op_num_threads = threads or default_threads()
    options.inter_op_num_threads = 1
    options.log_severity_level = 4
    source = model if isinstance(model, bytes) else str(model)
    providers = [provider or "CPUExecutionProvider"]
    if providers[0] not in ort.get_available_providers():
        raise UsageError(f"execution provider '{providers[0]}' is not in this onnxruntime; available: "
                         f"{', '.join(ort.get_available_providers())}")
    try:
        return ort.InferenceSession(source, sess_options=options, providers=providers)
    except Exception as exc:  # onnxruntime raises its own exception types (Fail, InvalidGraph…)
        where = "model" if isinstance(model, bytes) else str(model)
        raise InvalidModelError(f"{where}: onnxruntime cannot load it: {reason(exc)}") from None


def check_loadable(model: ir.Model) -> None:
    """The model passes onnx's checker and onnxruntime creates a session for it.

    Models whose weights exceed the protobuf limit are checked after they are written.
    """
    if weights_nbytes(model) > EXTERNAL_DATA_THRESHOLD_BYTES:
        return
    proto = ir.serde.serialize_model(model)
    try:
        onnx.checker.check_model(proto)
    except onnx.checker.ValidationError as exc:
        from graphopt.validation import only_runtime_default_domain_ops

        if not only_runtime_default_domain_ops(proto, str(exc).strip().splitlines()[0] if str(exc).strip() else "",
                                               "model"):
            raise InvalidModelError(f"ONNX checker: {reason(exc)}") from None
    make_session(proto.SerializeToString(), optimize=False, threads=1)


def onnxruntime_version() -> str:
    return _ort().__version__
