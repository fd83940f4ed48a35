"""Symbolic shapes proven from what a graph declares: the shapes of its inputs — one dimension
name is one size there, as ONNX says — and its constants. ``ShapeFacts`` follows shapes and small
integer contents (shape arithmetic) through the ops it knows; a size it cannot follow stays
unknown (``_Opaque``: equal only to itself) and proves nothing. Used to prove rewrites exact
(``remove-no-ops``), never to measure.
"""

from __future__ import annotations

import dataclasses
from collections import Counter
from collections.abc import Iterable, Sequence

import onnx_ir as ir

DEFAULT = ("", "ai.onnx")
MICROSOFT = "com.microsoft"
RESHAPES = ("Reshape", "Squeeze", "Unsqueeze")  # keep the elements in order: only the shape changes


def transpose_perm(node: ir.Node, facts: ShapeFacts) -> list[int] | None:
    """A Transpose's permutation (none given: the axes reversed), where its input's rank is known."""
    perm = node.attributes.get("perm")
    if perm is not None:
        return list(perm.value)
    shape = facts.shape(node.inputs[0])
    return list(reversed(range(len(shape)))) if shape is not None else None


@dataclasses.dataclass(frozen=True)
class _Opaque:
    """A number fixed at run time, known only by where it is: axis or element ``index`` of
    ``value``. Equal only to itself. A dimension is never negative; an element may be."""

    value: ir.Value  # compared and hashed by identity
    index: int
    is_dim: bool


Dim = int | str | _Opaque  # str: a dimension name of the graph's inputs
Shape = tuple[Dim, ...]

MAX_ELEMENTS = 64  # integer tensors up to this size are followed element by element (shape arithmetic)


class ShapeFacts:
    """Shapes, dtypes and small integer contents of a graph's values, inferred in node order.

    A shape is None (rank unknown) or a tuple of dimensions; an unknown dimension is an
    ``_Opaque`` of the value it belongs to, so that ops passing a shape on keep it provably equal."""

    def __init__(self, graph: ir.Graph) -> None:
        self._shapes: dict[ir.Value, Shape] = {}
        self._contents: dict[ir.Value, tuple[Dim, ...]] = {}
        for value in graph.inputs:
            if value.shape is not None:
                self._shapes[value] = _unknown_named(value, [_declared(dim) for dim in value.shape])
        for value in graph.initializers.values():
            if not value.is_graph_input():  # an initializer that is also an input is only a default
                self._learn_constant(value, value.const_value)
        for node in graph:
            self._learn(node)

    def shape(self, value: ir.Value | None) -> Shape | None:
        return self._shapes.get(value) if value is not None else None

    def dtype(self, value: ir.Value) -> ir.DataType | None:
        if value.dtype is not None:
            return value.dtype
        producer = value.producer()
        if producer is not None and producer.op_type == "Cast" and producer.domain in DEFAULT:
            return ir.DataType(producer.attributes["to"].value)
        return None

    def elements(self, value: ir.Value | None) -> tuple[Dim, ...] | None:
        """The elements of a small integer tensor, flattened; unknown ones opaque."""
        if value is None:
            return None
        if value in self._contents:
            return self._contents[value]
        size = _static_size(self.shape(value))
        return tuple(_Opaque(value, k, False) for k in range(size)) if size is not None else None

    def contents(self, value: ir.Value | None) -> tuple[Dim, ...] | None:
        """The elements of a small integer tensor as far as they were followed (None: not at all)."""
        return self._contents.get(value) if value is not None else None

    def ints(self, value: ir.Value | None) -> list[int] | None:
        elements = self.elements(value)
        return list(elements) if elements is not None and all(isinstance(e, int) for e in elements) else None

    def _learn_constant(self, value: ir.Value, tensor: ir.TensorProtocol | None) -> None:
        if tensor is None:
            return
        self._shapes[value] = tuple(tensor.shape)
        if tensor.dtype in (ir.DataType.INT64, ir.DataType.INT32) and tensor.size <= MAX_ELEMENTS:
            self._contents[value] = tuple(int(x) for x in tensor.numpy().reshape(-1))

    def _learn(self, node: ir.Node) -> None:
        if node.op_type == "Constant" and node.domain in DEFAULT:
            attribute = next(iter(node.attributes.values()), None)
            if attribute is not None and attribute.name in ("value", "value_int", "value_ints"):
                tensor = attribute.value if attribute.name == "value" else ir.tensor(attribute.value)
                self._learn_constant(node.outputs[0], tensor)
            return
        rule = _SHAPE_RULES.get((MICROSOFT if node.domain == MICROSOFT else "", node.op_type)) \
            if node.domain in (*DEFAULT, MICROSOFT) else None
        try:
            shapes = rule(node, self) if rule else None
        except (IndexError, KeyError, ValueError, ZeroDivisionError):  # a node it cannot read proves nothing
            shapes = None
        for value, shape in zip(node.outputs, shapes or ()):
            if shape is not None:
                self._shapes[value] = _unknown_named(value, shape)
        try:
            contents = _contents(node, self) if node.domain in DEFAULT else None
        except (IndexError, KeyError, ValueError):
            contents = None
        if contents is not None and len(contents) <= MAX_ELEMENTS:
            self._contents[node.outputs[0]] = contents


