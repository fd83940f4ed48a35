"""Structural checks on an untrusted model, each failure naming the node or tensor at fault."""

from __future__ import annotations

import math
import os
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
from google.protobuf.message import Message

from graphopt.errors import InvalidModelError

# Bytes per element for fixed-size types; sub-byte types are handled by _BITS.
_BITS = {
    onnx.TensorProto.INT4: 4,
    onnx.TensorProto.UINT4: 4,
}
_FLOAT_TYPES = {
    ir.DataType.FLOAT,
    ir.DataType.FLOAT16,
    ir.DataType.BFLOAT16,
    ir.DataType.DOUBLE,
}


def tensor_nbytes(tensor: onnx.TensorProto) -> int | None:
    """Bytes the tensor's data must occupy, or None where that is not fixed (strings)."""
    if tensor.data_type in (onnx.TensorProto.STRING, onnx.TensorProto.UNDEFINED):
        return None
    count = math.prod(tensor.dims)
    if tensor.data_type in _BITS:
        return (count * _BITS[tensor.data_type] + 7) // 8
    try:
        itemsize = onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type).itemsize
    except (KeyError, ValueError):
        return None
    return count * itemsize


def iter_tensors(proto: onnx.ModelProto) -> Iterator[onnx.TensorProto]:
    """Every TensorProto in the model: initializers, Constant values, subgraphs, functions."""
    yield from _graph_tensors(proto.graph)
    for function in proto.functions:
        yield from _nodes_tensors(function.node)


def _graph_tensors(graph: onnx.GraphProto) -> Iterator[onnx.TensorProto]:
    yield from graph.initializer
    for sparse in graph.sparse_initializer:
        yield sparse.values
        yield sparse.indices
    yield from _nodes_tensors(graph.node)


def _nodes_tensors(nodes: Iterable[onnx.NodeProto]) -> Iterator[onnx.TensorProto]:
    for node in nodes:
        for attr in node.attribute:
            if attr.HasField("t"):
                yield attr.t
            yield from attr.tensors
            if attr.HasField("sparse_tensor"):
                yield attr.sparse_tensor.values
                yield attr.sparse_tensor.indices
            if attr.HasField("g"):
                yield from _graph_tensors(attr.g)
            for graph in attr.graphs:
                yield from _graph_tensors(graph)


def check_structure(proto: onnx.ModelProto, path: Path) -> None:
    """Refuse models onnxruntime would choke on, with a message naming the culprit.

    The onnx checker gets the path, not the proto: given a proto it resolves external data
    against the current directory instead of the model's folder.
    """
    name = str(path)
    if not any(op.domain in ("", "ai.onnx") for op in proto.opset_import):
        raise InvalidModelError(f"{name}: model declares no default-domain opset (opset_import is empty)")
    if not proto.graph.output:
        raise InvalidModelError(f"{name}: graph has no outputs")
    _check_inline_sizes(proto, name)
    _check_text(proto, name, "model")
    _check_graph(proto.graph, name, outer=frozenset())
    try:
        onnx.checker.check_model(str(path))
    except onnx.checker.ValidationError as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else "invalid model"
        if not only_runtime_default_domain_ops(proto, first, name, path.parent):
            raise InvalidModelError(f"{name}: ONNX checker: {first}") from None
    except UnicodeDecodeError:  # the checker's message quotes a name that is not UTF-8
        raise InvalidModelError(f"{name}: ONNX checker: a name or string in the model is not valid UTF-8") from None


# onnxruntime kernels registered in the default ONNX domain though the standard has no such op
# (fused decoder norms, as onnxruntime and its model builders emit them).
RUNTIME_DEFAULT_DOMAIN_OPS = frozenset({"SimplifiedLayerNormalization"})


def only_runtime_default_domain_ops(proto: onnx.ModelProto, error: str, name: str, folder: Path | None = None) -> bool:
    """Whether the checker's complaint ``error`` is only about such ops: then the model is checked
    again with them moved to onnxruntime's own domain, where the checker leaves ops alone (an
    InvalidModelError naming ``name`` if it still fails). ``folder``: where its external data is."""
    if not any(f"No Op registered for {op} " in error for op in RUNTIME_DEFAULT_DOMAIN_OPS):
        return False
    copy = onnx.ModelProto()
    copy.CopyFrom(proto)
    for node in _all_nodes(copy.graph):
        if node.op_type in RUNTIME_DEFAULT_DOMAIN_OPS and node.domain in ("", "ai.onnx"):
            node.domain = "com.microsoft"
    if not any(op.domain == "com.microsoft" for op in copy.opset_import):
        copy.opset_import.add(domain="com.microsoft", version=1)
    previous = os.getcwd()
    if folder is not None:
        os.chdir(folder)  # the checker resolves a proto's external data against the working folder
    try:
        onnx.checker.check_model(copy)
    except onnx.checker.ValidationError as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else "invalid model"
        raise InvalidModelError(f"{name}: ONNX checker: {first}") from None
    finally:
        os.chdir(previous)
    return True


def _all_nodes(graph: onnx.GraphProto) -> Iterator[onnx.NodeProto]:
    for node in graph.node:
        yield node
        for attribute in node.attribute:
            if attribute.g.ByteSize():
                yield from _all_nodes(attribute.g)
            for subgraph in attribute.graphs:
                yield from _all_nodes(subgraph)


def check_input_types(model: ir.Model, name: str) -> None:
    """Every graph input needs an element type that data can be made of."""
    for value in model.graph.inputs:
        if value.name in model.graph.initializers:
            continue
        dtype = value.dtype
        try:
            if dtype is None or dtype == ir.DataType.UNDEFINED:
                raise TypeError
            dtype.numpy()
        except TypeError:
            raise InvalidModelError(f"{name}: input '{value.name}' has no usable element type ({dtype})") from None


