"""Which channels are coupled: the dependency graph of channel pruning.

Every tensor that carries prunable channels (a *channel tensor*) gets one atom per channel;
an op that ties channel i of one tensor to channel j of another unites their atoms. A
connected set of atoms is a :class:`ChannelGroup`: removing it means removing each of its
atoms from its tensor at once (a residual Add ties the channels of every branch; a depthwise
Conv ties its input and output channels; a Concat ties its output channel ``offset + i`` to
channel i of input k).

Tensors are found from the *producers* (Conv, ConvTranspose, Gemm and MatMul with a constant
weight) outwards, through their consumers and the producers of every tensor they reach. Each
op reached must be understood by a rule below; otherwise, and for graph inputs and outputs,
every atom of the tensors it touches is blocked with the reason recorded, and any group
holding a blocked atom cannot be pruned (conservative by construction).

Channel axes are kept negative (counted from the end), which is how broadcasting aligns.
This module decides nothing about *which* groups to remove nor *how* to cut an op.
"""

from __future__ import annotations

import dataclasses
from collections import defaultdict, deque

import numpy as np
import onnx_ir as ir

from graphopt.passes.weights import exclusion

WEIGHT_OPS = ("Conv", "ConvTranspose", "Gemm", "MatMul")
UNARY_OPS = frozenset({
    "Relu", "Clip", "LeakyRelu", "Sigmoid", "HardSigmoid", "HardSwish", "Tanh", "Erf", "Neg", "Abs",
    "Identity", "Dropout", "Elu", "Selu", "Softplus", "Gelu", "Mish", "Exp", "Sqrt", "PRelu",
})
BINARY_OPS = frozenset({"Add", "Sub", "Mul", "Div", "Max", "Min"})
POOL_OPS = frozenset({"GlobalAveragePool", "GlobalMaxPool", "MaxPool", "AveragePool"})


@dataclasses.dataclass
class ChannelTensor:
    """One tensor carrying channels along ``axis`` (negative) of a tensor of ``rank``."""

    value: ir.Value
    axis: int
    size: int
    rank: int | None
    first_atom: int


@dataclasses.dataclass
class ChannelGroup:
    """Coupled channels: (tensor, channel index) pairs removed together."""

    index: int
    members: list[tuple[ChannelTensor, int]]
    blocked: list[str]

    @property
    def prunable(self) -> bool:
        return not self.blocked

    @property
    def family(self) -> tuple[str, ...]:
        """The tensors this group lives in: groups of one layer share it."""
        return tuple(sorted({t.value.name or "?" for t, _ in self.members}))


@dataclasses.dataclass
class Dependency:
    """The result of the analysis: channel tensors (by value id) and their groups."""

    tensors: dict[int, ChannelTensor]
    groups: list[ChannelGroup]
    blocked_reasons: dict[str, str]  # tensor name -> why its channels cannot be pruned
    understood: set[int]  # ids of the nodes a rule accepted

    def tensor(self, value: ir.Value | None) -> ChannelTensor | None:
        return None if value is None else self.tensors.get(id(value))


def constant(value: ir.Value | None) -> np.ndarray | None:
    """The value's array if it is a constant (initializer or Constant node output)."""
    if value is None or value.is_graph_input():
        return None
    if value.const_value is not None:
        return value.const_value.numpy()
    producer = value.producer()
    if producer is not None and producer.op_type == "Constant" and producer.domain in ("", "ai.onnx"):
        attr = producer.attributes.get("value")
        if attr is not None and isinstance(attr.value, ir.TensorProtocol):
            return attr.value.numpy()
    return None


def inferred_shapes(model: ir.Model) -> dict[str, tuple[int | None, ...]]:
    """Tensor name -> shape (None for a symbolic dimension) by ONNX shape inference on a copy;
    the model itself is not touched (cleanup drops intermediate shapes on purpose)."""
    import onnx

    try:
        proto = onnx.shape_inference.infer_shapes(ir.serde.serialize_model(model), data_prop=True)
    except Exception:  # noqa: BLE001 - no shapes only means fewer channels can be proven prunable
        return {}
    shapes = {}
    for info in (*proto.graph.input, *proto.graph.value_info, *proto.graph.output):
        tensor_type = info.type.tensor_type
        if tensor_type.HasField("shape"):
            shapes[info.name] = tuple(d.dim_value if d.HasField("dim_value") else None for d in tensor_type.shape.dim)
    return shapes


class _Blocked(Exception):
    """An op the analysis does not understand; the message says why."""