def _unknown_named(value: ir.Value, dims: Sequence[Dim | None]) -> Shape:
    """``dims`` with each unknown one named after its place: equal to itself wherever it is passed on."""
    return tuple(_Opaque(value, axis, True) if dim is None else dim for axis, dim in enumerate(dims))


def _declared(dim: int | ir.SymbolicDim) -> Dim | None:
    if isinstance(dim, int):
        return dim
    return dim.value if dim.value else None  # an unnamed dimension: some size, named by ShapeFacts


def _static_size(shape: Shape | None) -> int | None:
    if shape is None or not all(isinstance(d, int) for d in shape):
        return None
    size = 1
    for d in shape:
        size *= d
    return size if size <= MAX_ELEMENTS else None


def _is_size(element: Dim) -> bool:
    """Known never to be negative: a literal, a named dimension, a dimension of a value."""
    return (isinstance(element, int) and element >= 0) or isinstance(element, str) or \
        (isinstance(element, _Opaque) and element.is_dim)


def _broadcast(*shapes: Shape | None) -> Shape | None:
    if any(shape is None for shape in shapes):
        return None
    rank = max(len(shape) for shape in shapes)
    padded = [(1,) * (rank - len(shape)) + shape for shape in shapes]
    return tuple(_broadcast_dim([shape[axis] for shape in padded]) for axis in range(rank))


def _broadcast_dim(dims: Sequence[Dim]) -> Dim | None:
    """Where the op runs, every dim is 1 or the result: a literal other than 1 is the result."""
    others = {d for d in dims if d != 1}
    literal = {d for d in others if isinstance(d, int)}
    if literal:
        return next(iter(literal)) if len(literal) == 1 else None
    if not others:
        return 1
    return next(iter(others)) if len(others) == 1 else None


def _telling(dim: Dim) -> int:
    """Which of several equal dimensions to keep: a literal, else a name, else an opaque one."""
    return 0 if isinstance(dim, int) else 1 if isinstance(dim, str) else 2


def _product(dims: Iterable[Dim]) -> tuple[int, Counter]:
    coefficient, symbols = 1, Counter()
    for d in dims:
        if isinstance(d, int):
            coefficient *= d
        else:
            symbols[d] += 1
    return coefficient, symbols


def _quotient(total: tuple[int, Counter], part: tuple[int, Counter]) -> Dim | None:
    """total / part as one dimension, when it is a literal or a single symbol."""
    (a, top), (b, bottom) = total, part
    if b == 0 or a % b or any(bottom[s] > top[s] for s in bottom):
        return None
    left = top - bottom
    if not left:
        return a // b
    if a // b == 1 and sum(left.values()) == 1:
        return next(iter(left))
    return None


