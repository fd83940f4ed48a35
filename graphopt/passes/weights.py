"""The weight finder every pass uses: which constant weight an op reads and along which axis
its output channels lie, which uses a pass may take (``--exclude`` honoured), and the small
graph edits shared by the quantizing, pruning and factorizing passes. Knows op semantics;
knows nothing about modes."""

from __future__ import annotations

import dataclasses
import fnmatch
from collections.abc import Callable, Iterable, Sequence

import numpy as np
import onnx_ir as ir

from graphopt.passes.naming import unique_value_name
from graphopt.verify.layout import LOGITS

RECURRENT_OPS = ("LSTM", "GRU", "RNN")
WEIGHT_OPS = ("MatMul", "Gemm", "Conv", "ConvTranspose", "Gather", *RECURRENT_OPS)


@dataclasses.dataclass(frozen=True)
class WeightUse:
    """One node reading one constant float weight (a recurrent node: W, with R beside it)."""

    node: ir.Node
    input_index: int
    weight: ir.Value
    channel_axis: int  # the output-channel axis of the weight tensor
    # R of LSTM/GRU/RNN ([directions, gates·hidden, hidden]): as large as W for a narrow input,
    # so a mode encoding the layer encodes both (W's channel axis, 1, is R's too).
    recurrence: ir.Value | None = None

    @property
    def kind(self) -> str:
        return self.node.op_type

    @property
    def weights(self) -> tuple[ir.Value, ...]:
        return (self.weight,) if self.recurrence is None else (self.weight, self.recurrence)

    @property
    def size(self) -> int:
        """Elements of every weight the use covers."""
        return sum(value.const_value.size for value in self.weights)

    @property
    def nbytes(self) -> int:
        return sum(value.const_value.nbytes for value in self.weights)

    @property
    def name(self) -> str:
        return self.node.name or self.weight.name or "?"


def _constant_float(value: ir.Value | None, graph: ir.Graph) -> bool:
    return (
        value is not None
        and value.const_value is not None
        and value.name in graph.initializers
        and not value.is_graph_input()
        and value.const_value.dtype == ir.DataType.FLOAT
    )


def weight_use(node: ir.Node, graph: ir.Graph) -> tuple[WeightUse | None, str]:
    """The node's quantizable weight, or None and the reason it has none."""
    if node.domain not in ("", "ai.onnx"):
        return None, "not a default-domain op"
    op, inputs = node.op_type, node.inputs
    if op == "Gather":
        data = inputs[0]
        if not _constant_float(data, graph) or len(data.const_value.shape) != 2:
            return None, "data is not a constant 2-D float table"
        if node.attributes.get_int("axis", 0) != 0:
            return None, "gathers along an axis other than 0"
        return WeightUse(node, 0, data, 0), ""
    if op in RECURRENT_OPS:
        return _recurrent_use(node, graph)
    if op not in WEIGHT_OPS or len(inputs) < 2:
        return None, f"{op} has no weight input"
    weight = inputs[1]
    if not _constant_float(weight, graph):
        return None, "weight is not a constant float initializer"
    ndim = len(weight.const_value.shape)
    if op == "MatMul":
        if ndim != 2:
            return None, "MatMul weight is not 2-D"
        if _constant_float(inputs[0], graph):
            return None, "both MatMul inputs are constant"
        return WeightUse(node, 1, weight, 1), ""
    if op == "Gemm":
        return WeightUse(node, 1, weight, 0 if node.attributes.get_int("transB", 0) else 1), ""
    if op == "Conv":
        return WeightUse(node, 1, weight, 0), ""
    return WeightUse(node, 1, weight, 1), ""  # ConvTranspose: [C_in, C_out/group, k…]


def _recurrent_use(node: ir.Node, graph: ir.Graph) -> tuple[WeightUse | None, str]:
    """W [directions, gates·hidden, input] and R [directions, gates·hidden, hidden], both
    constant: encoding W alone would leave half the layer, or more, in float."""
    weight, recurrence = (node.inputs[i] if len(node.inputs) > i else None for i in (1, 2))
    if not (_constant_float(weight, graph) and _constant_float(recurrence, graph)):
        return None, "W or R is not a constant float initializer"
    if len(weight.const_value.shape) != 3 or len(recurrence.const_value.shape) != 3:
        return None, "W or R is not 3-D"
    return WeightUse(node, 1, weight, 1, recurrence=recurrence), ""


def exclusion(node: ir.Node, patterns: Sequence[str]) -> str | None:
    """Why the user's ``--exclude`` keeps ``node`` as it is: a glob pattern matching its name,
    its op type or the name of a constant it reads; None when none matches."""
    names = [node.name or "", node.op_type,
             *(v.name or "" for v in node.inputs if v is not None and v.const_value is not None)]
    for pattern in patterns:
        if any(fnmatch.fnmatchcase(name, pattern) for name in names):
            return f"excluded (--exclude '{pattern}')"
    return None


def weight_uses(graph: ir.Graph, ops: Iterable[str], min_elements: int,
                exclude: Sequence[str] = ()) -> tuple[list[WeightUse], dict[str, str]]:
    """Quantizable uses in the main graph and, for the rest of the weight ops, why not;
    ``exclude``: glob patterns of node names, op types or weight names to leave alone."""
    wanted = set(ops)
    uses, skipped = [], {}
    for node in graph:
        if node.op_type not in wanted:
            continue
        if (excluded := exclusion(node, exclude)) is not None:
            skipped[node.name or node.op_type] = excluded
            continue
        use, reason = weight_use(node, graph)
        if use is None:
            skipped[node.name or node.op_type] = reason
        elif use.size < min_elements:
            skipped[use.name] = f"weight has {use.size} elements (< {min_elements})"
        else:
            uses.append(use)
    return uses, skipped