class _Builder:
    def __init__(self, graph: ir.Graph, shapes: dict[str, tuple[int | None, ...]], exclude: tuple[str, ...] = ()) -> None:
        self.graph = graph
        self.exclude = exclude
        self.shapes = shapes
        self.tensors: dict[int, ChannelTensor] = {}
        self.parent: list[int] = []
        self.blocked: dict[int, str] = {}  # atom root candidates -> reason (resolved at the end)
        self.queue: deque[ChannelTensor] = deque()
        self.visited_nodes: set[int] = set()
        self.understood: set[int] = set()
        self.reasons: dict[str, str] = {}

    # -- union-find over atoms -------------------------------------------------------------
    def _find(self, atom: int) -> int:
        while self.parent[atom] != atom:
            self.parent[atom] = self.parent[self.parent[atom]]
            atom = self.parent[atom]
        return atom

    def union(self, a: ChannelTensor, a_offset: int, b: ChannelTensor, b_offset: int, length: int) -> None:
        for i in range(length):
            ra, rb = self._find(a.first_atom + a_offset + i), self._find(b.first_atom + b_offset + i)
            if ra != rb:
                self.parent[rb] = ra

    def register(self, value: ir.Value, axis: int, size: int, rank: int | None) -> ChannelTensor:
        known = self.tensors.get(id(value))
        if known is not None:
            if known.axis != axis or known.size != size:
                self.block(known, f"channels along two axes ({known.axis}, {axis})")
            return known
        tensor = ChannelTensor(value, axis, size, rank, len(self.parent))
        self.parent.extend(range(tensor.first_atom, tensor.first_atom + size))
        self.tensors[id(value)] = tensor
        self.queue.append(tensor)
        if value.is_graph_output():
            self.block(tensor, "graph output")
        if value.is_graph_input():
            self.block(tensor, "graph input")
        return tensor

    def block(self, tensor: ChannelTensor, reason: str) -> None:
        self.reasons.setdefault(tensor.value.name or "?", reason)
        for atom in range(tensor.first_atom, tensor.first_atom + tensor.size):
            self.blocked.setdefault(atom, reason)

    # -- traversal ------------------------------------------------------------------------
    def run(self) -> Dependency:
        for node in self.graph:
            if node.op_type in WEIGHT_OPS and weight_layout(node) is not None:
                self.visit(node)
        while self.queue:
            tensor = self.queue.popleft()
            producer = tensor.value.producer()
            if producer is not None:
                self.visit(producer, tensor)
            for consumer in tensor.value.consumers():
                self.visit(consumer, tensor)
        return self._result()

    def visit(self, node: ir.Node, via: ChannelTensor | None = None) -> None:
        if id(node) in self.visited_nodes:
            return
        self.visited_nodes.add(id(node))
        try:
            if node.graph is not self.graph:
                raise _Blocked("used inside a subgraph")
            if node.domain not in ("", "ai.onnx"):
                raise _Blocked(f"{node.domain}:{node.op_type} is not understood")
            rule = _RULES.get(node.op_type)
            if rule is None:
                raise _Blocked(f"{node.op_type} is not understood")
            rule(self, node, via)
            self.understood.add(id(node))
        except (_Blocked, IndexError, ValueError, TypeError) as exc:
            # Unforeseen attribute or shape combinations block too: never guess a mapping.
            reason = f"{node.op_type} node '{node.name}': {exc}"
            for value in (*node.inputs, *node.outputs):
                tensor = self.tensors.get(id(value)) if value is not None else None
                if tensor is not None:
                    self.block(tensor, reason)
            if via is not None:
                self.block(via, reason)

    def _result(self) -> Dependency:
        for tensor in list(self.tensors.values()):  # channels an excluded node reads or writes stay
            for node in (tensor.value.producer(), *tensor.value.consumers()):
                if node is not None and (excluded := exclusion(node, self.exclude)) is not None:
                    self.block(tensor, f"{node.op_type} node '{node.name}': {excluded}")
        atoms: dict[int, list[tuple[ChannelTensor, int]]] = defaultdict(list)
        for tensor in self.tensors.values():
            for i in range(tensor.size):
                atoms[self._find(tensor.first_atom + i)].append((tensor, i))
        blocked_roots: dict[int, list[str]] = defaultdict(list)
        for atom, reason in self.blocked.items():
            reasons = blocked_roots[self._find(atom)]
            if reason not in reasons:
                reasons.append(reason)
        groups = [ChannelGroup(index, members, blocked_roots.get(root, []))
                  for index, (root, members) in enumerate(sorted(atoms.items()))]
        return Dependency(self.tensors, groups, self.reasons, self.understood)

    # -- helpers for the rules --------------------------------------------------------------
    def static_shape(self, value: ir.Value) -> tuple[int | None, ...] | None:
        array = constant(value)
        if array is not None:
            return tuple(array.shape)
        if value.shape is not None:
            return tuple(d if isinstance(d, int) else None for d in value.shape)
        return self.shapes.get(value.name or "")

    def rank_of(self, value: ir.Value) -> int | None:
        known = self.tensors.get(id(value))
        if known is not None and known.rank is not None:
            return known.rank
        shape = self.static_shape(value)
        return None if shape is None else len(shape)

    def dim(self, value: ir.Value, axis: int) -> int | None:
        known = self.tensors.get(id(value))
        if known is not None and known.axis == axis:
            return known.size
        shape = self.static_shape(value)
        if shape is None or len(shape) < -axis:
            return None
        return shape[axis]

    def channel_of(self, value: ir.Value, via: ChannelTensor | None) -> ChannelTensor:
        known = self.tensors.get(id(value))
        if known is None:
            raise _Blocked(f"reached from a tensor whose channels are unknown ({value.name})")
        return known


