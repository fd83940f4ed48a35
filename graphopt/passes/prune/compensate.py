"""What the consumers of removed channels get instead: each removed channel's mean
contribution in their bias, and for MatMul/Gemm optionally a least-squares refit of the
weights of the kept channels on calibration activations (the kept channels take over what the
removed ones predicted)."""

from __future__ import annotations

import dataclasses

import numpy as np
import onnx_ir as ir

from graphopt.passes.naming import unique_node_name
from graphopt.passes.prune.cut import Removed, replace_constant
from graphopt.passes.prune.dependency import ChannelTensor, Dependency, constant, weight_layout
from graphopt.passes.prune.moments import ChannelMoments
from graphopt.passes.weights import initializer


def weight_slices(tensor: ChannelTensor) -> list[tuple[str, ir.Node, np.ndarray, int]]:
    """(role, node, weight, axis) of every weight slice indexed by this tensor's channels."""
    found = []
    producer = tensor.value.producer()
    if producer is not None and weight_layout(producer) is not None:
        weight, out_axis, _ = weight_layout(producer)
        found.append(("producer", producer, weight, out_axis))
    for consumer in tensor.value.consumers():
        layout = weight_layout(consumer)
        if layout is None or consumer.inputs[0] is not tensor.value or consumer.attributes.get_int("group", 1) != 1:
            continue  # a depthwise Conv's input slice is its output slice, counted as producer
        found.append(("consumer", consumer, layout[0], layout[2]))
    return found


@dataclasses.dataclass
class Correction:
    """What a consumer gets after losing input channels: a bias shift over its full outputs
    and, when refitted, new weights ``[kept inputs, full outputs]``."""

    node: ir.Node
    bias: np.ndarray
    weight: np.ndarray | None = None
    in_axis: int = 0


def bias_corrections(dependency: Dependency, removed: Removed, moments: dict[str, ChannelMoments],
                     *, refit: bool = False) -> list[Correction]:
    """For each consumer losing input channels with known statistics: their mean contribution
    to each output (exact for MatMul/Gemm; for Conv, away from padded borders). With ``refit``
    and a known covariance, MatMul/Gemm weights of the kept inputs are refitted by least
    squares to predict the removed inputs' contribution: W'ₖ = Wₖ + Σₖₖ⁻¹ Σₖᵣ Wᵣ."""
    corrections = []
    for key, drop in removed.items():
        tensor = dependency.tensors[key]
        stats = moments.get(tensor.value.name or "")
        if stats is None or stats.mean.size != tensor.size:
            continue
        for role, node, weight, axis in weight_slices(tensor):
            if role != "consumer" or node.op_type == "ConvTranspose":
                continue
            rows = np.moveaxis(weight, axis, 0).astype(np.float64)  # [in, out, (kernel…)]
            contribution = rows.reshape(rows.shape[0], rows.shape[1], -1).sum(axis=2)
            delta = stats.mean[drop] @ contribution[drop]
            new_weight = None
            covariance = stats.covariance
            if refit and covariance is not None and node.op_type in ("MatMul", "Gemm"):
                keep = np.setdiff1d(np.arange(tensor.size), drop)
                kk = covariance[np.ix_(keep, keep)]
                kk = kk + np.eye(len(keep)) * 0.05 * max(float(np.mean(np.diag(kk))), 1e-12)
                new_weight = contribution[keep] + np.linalg.solve(kk, covariance[np.ix_(keep, drop)] @ contribution[drop])
                delta = stats.mean @ contribution - stats.mean[keep] @ new_weight
            if node.op_type == "Gemm":  # Y = alpha·A·B + beta·C
                delta *= node.attributes.get_float("alpha", 1.0) / node.attributes.get_float("beta", 1.0)
            corrections.append(Correction(node, delta, new_weight, axis))
    return corrections


def apply_bias_corrections(graph: ir.Graph, corrections: list[Correction], removed: Removed) -> None:
    """Add each correction to its node (after the cuts: sliced like the node's outputs)."""
    for correction in corrections:
        node = correction.node
        out_drop = removed.get(id(node.outputs[0]), np.zeros(0, np.int64))
        if correction.weight is not None:
            weight = np.delete(correction.weight, out_drop, axis=1).astype(np.float32)
            replace_constant(graph, node, 1, np.ascontiguousarray(np.moveaxis(weight, 0, correction.in_axis)))
        delta = np.delete(correction.bias, out_drop).astype(np.float32)
        if node.op_type == "MatMul":
            _add_after(graph, node, delta)
            continue
        index = 2
        bias = constant(node.inputs[index]) if len(node.inputs) > index and node.inputs[index] is not None else None
        if bias is None:
            value = initializer(graph, f"{node.name or 'layer'}_bias", delta)
            node.resize_inputs(3)
            node.replace_input_with(index, value)
        else:
            replace_constant(graph, node, index, (bias + delta.reshape(bias.shape) if bias.size == delta.size
                                                  else bias + delta).astype(np.float32))


def _add_after(graph: ir.Graph, node: ir.Node, delta: np.ndarray) -> None:
    output = node.outputs[0]
    users = output.consumers()
    if len(users) == 1 and users[0].op_type == "Add" and len(users[0].inputs) == 2:
        add = users[0]
        index = 1 if add.inputs[0] is output else 0
        bias = constant(add.inputs[index])
        if bias is not None and bias.shape[-1:] == delta.shape and bias.size == delta.size:
            replace_constant(graph, add, index, (bias + delta.reshape(bias.shape)).astype(np.float32))
            return
    value = initializer(graph, f"{node.name or 'matmul'}_pruned_mean", delta)
    add = ir.node("Add", [output, value], name=unique_node_name(graph, f"{node.name or 'matmul'}_pruned_mean"))
    output.replace_all_uses_with(add.outputs[0])
    add.replace_input_with(0, output)
    graph.insert_after(node, add)
    if output.is_graph_output():
        add.outputs[0].name, output.name = output.name, f"{output.name}_before_mean"
        graph.outputs[graph.outputs.index(output)] = add.outputs[0]
