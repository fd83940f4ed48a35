"""How to cut each op type: given the channels removed from each channel tensor, slice the
weights, biases and per-channel parameters of every node touching them (one cutter per op).

Knows nothing about why channels are removed; the groups come from ``dependency`` and the
choice from the passes. A constant shared with another reader is copied, never edited in
place; a replaced initializer nobody reads any more is dropped.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import numpy as np
import onnx_ir as ir

from graphopt.passes.prune.dependency import ChannelGroup, ChannelTensor, Dependency, constant
from graphopt.passes.naming import unique_value_name

Removed = dict[int, np.ndarray]  # id(value) -> sorted channel indices removed from it


def removal_plan(dependency: Dependency, groups: Iterable[ChannelGroup]) -> tuple[Removed, list[ChannelGroup]]:
    """Channels removed per tensor, and the groups actually removed: a group that would leave
    some tensor with no channel at all is kept (the first such group of each tensor)."""
    chosen = [g for g in groups if g.prunable]
    remaining = {key: t.size for key, t in dependency.tensors.items()}
    for group in chosen:
        for tensor, _ in group.members:
            remaining[id(tensor.value)] -= 1
    kept: list[ChannelGroup] = []
    for group in chosen:
        if any(remaining[id(t.value)] < 1 for t, _ in group.members):
            kept.append(group)
            for tensor, _ in group.members:
                remaining[id(tensor.value)] += 1
    kept_ids = {g.index for g in kept}
    removed_groups = [g for g in chosen if g.index not in kept_ids]
    indices: dict[int, list[int]] = {}
    for group in removed_groups:
        for tensor, channel in group.members:
            indices.setdefault(id(tensor.value), []).append(channel)
    return {key: np.array(sorted(v), dtype=np.int64) for key, v in indices.items()}, removed_groups


def apply_cuts(graph: ir.Graph, dependency: Dependency, removed: Removed) -> int:
    """Cut every node touching a tensor in ``removed``; returns the number of nodes cut."""
    touched: dict[int, ir.Node] = {}
    for key in removed:
        value = dependency.tensors[key].value
        for node in (value.producer(), *value.consumers()):
            if node is not None:
                touched[id(node)] = node
    for node in touched.values():
        _CUTTERS.get(node.op_type, _cut_elementwise)(graph, node, dependency, removed)
    for key, drop in removed.items():
        _shrink_shape(dependency.tensors[key], len(drop))
    return len(touched)


def _drop(removed: Removed, value: ir.Value | None) -> np.ndarray:
    return removed.get(id(value), np.zeros(0, np.int64)) if value is not None else np.zeros(0, np.int64)


def _shrink_shape(tensor: ChannelTensor, count: int) -> None:
    shape = tensor.value.shape
    if shape is None or (tensor.rank is not None and len(shape) != tensor.rank) or len(shape) < -tensor.axis:
        tensor.value.shape = None
        return
    dims = list(shape)
    dims[tensor.axis] = tensor.size - count
    tensor.value.shape = ir.Shape(dims)


def replace_constant(graph: ir.Graph, node: ir.Node, index: int, array: np.ndarray) -> None:
    """Make input ``index`` of ``node`` read ``array``: edited in place when this node is the
    initializer's only reader, otherwise a new initializer."""
    old = node.inputs[index]
    sole_reader = old.name in graph.initializers and len(old.uses()) == 1 and not old.is_graph_output()
    if sole_reader:
        old.const_value = ir.tensor(np.ascontiguousarray(array), name=old.name)
        old.shape = ir.Shape(array.shape)
        return
    value = ir.Value(name=unique_value_name(graph, f"{old.name or 'param'}_pruned"), const_value=ir.tensor(array))
    value.const_value.name = value.name
    value.shape = ir.Shape(array.shape)
    value.dtype = old.dtype or ir.DataType.FLOAT
    graph.register_initializer(value)
    node.replace_input_with(index, value)
    if old.name in graph.initializers and not old.uses() and not old.is_graph_output():
        graph.initializers.pop(old.name)