def _check_inline_sizes(proto: onnx.ModelProto, name: str) -> None:
    for tensor in iter_tensors(proto):
        if tensor.data_location == onnx.TensorProto.EXTERNAL or not tensor.HasField("raw_data"):
            continue
        needed = tensor_nbytes(tensor)
        if needed is not None and len(tensor.raw_data) != needed:
            raise InvalidModelError(
                f"{name}: tensor '{tensor.name}' holds {len(tensor.raw_data)} bytes "
                f"but its shape {list(tensor.dims)} needs {needed}"
            )


def _check_text(message: Message, name: str, where: str) -> None:
    """protobuf accepts any bytes in an ONNX string field (proto2); every tool after it wants UTF-8."""
    if isinstance(message, onnx.TensorProto):  # never list a tensor's fields: that copies its data
        fields = [("name", message.name), ("doc_string", message.doc_string)]
        fields += [("external_data", entry.value) for entry in message.external_data]
        fields += [("external_data", entry.key) for entry in message.external_data]
        for field, value in fields:
            _require_utf8(value, name, f"{where}.{field}")
        return
    for field, value in message.ListFields():
        if field.type not in (field.TYPE_STRING, field.TYPE_MESSAGE):
            continue
        for item in value if field.is_repeated else [value]:
            if field.type == field.TYPE_STRING:
                _require_utf8(item, name, f"{where}.{field.name}")
            else:
                _check_text(item, name, f"{where}.{field.name}")


def _require_utf8(value: str | bytes, name: str, where: str) -> None:
    if isinstance(value, bytes):
        raise InvalidModelError(f"{name}: {where} is not valid UTF-8 ({value[:40]!r})")


def _check_graph(graph: onnx.GraphProto, name: str, outer: frozenset[str]) -> None:
    """Dangling inputs, duplicate outputs and cycles, scope-aware for subgraphs."""
    available = set(outer) | {i.name for i in graph.input} | {t.name for t in graph.initializer}
    available |= {s.values.name for s in graph.sparse_initializer}
    producer: dict[str, str] = {}
    for node in graph.node:
        for out in node.output:
            if not out:
                continue
            if out in producer or out in available - set(outer):
                raise InvalidModelError(
                    f"{name}: tensor '{out}' is produced twice (node '{node.name or node.op_type}')"
                )
            producer[out] = node.name or node.op_type
    known = available | set(producer)
    for node in graph.node:
        for inp in node.input:
            if inp and inp not in known:
                raise InvalidModelError(
                    f"{name}: node '{node.name or node.op_type}' reads '{inp}', which nothing produces"
                )
        for attr in node.attribute:
            for sub in ([attr.g] if attr.HasField("g") else []) + list(attr.graphs):
                _check_graph(sub, name, frozenset(known))
    for out in graph.output:
        if out.name not in known:
            raise InvalidModelError(f"{name}: graph output '{out.name}' is not produced by any node")
    _check_acyclic(graph, name, available)


def _check_acyclic(graph: onnx.GraphProto, name: str, available: set[str]) -> None:
    """Kahn's algorithm over the graph's own node outputs; anything left over is on a cycle."""
    local = {out for node in graph.node for out in node.output if out} - available
    consumers: dict[str, list[int]] = {}
    waiting = []
    for index, node in enumerate(graph.node):
        deps = {i for i in node.input if i in local}
        waiting.append(len(deps))
        for dep in deps:
            consumers.setdefault(dep, []).append(index)
    ready = [i for i, count in enumerate(waiting) if count == 0]
    done = 0
    while ready:
        index = ready.pop()
        done += 1
        for out in graph.node[index].output:
            for consumer in consumers.get(out, ()):
                waiting[consumer] -= 1
                if waiting[consumer] == 0:
                    ready.append(consumer)
    if done < len(graph.node):
        stuck = next(n for i, n in enumerate(graph.node) if waiting[i] > 0)
        raise InvalidModelError(f"{name}: graph has a cycle through node '{stuck.name or stuck.op_type}'")


def check_finite_weights(model: ir.Model, name: str) -> None:
    """NaN in any float constant, or Inf in a weight, poisons every pass and every output.

    A single-element ±Inf constant is allowed: exporters use it as a mask fill value
    (attention masks, ``where(mask, x, -inf)``)."""
    for tensor_name, tensor in _constant_tensors(model.graph):
        if tensor.dtype not in _FLOAT_TYPES:
            continue
        flat = tensor.numpy().reshape(-1)
        for start in range(0, flat.size, 1 << 24):
            chunk = flat[start : start + (1 << 24)].astype(np.float32)
            if np.isnan(chunk).any():
                raise InvalidModelError(f"{name}: weight '{tensor_name}' contains NaN values")
            if flat.size > 1 and np.isinf(chunk).any():
                raise InvalidModelError(f"{name}: weight '{tensor_name}' contains Inf values")
        del flat
        if isinstance(tensor, ir.ExternalTensor):  # a model too large to load: leave no page mapped
            tensor.release()


def _constant_tensors(graph: ir.Graph) -> Iterator[tuple[str, ir.TensorProtocol]]:
    for value in graph.initializers.values():
        if value.const_value is not None:
            yield value.name or "?", value.const_value
    for node in ir.traversal.RecursiveGraphIterator(graph):
        if node.op_type == "Constant" and node.domain in ("", "ai.onnx"):
            attr = node.attributes.get("value")
            if attr is not None and isinstance(attr.value, ir.TensorProtocol):
                yield node.outputs[0].name or "?", attr.value
        for attr in node.attributes.values():
            if attr.type == ir.AttributeType.GRAPH:
                for value in attr.value.initializers.values():
                    if value.const_value is not None:
                        yield value.name or "?", value.const_value
