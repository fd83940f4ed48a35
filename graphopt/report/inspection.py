"""What `graphopt inspect` shows: signature, opsets, ops, parameters, big tensors, files."""

from __future__ import annotations

import dataclasses
import math
from collections import Counter, defaultdict
from typing import Any

import onnx_ir as ir

from graphopt.io import LoadedModel
from graphopt.passes.pipeline import op_histogram
from graphopt.verify.kinds import JUDGED_BY, classify

Dim = int | str | None


@dataclasses.dataclass(frozen=True, kw_only=True)
class ValueInfo:
    """A graph input or output; an output also says what it holds and how it is judged."""

    name: str
    dtype: str | None
    shape: tuple[Dim, ...] | None
    kind: str | None = None
    judged_by: str | None = None

    def to_dict(self) -> dict[str, Any]:
        data: dict[str, Any] = {"name": self.name, "dtype": self.dtype,
                                "shape": None if self.shape is None else list(self.shape)}
        if self.kind is not None:
            data.update(kind=self.kind, judged_by=self.judged_by)
        return data


@dataclasses.dataclass(frozen=True)
class DtypeTotal:
    parameters: int = 0
    bytes: int = 0


@dataclasses.dataclass(frozen=True, kw_only=True)
class WeightTensor:
    name: str
    dtype: str
    shape: tuple[int, ...]
    bytes: int


@dataclasses.dataclass(frozen=True, kw_only=True)
class DataFile:
    path: str  # relative to the model's folder (a bundle's file: to the bundle)
    bytes: int


@dataclasses.dataclass(frozen=True, kw_only=True)
class ModelDescription:
    """What a model is; ``to_dict`` is `graphopt inspect --json`, its keys the fields in order."""

    path: str
    file_bytes: int
    ir_version: int
    producer: str
    opsets: dict[str, int]
    inputs: tuple[ValueInfo, ...]
    outputs: tuple[ValueInfo, ...]
    nodes: int
    ops: dict[str, int]  # op type → count, most frequent first
    parameters: int
    parameter_bytes: int
    parameters_by_dtype: dict[str, DtypeTotal]
    largest_tensors: tuple[WeightTensor, ...]
    external_data_files: tuple[DataFile, ...]

    def to_dict(self) -> dict[str, Any]:
        return _fields_json(self)


def _fields_json(record: Any) -> dict[str, Any]:
    return {field.name: _json(getattr(record, field.name)) for field in dataclasses.fields(record)}


def _json(value: Any) -> Any:
    """A description's value as JSON data: a record as its own ``to_dict`` or by its fields,
    tuples as lists."""
    if hasattr(value, "to_dict"):
        return value.to_dict()
    if dataclasses.is_dataclass(value):
        return _fields_json(value)
    if isinstance(value, tuple):
        return [_json(item) for item in value]
    if isinstance(value, dict):
        return {key: _json(item) for key, item in value.items()}
    return value


def _value_info(value: ir.Value, *, output: bool = False) -> ValueInfo:
    dims = value.shape.dims if value.shape is not None else None
    kind = classify(value) if output else None
    return ValueInfo(
        name=value.name,
        dtype=value.dtype.name.lower() if value.dtype is not None else None,
        shape=None if dims is None else tuple(d if isinstance(d, int) else (str(d) if d is not None else None)
                                              for d in dims),
        kind=kind,
        judged_by=JUDGED_BY[kind] if kind is not None else None,
    )


def _weights(model: ir.Model) -> list[tuple[str, ir.TensorProtocol]]:
    tensors = [(v.name or "?", v.const_value) for v in model.graph.initializers.values() if v.const_value is not None]
    for node in ir.traversal.RecursiveGraphIterator(model.graph):
        attr = node.attributes.get("value") if node.op_type == "Constant" else None
        if attr is not None and isinstance(attr.value, ir.TensorProtocol):
            tensors.append((node.outputs[0].name or "?", attr.value))
    return tensors