def _axis(node: ir.Node, rank: int, default: int = 0) -> int:
    axis = node.attributes["axis"].value if "axis" in node.attributes else default
    return axis + rank if axis < 0 else axis


def _axes(node: ir.Node, facts: ShapeFacts) -> list[int] | None:
    """Squeeze/Unsqueeze axes: the second input (opset 13) or the attribute."""
    if len(node.inputs) > 1 and node.inputs[1] is not None:
        return facts.ints(node.inputs[1])
    return list(node.attributes["axes"].value) if "axes" in node.attributes else None


# Each rule: the output shapes of a node (None: unknown), from what the facts know of its inputs.


def _same_as_input(node: ir.Node, facts: ShapeFacts) -> list[Shape | None]:
    return [facts.shape(node.inputs[0])]


def _normalized(node: ir.Node, facts: ShapeFacts) -> list[Shape | None]:
    """Normalizations: output 0 (and the input + skip sum, output 3) has the input's shape."""
    shape = facts.shape(node.inputs[0])
    return [shape, None, None, shape]


def _elementwise(node: ir.Node, facts: ShapeFacts) -> list[Shape | None]:
    return [_broadcast(*(facts.shape(value) for value in node.inputs if value is not None))]


def _matmul(node: ir.Node, facts: ShapeFacts) -> list[Shape | None]:
    a, b = facts.shape(node.inputs[0]), facts.shape(node.inputs[1])
    if a is None or b is None or len(a) < 2 or len(b) < 2:
        return [None]
    return [(*_broadcast(a[:-2], b[:-2]), a[-2], b[-1])]


def _matmul_nbits(node: ir.Node, facts: ShapeFacts) -> list[Shape | None]:
    a = facts.shape(node.inputs[0])
    return [(*a[:-1], node.attributes["N"].value) if a else None]


def _gather(node: ir.Node, facts: ShapeFacts) -> list[Shape | None]:
    data, indices = facts.shape(node.inputs[0]), facts.shape(node.inputs[1])
    if data is None or indices is None:
        return [None]
    axis = _axis(node, len(data))
    return [(*data[:axis], *indices, *data[axis + 1:])]


def _gather_nd(node: ir.Node, facts: ShapeFacts) -> list[Shape | None]:
    data, indices = facts.shape(node.inputs[0]), facts.shape(node.inputs[1])
    batch = node.attributes["batch_dims"].value if "batch_dims" in node.attributes else 0
    if data is None or indices is None or not indices or not isinstance(indices[-1], int):
        return [None]
    return [(*indices[:-1], *data[batch + indices[-1]:])]


def _reshape(node: ir.Node, facts: ShapeFacts) -> list[Shape | None]:
    source, target = facts.shape(node.inputs[0]), facts.elements(node.inputs[1])
    if target is None:
        return [None]
    allow_zero = "allowzero" in node.attributes and node.attributes["allowzero"].value
    dims: list[Dim | None] = []
    for axis, element in enumerate(target):
        copied = source[axis] if source is not None and axis < len(source) else None
        if element == 0 and not allow_zero:
            dims.append(copied)
        elif isinstance(element, int) or (_is_size(element) and (allow_zero or element == copied)):
            dims.append(element)  # a size that may be 0 without allowzero is only known where the input's is the same
        else:
            dims.append(None)
    if any(isinstance(d, int) and d < -1 for d in dims) or dims.count(-1) > 1:
        return [None]
    if -1 in dims:
        rest = [d for d in dims if d != -1]
        known = source is not None and None not in rest
        dims[dims.index(-1)] = _quotient(_product(source), _product(rest)) if known else None
    return [tuple(dims)]


def _squeeze(node: ir.Node, facts: ShapeFacts) -> list[Shape | None]:
    shape, axes = facts.shape(node.inputs[0]), _axes(node, facts)
    if shape is None or (axes is None and not all(isinstance(d, int) for d in shape)):
        return [None]
    drop = {a % len(shape) for a in axes} if axes is not None else {a for a, d in enumerate(shape) if d == 1}
    return [tuple(d for a, d in enumerate(shape) if a not in drop)]