def _cut_conv(graph: ir.Graph, node: ir.Node, dependency: Dependency, removed: Removed) -> None:
    weight = constant(node.inputs[1])
    out_drop, in_drop = _drop(removed, node.outputs[0]), _drop(removed, node.inputs[0])
    group = node.attributes.get_int("group", 1)
    if group == 1:
        weight = np.delete(np.delete(weight, out_drop, axis=0), in_drop, axis=1)
    else:  # depthwise: input and output channels are the same group, so out_drop == in_drop
        weight = np.delete(weight, out_drop, axis=0)
        node.attributes["group"] = ir.AttrInt64("group", group - len(out_drop))
    replace_constant(graph, node, 1, weight)
    _cut_bias(graph, node, 2, out_drop)


def _cut_conv_transpose(graph: ir.Graph, node: ir.Node, dependency: Dependency, removed: Removed) -> None:
    weight = constant(node.inputs[1])
    out_drop, in_drop = _drop(removed, node.outputs[0]), _drop(removed, node.inputs[0])
    replace_constant(graph, node, 1, np.delete(np.delete(weight, in_drop, axis=0), out_drop, axis=1))
    _cut_bias(graph, node, 2, out_drop)


def _cut_matrix(graph: ir.Graph, node: ir.Node, dependency: Dependency, removed: Removed) -> None:
    weight = constant(node.inputs[1])
    out_axis = 0 if node.op_type == "Gemm" and node.attributes.get_int("transB", 0) else 1
    out_drop, in_drop = _drop(removed, node.outputs[0]), _drop(removed, node.inputs[0])
    replace_constant(graph, node, 1, np.delete(np.delete(weight, out_drop, axis=out_axis), in_drop, axis=1 - out_axis))
    if node.op_type == "Gemm":
        _cut_bias(graph, node, 2, out_drop, axis=-1)


def _cut_bias(graph: ir.Graph, node: ir.Node, index: int, drop: np.ndarray, axis: int = 0) -> None:
    if len(drop) == 0 or len(node.inputs) <= index or node.inputs[index] is None:
        return
    bias = constant(node.inputs[index])
    if bias.ndim and bias.shape[axis] > 1:
        replace_constant(graph, node, index, np.delete(bias, drop, axis=axis))


def _cut_batchnorm(graph: ir.Graph, node: ir.Node, dependency: Dependency, removed: Removed) -> None:
    drop = _drop(removed, node.outputs[0])
    for index in range(1, 5):
        replace_constant(graph, node, index, np.delete(constant(node.inputs[index]), drop, axis=0))


def _cut_elementwise(graph: ir.Graph, node: ir.Node, dependency: Dependency, removed: Removed) -> None:
    """Element-wise ops, pools, Flatten, Concat: only per-channel constant inputs change."""
    output = dependency.tensor(node.outputs[0])
    drop = _drop(removed, node.outputs[0])
    if output is None or len(drop) == 0:
        return
    for index, value in enumerate(node.inputs):
        array = constant(value)
        if array is None or array.ndim < -output.axis or array.shape[output.axis] != output.size or output.size == 1:
            continue
        replace_constant(graph, node, index, np.delete(array, drop, axis=array.ndim + output.axis))


_CUTTERS: dict[str, Callable[[ir.Graph, ir.Node, Dependency, Removed], None]] = {
    "Conv": _cut_conv,
    "ConvTranspose": _cut_conv_transpose,
    "Gemm": _cut_matrix,
    "MatMul": _cut_matrix,
    "BatchNormalization": _cut_batchnorm,
}


def parameter_count(graph: ir.Graph) -> int:
    """Elements of float initializers and Constant-node tensors."""
    total = sum(v.const_value.size for v in graph.initializers.values()
                if v.const_value is not None and v.const_value.dtype == ir.DataType.FLOAT)
    for node in graph:
        if node.op_type == "Constant":
            attr = node.attributes.get("value")
            if attr is not None and isinstance(attr.value, ir.TensorProtocol) and attr.value.dtype == ir.DataType.FLOAT:
                total += attr.value.size
    return total