def weight_layout(node: ir.Node) -> tuple[np.ndarray, int, int] | None:
    """(weight, output-channel axis, input-channel axis) of a weight op with a constant weight
    read by a variable input, or None."""
    if len(node.inputs) < 2 or constant(node.inputs[0]) is not None:
        return None
    weight = constant(node.inputs[1])
    if weight is None or weight.dtype != np.float32:
        return None
    op = node.op_type
    if op == "Conv" and weight.ndim >= 3:
        return weight, 0, 1
    if op == "ConvTranspose" and weight.ndim >= 3:
        return weight, 1, 0
    if op == "MatMul" and weight.ndim == 2:
        return weight, 1, 0
    if op == "Gemm" and weight.ndim == 2 and not node.attributes.get_int("transA", 0):
        return (weight, 0, 1) if node.attributes.get_int("transB", 0) else (weight, 1, 0)
    return None


# -- rules: one per op kind ------------------------------------------------------------------

def _weight_rule(b: _Builder, node: ir.Node, via: ChannelTensor | None) -> None:
    layout = weight_layout(node)
    if layout is None:
        raise _Blocked("weight is not a constant float tensor read by a variable input")
    weight, out_axis, in_axis = layout
    op, group = node.op_type, node.attributes.get_int("group", 1)
    if op in ("Conv", "ConvTranspose"):
        rank = weight.ndim
        axis = -(rank - 1)
        c_out = weight.shape[0] if op == "Conv" else weight.shape[1] * group
        c_in = weight.shape[1] * group if op == "Conv" else weight.shape[0]
    else:
        rank = b.rank_of(node.inputs[0])
        axis = -1
        c_out, c_in = weight.shape[out_axis], weight.shape[in_axis]
        if op == "Gemm" and len(node.inputs) > 2 and node.inputs[2] is not None:
            bias = constant(node.inputs[2])
            if bias is None or (bias.ndim == 2 and bias.shape[0] != 1):
                raise _Blocked("bias is not a constant row")
    if op == "Conv" and len(node.inputs) > 2 and node.inputs[2] is not None and constant(node.inputs[2]) is None:
        raise _Blocked("bias is not constant")
    output = b.register(node.outputs[0], axis, c_out, rank)
    source = b.register(node.inputs[0], axis, c_in, rank)
    if group == 1:
        return
    if op == "Conv" and group == c_in == c_out:
        b.union(source, 0, output, 0, c_in)  # depthwise: channel i in is channel i out
        return
    b.block(output, f"{op} node '{node.name}': grouped (group={group}) with {c_in} in, {c_out} out channels")
    b.block(source, f"{op} node '{node.name}': grouped (group={group}) with {c_in} in, {c_out} out channels")


def _unary_rule(b: _Builder, node: ir.Node, via: ChannelTensor | None) -> None:
    if node.op_type == "Dropout" and len(node.outputs) > 1 and node.outputs[1].consumers():
        raise _Blocked("its mask output is used")
    if node.op_type == "PRelu":
        _binary_rule(b, node, via)
        return
    for extra in node.inputs[1:]:
        if extra is not None and constant(extra) is None:
            raise _Blocked("a parameter input is not constant")
    source = b.tensors.get(id(node.inputs[0]))
    if source is None:
        source = b.channel_of(node.outputs[0], via)
        source = b.register(node.inputs[0], source.axis, source.size, source.rank)
    output = b.register(node.outputs[0], source.axis, source.size, source.rank)
    b.union(source, 0, output, 0, source.size)