def _unsqueeze(node: ir.Node, facts: ShapeFacts) -> list[Shape | None]:
    shape, axes = facts.shape(node.inputs[0]), _axes(node, facts)
    if shape is None or axes is None:
        return [None]
    rank = len(shape) + len(axes)
    ones = {a % rank for a in axes}
    rest = iter(shape)
    return [tuple(1 if a in ones else next(rest) for a in range(rank))]


def _transpose(node: ir.Node, facts: ShapeFacts) -> list[Shape | None]:
    shape, perm = facts.shape(node.inputs[0]), transpose_perm(node, facts)
    if shape is None or perm is None or sorted(perm) != list(range(len(shape))):
        return [None]
    return [tuple(shape[p] for p in perm)]


def _concat(node: ir.Node, facts: ShapeFacts) -> list[Shape | None]:
    shapes = [facts.shape(value) for value in node.inputs if value is not None]
    if not shapes or any(shape is None or len(shape) != len(shapes[0]) for shape in shapes):
        return [None]
    axis = _axis(node, len(shapes[0]))
    dims: list[Dim | None] = []
    for a in range(len(shapes[0])):
        column = [shape[a] for shape in shapes]
        if a != axis:
            dims.append(min(column, key=_telling))  # where it runs, they are all equal
        elif len(column) == 1 or all(isinstance(d, int) for d in column):
            dims.append(sum(column) if len(column) > 1 else column[0])
        else:
            dims.append(None)
    return [tuple(dims)]


