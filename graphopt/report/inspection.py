"""What `graphopt inspect` shows: signature, opsets, ops, parameters, big tensors, files."""

from __future__ import annotations

import math
from collections import Counter, defaultdict
from typing import Any

import onnx_ir as ir

from graphopt.io import LoadedModel
from graphopt.passes.pipeline import op_histogram
from graphopt.verify.kinds import JUDGED_BY, classify


def _value_info(value: ir.Value) -> dict[str, Any]:
    dims = value.shape.dims if value.shape is not None else None
    return {
        "name": value.name,
        "dtype": value.dtype.name.lower() if value.dtype is not None else None,
        "shape": None if dims is None else [d if isinstance(d, int) else (str(d) if d is not None else None) for d in dims],
    }


def _weights(model: ir.Model) -> list[tuple[str, ir.TensorProtocol]]:
    tensors = [(v.name or "?", v.const_value) for v in model.graph.initializers.values() if v.const_value is not None]
    for node in ir.traversal.RecursiveGraphIterator(model.graph):
        attr = node.attributes.get("value") if node.op_type == "Constant" else None
        if attr is not None and isinstance(attr.value, ir.TensorProtocol):
            tensors.append((node.outputs[0].name or "?", attr.value))
    return tensors


def describe(loaded: LoadedModel, *, largest: int = 10) -> dict[str, Any]:
    model = loaded.model
    weights = _weights(model)
    by_dtype: dict[str, dict[str, int]] = defaultdict(lambda: {"parameters": 0, "bytes": 0})
    for _, tensor in weights:
        entry = by_dtype[tensor.dtype.name.lower()]
        entry["parameters"] += math.prod(tensor.shape.numpy())
        entry["bytes"] += tensor.nbytes
    biggest = sorted(weights, key=lambda item: item[1].nbytes, reverse=True)[:largest]
    inputs = [v for v in model.graph.inputs if v.name not in model.graph.initializers]
    return {
        "path": str(loaded.path),
        "file_bytes": loaded.file_bytes,
        "ir_version": model.ir_version,
        "producer": " ".join(p for p in (model.producer_name, model.producer_version) if p),
        "opsets": {domain or "ai.onnx": version for domain, version in sorted(model.opset_imports.items())},
        "inputs": [_value_info(v) for v in inputs],
        "outputs": [{**_value_info(v), "kind": classify(v), "judged_by": JUDGED_BY[classify(v)]}
                    for v in model.graph.outputs],
        "nodes": sum(op_histogram(model).values()),
        "ops": dict(sorted(op_histogram(model).items(), key=lambda kv: (-kv[1], kv[0]))),
        "parameters": sum(e["parameters"] for e in by_dtype.values()),
        "parameter_bytes": sum(e["bytes"] for e in by_dtype.values()),
        "parameters_by_dtype": dict(sorted(by_dtype.items())),
        "largest_tensors": [
            {"name": name, "dtype": t.dtype.name.lower(), "shape": list(t.shape.numpy()), "bytes": t.nbytes}
            for name, t in biggest
        ],
        "external_data_files": [
            {"path": str(f.relative_to(loaded.path.parent)), "bytes": f.stat().st_size} for f in loaded.files[1:]
        ],
    }


# A symbolic dimension longer than this is shown cut (exporters write whole expressions).
MAX_DIM_TEXT = 24


def _dim_text(dim: Any) -> str:
    text = "?" if dim is None else str(dim)
    return text if len(text) <= MAX_DIM_TEXT else text[: MAX_DIM_TEXT - 1] + "…"


def _shape_text(info: dict[str, Any]) -> str:
    dims = "?" if info["shape"] is None else ",".join(_dim_text(d) for d in info["shape"])
    return f"{info['name']}: {info['dtype']}[{dims}]"


def _size(nbytes: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if nbytes < 1024 or unit == "GiB":
            return f"{nbytes:.0f} {unit}" if unit == "B" else f"{nbytes:.1f} {unit}"
        nbytes /= 1024
    return str(nbytes)


def format_text(info: dict[str, Any]) -> str:
    lines = [
        f"{info['path']}  ({_size(info['file_bytes'])}, IR {info['ir_version']}"
        + (f", {info['producer']})" if info["producer"] else ")"),
        "opsets:   " + ", ".join(f"{d} {v}" for d, v in info["opsets"].items()),
        *("input:    " + _shape_text(i) for i in info["inputs"]),
        *(f"output:   {_shape_text(o)}  ({o['kind']}: judged by {o['judged_by']})" for o in info["outputs"]),
        f"nodes:    {info['nodes']}  (" + ", ".join(f"{op} {n}" for op, n in Counter(info["ops"]).most_common(12))
        + (", …)" if len(info["ops"]) > 12 else ")"),
        f"params:   {info['parameters']:,} in {_size(info['parameter_bytes'])}  ("
        + ", ".join(f"{d} {e['parameters']:,}" for d, e in info["parameters_by_dtype"].items()) + ")",
        "largest:",
        *(f"  {t['name']}  {t['dtype']}{t['shape']}  {_size(t['bytes'])}" for t in info["largest_tensors"][:5]),
    ]
    lines += [f"external: {f['path']} ({_size(f['bytes'])})" for f in info["external_data_files"]]
    return "\n".join(lines)