def _binary_rule(b: _Builder, node: ir.Node, via: ChannelTensor | None) -> None:
    anchor = via or b.channel_of(node.outputs[0], via)
    axis, size = anchor.axis, anchor.size
    out_rank = b.rank_of(node.outputs[0])
    if b.dim(node.outputs[0], axis) not in (None, size):
        raise _Blocked(f"broadcasts {size} channels to {b.dim(node.outputs[0], axis)}")
    output = b.register(node.outputs[0], axis, size, out_rank or anchor.rank)
    for value in node.inputs:
        if value is None:
            continue
        if constant(value) is not None:
            shape = constant(value).shape
            if len(shape) >= -axis and shape[axis] not in (1, size):
                raise _Blocked(f"constant '{value.name}' has {shape[axis]} entries along the channel axis, not {size}")
            continue
        width = b.dim(value, axis)
        rank = b.rank_of(value)
        if rank is not None and rank < -axis:
            continue  # broadcast along the channel axis: one value for every channel
        if width == 1:
            continue
        if width != size:
            raise _Blocked(f"input '{value.name}' has {width} channels where {size} are expected")
        b.union(output, 0, b.register(value, axis, size, rank), 0, size)


def _batchnorm_rule(b: _Builder, node: ir.Node, via: ChannelTensor | None) -> None:
    if len(node.outputs) > 1 and any(v.consumers() for v in node.outputs[1:]):
        raise _Blocked("training-mode outputs are used")
    if any(constant(v) is None for v in node.inputs[1:5]):
        raise _Blocked("scale, bias, mean or variance is not constant")
    _channel_first_rule(b, node, via)


def _pool_rule(b: _Builder, node: ir.Node, via: ChannelTensor | None) -> None:
    if len(node.outputs) > 1 and node.outputs[1].consumers():
        raise _Blocked("its indices output is used")
    _channel_first_rule(b, node, via)


def _channel_first_rule(b: _Builder, node: ir.Node, via: ChannelTensor | None) -> None:
    """An elementwise-per-channel op that only works with channels on axis 1 (NCHW)."""
    anchor = via or b.channel_of(node.outputs[0], via)
    if anchor.rank is None or anchor.axis != 1 - anchor.rank:
        raise _Blocked("channels are not on axis 1")
    _unary_rule(b, node, via)


def _flatten_rule(b: _Builder, node: ir.Node, via: ChannelTensor | None) -> None:
    shape = b.static_shape(node.inputs[0])
    flatten_at = node.attributes.get_int("axis", 1)
    if shape is None or not 0 < flatten_at < len(shape) or shape[flatten_at] is None \
            or any(d != 1 for d in shape[flatten_at + 1:]):
        raise _Blocked("only [N, C, 1, …] flattened at the channel axis keeps a static channel mapping")
    source = b.register(node.inputs[0], flatten_at - len(shape), shape[flatten_at], len(shape))
    output = b.register(node.outputs[0], -1, source.size, 2)
    b.union(source, 0, output, 0, source.size)


def _concat_rule(b: _Builder, node: ir.Node, via: ChannelTensor | None) -> None:
    anchor = via or b.channel_of(node.outputs[0], via)
    if anchor.rank is None:
        raise _Blocked("rank unknown")
    concat_axis = node.attributes.get_int("axis", 0)
    concat_axis = concat_axis - anchor.rank if concat_axis >= 0 else concat_axis
    if any(v is None or constant(v) is not None for v in node.inputs):
        raise _Blocked("an input is constant")
    if concat_axis != anchor.axis:
        output = b.register(node.outputs[0], anchor.axis, anchor.size, anchor.rank)
        for value in node.inputs:
            b.union(output, 0, b.register(value, anchor.axis, anchor.size, anchor.rank), 0, anchor.size)
        return
    widths = [b.dim(v, anchor.axis) for v in node.inputs]
    if any(w is None for w in widths):
        raise _Blocked("an input's channel count is unknown")
    output = b.register(node.outputs[0], anchor.axis, sum(widths), anchor.rank)
    offset = 0
    for value, width in zip(node.inputs, widths):
        b.union(output, offset, b.register(value, anchor.axis, width, anchor.rank), 0, width)
        offset += width


_RULES = {
    **{op: _weight_rule for op in WEIGHT_OPS},
    **{op: _unary_rule for op in UNARY_OPS},
    **{op: _binary_rule for op in BINARY_OPS},
    **{op: _pool_rule for op in POOL_OPS},
    "BatchNormalization": _batchnorm_rule,
    "Flatten": _flatten_rule,
    "Concat": _concat_rule,
}


def analyze(model: ir.Model, exclude: tuple[str, ...] = ()) -> Dependency:
    """Channel tensors and coupled groups of the main graph (uses inside subgraphs block, and
    so does every node ``exclude`` matches: see ``quantize.targets.exclusion``)."""
    return _Builder(model.graph, inferred_shapes(model), exclude).run()