def initializer(graph: ir.Graph, name: str, array: np.ndarray) -> ir.Value:
    """Register a new initializer under a name not used yet in the graph."""
    value = ir.Value(name=unique_value_name(graph, name), const_value=ir.tensor(array))
    value.const_value.name = value.name
    graph.register_initializer(value)
    return value


def gemm_bias(graph: ir.Graph, node: ir.Node, result: ir.Value, name: str) -> tuple[list[ir.Node], ir.Value]:
    """What a rewrite of the Gemm ``node`` adds after ``result`` (its A·B): the bias β·C, as
    ([nodes], their output); ([], ``result``) for a Gemm without C (or another op)."""
    bias = node.inputs[2] if node.op_type == "Gemm" and len(node.inputs) > 2 else None
    if bias is None:
        return [], result
    nodes = []
    beta = node.attributes.get_float("beta", 1.0)
    if beta != 1.0 and bias.const_value is not None:
        bias = initializer(graph, f"{name}_bias_scaled", (bias.const_value.numpy() * beta).astype(np.float32))
    elif beta != 1.0:  # a computed bias: scaled where it is read
        factor = initializer(graph, f"{name}_beta", np.asarray(beta, np.float32))
        nodes.append(ir.node("Mul", [bias, factor], name=f"{name}_bias_scaled"))
        bias = nodes[-1].outputs[0]
    nodes.append(ir.node("Add", [result, bias], name=f"{name}_bias"))
    return nodes, nodes[-1].outputs[0]


def weights_on_disk(graph: ir.Graph) -> bool:
    """Whether some initializer is still in external data (a model loaded without its weights,
    typically too large to hold): whole-model work there should not read every tensor."""
    return any(isinstance(value.const_value, ir.ExternalTensor) for value in graph.initializers.values())


def first_consumer(value: ir.Value, graph: ir.Graph) -> ir.Node:
    consumers = set(id(n) for n in value.consumers())
    return next(node for node in graph if id(node) in consumers)


def column_importance(use: WeightUse, input_meansq: np.ndarray | None) -> np.ndarray | None:
    """Per element of one output channel (flattened as quantize_symmetric sees it), the mean
    square of the input channel that element multiplies — or None where that mapping is not
    a plain broadcast (grouped convolutions, transposed convolutions, embedding tables)."""
    if input_meansq is None:
        return None
    shape = use.weight.const_value.shape.numpy()
    if use.kind == "Conv" and use.node.attributes.get_int("group", 1) == 1 and shape[1] == input_meansq.size:
        return np.repeat(input_meansq, int(np.prod(shape[2:])))
    if use.kind in ("MatMul", "Gemm"):
        inputs = shape[0] if use.channel_axis == 1 else shape[1]
        return input_meansq if inputs == input_meansq.size else None
    return None


def select_uses(
    uses: list[WeightUse], refusal: Callable[[WeightUse], str | None], nodes: tuple[str, ...],
    skipped: dict[str, str],
) -> list[WeightUse]:
    """The uses a mode can rewrite (and, when ``nodes`` is given, was asked to); the reason
    for every other one goes into ``skipped``."""
    chosen = []
    for use in uses:
        reason = refusal(use)
        if reason is None and nodes and use.node.name not in nodes:
            reason = "not selected"
        if reason:
            skipped[use.name] = reason
        else:
            chosen.append(use)
    return chosen


def replace_output(graph: ir.Graph, node: ir.Node, result: ir.Value, old_suffix: str) -> None:
    """Make ``result`` take over ``node``'s output — its readers, its name and, when it is a
    graph output, its declared type — and remove ``node``."""
    old_output = node.outputs[0]
    name = old_output.name
    old_output.replace_all_uses_with(result, replace_graph_outputs=True)
    old_output.name = f"{name}_{old_suffix}"
    graph.remove(node, safe=True)
    result.name = name
    if result.is_graph_output():
        result.type, result.shape = old_output.type, old_output.shape


_HEADS = {"MatMul", "FusedMatMul", "MatMulNBits", "Gemm"}
# Ops between the head and the logits output that act on each position alone.
_ELEMENTWISE = {"Add", "Sub", "Mul", "Div", "Tanh", "Cast", "Softcap", "Identity"}


def lm_head(graph: ir.Graph) -> ir.Node | None:
    """The LM head: the MatMul-like node (MatMul, FusedMatMul, MatMulNBits, Gemm) that computes
    the ``logits`` output, reached back from it through ops acting on each position alone (a
    bias, a logit scale, a final soft-capping tanh); None when there is none."""
    output = next((value for value in graph.outputs if value.name == LOGITS), None)
    node = output.producer() if output is not None else None
    while node is not None and node.op_type not in _HEADS:
        if node.op_type not in _ELEMENTWISE:
            return None
        # follow the input that carries the positions (the other is a constant)
        sources = [value for value in node.inputs if value is not None and value.const_value is None
                   and value.producer() is not None]
        node = sources[0].producer() if len(sources) == 1 else None
    return node