def describe(loaded: LoadedModel, *, largest: int = 10) -> ModelDescription:
    model = loaded.model
    weights = _weights(model)
    by_dtype: dict[str, DtypeTotal] = defaultdict(DtypeTotal)
    for _, tensor in weights:
        dtype = tensor.dtype.name.lower()
        total = by_dtype[dtype]
        by_dtype[dtype] = DtypeTotal(total.parameters + math.prod(tensor.shape.numpy()),
                                     total.bytes + tensor.nbytes)
    biggest = sorted(weights, key=lambda item: item[1].nbytes, reverse=True)[:largest]
    inputs = [v for v in model.graph.inputs if v.name not in model.graph.initializers]
    ops = dict(sorted(op_histogram(model).items(), key=lambda kv: (-kv[1], kv[0])))
    return ModelDescription(
        path=str(loaded.path),
        file_bytes=loaded.file_bytes,
        ir_version=model.ir_version,
        producer=" ".join(p for p in (model.producer_name, model.producer_version) if p),
        opsets={domain or "ai.onnx": version for domain, version in sorted(model.opset_imports.items())},
        inputs=tuple(_value_info(v) for v in inputs),
        outputs=tuple(_value_info(v, output=True) for v in model.graph.outputs),
        nodes=sum(ops.values()),
        ops=ops,
        parameters=sum(total.parameters for total in by_dtype.values()),
        parameter_bytes=sum(total.bytes for total in by_dtype.values()),
        parameters_by_dtype=dict(sorted(by_dtype.items())),
        largest_tensors=tuple(WeightTensor(name=name, dtype=t.dtype.name.lower(), shape=tuple(t.shape.numpy()),
                                           bytes=t.nbytes) for name, t in biggest),
        external_data_files=tuple(DataFile(path=str(f.relative_to(loaded.path.parent)), bytes=f.stat().st_size)
                                  for f in loaded.files[1:]),
    )


# A symbolic dimension longer than this is shown cut (exporters write whole expressions).
MAX_DIM_TEXT = 24


def _dim_text(dim: Dim) -> str:
    text = "?" if dim is None else str(dim)
    return text if len(text) <= MAX_DIM_TEXT else text[: MAX_DIM_TEXT - 1] + "…"


def _shape_text(info: ValueInfo) -> str:
    dims = "?" if info.shape is None else ",".join(_dim_text(d) for d in info.shape)
    return f"{info.name}: {info.dtype}[{dims}]"


def _size(nbytes: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if nbytes < 1024 or unit == "GiB":
            return f"{nbytes:.0f} {unit}" if unit == "B" else f"{nbytes:.1f} {unit}"
        nbytes /= 1024
    return str(nbytes)


def format_text(info: ModelDescription) -> str:
    lines = [
        f"{info.path}  ({_size(info.file_bytes)}, IR {info.ir_version}"
        + (f", {info.producer})" if info.producer else ")"),
        "opsets:   " + ", ".join(f"{d} {v}" for d, v in info.opsets.items()),
        *("input:    " + _shape_text(i) for i in info.inputs),
        *(f"output:   {_shape_text(o)}  ({o.kind}: judged by {o.judged_by})" for o in info.outputs),
        f"nodes:    {info.nodes}  (" + ", ".join(f"{op} {n}" for op, n in Counter(info.ops).most_common(12))
        + (", …)" if len(info.ops) > 12 else ")"),
        f"params:   {info.parameters:,} in {_size(info.parameter_bytes)}  ("
        + ", ".join(f"{d} {e.parameters:,}" for d, e in info.parameters_by_dtype.items()) + ")",
        "largest:",
        *(f"  {t.name}  {t.dtype}{list(t.shape)}  {_size(t.bytes)}" for t in info.largest_tensors[:5]),
    ]
    lines += [f"external: {f.path} ({_size(f.bytes)})" for f in info.external_data_files]
    return "\n".join(lines)