def _split(node: ir.Node, facts: ShapeFacts) -> list[Shape | None]:
    shape = facts.shape(node.inputs[0])
    if shape is None:
        return [None] * len(node.outputs)
    axis = _axis(node, len(shape))
    if len(node.inputs) > 1 and node.inputs[1] is not None:
        sizes = facts.ints(node.inputs[1])
    elif "split" in node.attributes:
        sizes = list(node.attributes["split"].value)
    elif isinstance(shape[axis], int) and shape[axis] % len(node.outputs) == 0:
        sizes = [shape[axis] // len(node.outputs)] * len(node.outputs)
    else:
        sizes = None
    if sizes is None or len(sizes) != len(node.outputs):
        return [None] * len(node.outputs)
    return [(*shape[:axis], size, *shape[axis + 1:]) for size in sizes]


def _expand(node: ir.Node, facts: ShapeFacts) -> list[Shape | None]:
    target = facts.elements(node.inputs[1])
    if target is None:
        return [None]
    return [_broadcast(facts.shape(node.inputs[0]), tuple(t if _is_size(t) else None for t in target))]


def _shape_of(node: ir.Node, facts: ShapeFacts) -> list[Shape | None]:
    dims = _shape_slice(node, facts)
    return [(len(dims),) if dims is not None else None]


def _shape_slice(node: ir.Node, facts: ShapeFacts) -> tuple[Dim, ...] | None:
    shape = facts.shape(node.inputs[0])
    if shape is None:
        return None
    start = node.attributes["start"].value if "start" in node.attributes else 0
    end = node.attributes["end"].value if "end" in node.attributes else len(shape)
    return shape[start:end]


def _range(node: ir.Node, facts: ShapeFacts) -> list[Shape | None]:
    start, limit, delta = (facts.elements(value) for value in node.inputs)
    if start == (0,) and delta == (1,) and limit is not None and len(limit) == 1 and _is_size(limit[0]):
        return [(limit[0],)]
    return [(None,)]


def _group_query_attention(node: ir.Node, facts: ShapeFacts) -> list[Shape | None]:
    """Output 0: [batch, sequence, num_heads * head_size]; packed QKV when there is no key input."""
    query = facts.shape(node.inputs[0])
    if query is None or len(query) != 3:
        return [None]
    packed = len(node.inputs) < 2 or node.inputs[1] is None
    heads, kv_heads = node.attributes["num_heads"].value, node.attributes["kv_num_heads"].value
    width = query[2]
    if packed:
        if not isinstance(width, int) or width % (heads + 2 * kv_heads):
            return [None]
        width = width // (heads + 2 * kv_heads) * heads
    return [(query[0], query[1], width)]


_UNARY = ("Identity", "Cast", "Abs", "Neg", "Relu", "Sigmoid", "Tanh", "Exp", "Log", "Sqrt", "Reciprocal", "Erf",
          "Cos", "Sin", "Not", "IsNaN", "IsInf", "Softmax", "LogSoftmax", "Gelu", "Dropout", "Floor", "Ceil", "Sign")
_BROADCASTING = ("Add", "Sub", "Mul", "Div", "Pow", "Max", "Min", "Sum", "Mean", "Mod", "Equal", "Less", "LessOrEqual",
                 "Greater", "GreaterOrEqual", "And", "Or", "Xor", "Where")
_SHAPE_RULES = {
    **{("", op): _same_as_input for op in _UNARY},
    **{("", op): _elementwise for op in _BROADCASTING},
    **{(MICROSOFT, op): _same_as_input for op in ("QuickGelu", "FastGelu", "Gelu", "RotaryEmbedding")},
    ("", "LayerNormalization"): _normalized, ("", "SimplifiedLayerNormalization"): _normalized,
    (MICROSOFT, "SkipLayerNormalization"): _normalized, (MICROSOFT, "SkipSimplifiedLayerNormalization"): _normalized,
    ("", "MatMul"): _matmul, (MICROSOFT, "MatMulNBits"): _matmul_nbits,
    ("", "Gather"): _gather, ("", "GatherND"): _gather_nd, ("", "Reshape"): _reshape,
    ("", "Squeeze"): _squeeze, ("", "Unsqueeze"): _unsqueeze, ("", "Transpose"): _transpose, ("", "Concat"): _concat,
    ("", "Split"): _split, ("", "Expand"): _expand, ("", "Shape"): _shape_of, ("", "Range"): _range,
    (MICROSOFT, "GroupQueryAttention"): _group_query_attention,
}


def _contents(node: ir.Node, facts: ShapeFacts) -> tuple[Dim, ...] | None:
    """The elements of a small integer output: shape arithmetic, followed where it is exact."""
    op = node.op_type
    if op == "Shape":
        return _shape_slice(node, facts)
    if op in ("Identity", *RESHAPES) or (
            op == "Cast" and ir.DataType(node.attributes["to"].value) == ir.DataType.INT64):
        return facts.contents(node.inputs[0])  # the elements in the same order; a Cast to int64 widens
    if op == "Concat":
        parts = [facts.elements(value) for value in node.inputs if value is not None]
        shape = facts.shape(node.outputs[0])
        if shape is None or len(shape) != 1 or any(part is None for part in parts):
            return None
        return tuple(e for part in parts for e in part)
    if op == "Gather":
        data, indices = facts.elements(node.inputs[0]), facts.ints(node.inputs[1])
        shape = facts.shape(node.inputs[0])
        if data is None or indices is None or shape is None or len(shape) != 1 or _axis(node, 1) != 0:
            return None
        return tuple(data[i] for i in indices) if all(-len(data) <= i < len(data) for i in indices) else None
    if op == "Slice":
        data, starts, ends = (facts.elements(node.inputs[0]), facts.ints(node.inputs[1]), facts.ints(node.inputs[2]))
        axes = facts.ints(node.inputs[3]) if len(node.inputs) > 3 and node.inputs[3] is not None else [0]
        steps = facts.ints(node.inputs[4]) if len(node.inputs) > 4 and node.inputs[4] is not None else [1]
        shape = facts.shape(node.inputs[0])
        if None in (data, starts, ends, axes, steps) or shape is None or len(shape) != 1 or axes not in ([0], [-1]) \
                or steps == [0]:
            return None
        return data[starts[0]:ends[0]:steps[0]]
    return None
