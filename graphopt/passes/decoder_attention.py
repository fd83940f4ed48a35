"""GroupQueryAttention for ``fuse-decoder``: each MultiHeadAttention (onnxscript's fusion of the
exported attention) that reads a KV cache appended to (``present = Concat(past, new, axis=2)``,
what ``graphopt export`` writes) becomes onnxruntime's GroupQueryAttention, which appends to the
cache itself, reads the key and value heads without repeating them and, when the query and the
key were rotated alike, rotates them.

Its mask stays the attention's own bias, so each sequence's ``seqlens_k`` is the whole length:
exact whatever the padding. The kernel masks causally by itself: the attention must be a
decoder's causal self-attention (the pass's verification refuses a fusion where it is not).

One case is allowed that onnxruntime's CPU kernel serves for a batch of 1 only, a past and
several new tokens at once: a decoder driven as onnxruntime-genai drives it never asks for it (a
batch above 1 only for a prefill with an empty past, or one token at a time), and onnxruntime
refuses it loudly ("batch_size must be 1 …"), never silently wrong.

Soft-capped attention (Gemma 2: ``scores = tanh(scores / cap) * cap`` between the scaled scores
and the mask) is taken apart first (``lift_soft_caps``): the cap comes out of the scores, so that
onnxscript's attention fusion matches, and the GroupQueryAttention over that layer's cache puts
it back (its ``softcap`` attribute: onnxruntime caps the scaled scores before it adds the bias, as
the model does). A cap no GroupQueryAttention took is written back where it was
(``restore_soft_caps``), or the graph refused if its attention was fused otherwise.
"""

from __future__ import annotations

import dataclasses
import logging

import numpy as np
import onnx_ir as ir
import onnx_ir.passes.common as ir_common

from graphopt.errors import UnsupportedModelError

logger = logging.getLogger(__name__)

MICROSOFT = "com.microsoft"
_HEADS_SWAP = [0, 2, 1, 3]  # [batch, length, heads, head_dim] ⇄ [batch, heads, length, head_dim]


def producer(value: ir.Value | None, op_type: str, domain: str = "") -> ir.Node | None:
    """The node computing ``value``, if it is an ``op_type``."""
    node = value.producer() if value is not None else None
    return node if node is not None and node.op_type == op_type and node.domain == domain else None


def same_dim(a: int | ir.SymbolicDim, b: int | ir.SymbolicDim) -> bool:
    """Equal sizes: the same integer, or the same named symbol."""
    if isinstance(a, int) or isinstance(b, int):
        return a == b
    return a.value is not None and a.value == b.value


def _static(value: ir.Value, axis: int) -> int | None:
    shape = value.shape
    return shape[axis] if shape is not None and len(shape) > axis and isinstance(shape[axis], int) else None


def _perm(node: ir.Node) -> list[int]:
    return list(node.attributes.get_ints("perm", []))


def _split_heads(value: ir.Value | None) -> ir.Value | None:
    """``states`` (``[batch, heads, length, head_dim]``) if ``value`` is their merge into
    ``[batch, length, heads * head_dim]``: ``Reshape(Transpose(states, [0, 2, 1, 3]))``."""
    reshape = producer(value, "Reshape")
    transpose = producer(reshape.inputs[0], "Transpose") if reshape is not None else None
    return transpose.inputs[0] if transpose is not None and _perm(transpose) == _HEADS_SWAP else None


def _unrepeated(states: ir.Value) -> ir.Value:
    """The key or value heads before each was repeated for its group of query heads
    (``Reshape(Expand(Unsqueeze(heads, [2])))``), or ``states`` when they were not."""
    reshape = producer(states, "Reshape")
    expand = producer(reshape.inputs[0], "Expand") if reshape is not None else None
    unsqueeze = producer(expand.inputs[0], "Unsqueeze") if expand is not None else None
    axes = unsqueeze.inputs[1].const_value if unsqueeze is not None and len(unsqueeze.inputs) == 2 else None
    if axes is None or axes.numpy().reshape(-1).tolist() != [2]:
        return states
    return unsqueeze.inputs[0]


@dataclasses.dataclass
class _CacheAppend:
    """``present = Concat(past, new)`` on the length axis; ``new`` before any rotation."""

    present: ir.Value
    past: ir.Value
    new: ir.Value


def _cache_append(value: ir.Value | None) -> _CacheAppend | None:
    """The cache an attention's key or value reads, through the merge of its heads and their repeat."""
    states = _split_heads(value)
    concat = producer(_unrepeated(states), "Concat") if states is not None else None
    if concat is None or concat.attributes.get_int("axis") not in (2, -2) or len(concat.inputs) != 2:
        return None
    past, new = concat.inputs
    if None in (past, new) or _static(past, 1) is None or _static(past, 3) is None or new.shape is None:
        return None
    return _CacheAppend(concat.outputs[0], past, new)


@dataclasses.dataclass
class _Rotation:
    """A query's or key's onnxruntime RotaryEmbedding: what it rotated, and how."""

    states: ir.Value
    positions: ir.Value
    cos: ir.Value
    sin: ir.Value
    interleaved: int


def _rotation(value: ir.Value) -> _Rotation | None:
    node = producer(value, "RotaryEmbedding", MICROSOFT)
    if node is None or len(node.inputs) != 4 or None in node.inputs or "rotary_embedding_dim" in node.attributes:
        return None
    return _Rotation(node.inputs[0], *node.inputs[1:], node.attributes.get_int("interleaved", 0))


def _same_computation(a: ir.Value | None, b: ir.Value | None, depth: int = 12) -> bool:
    """Whether ``a`` and ``b`` hold the same values: one value, equal constants, or the same op on
    the same inputs, a Shape reading the same sizes (known, or the same named symbol) off either
    (each rotation computes its own positions from the shape of what it rotates)."""
    if a is b:
        return True
    if a is None or b is None or depth == 0:
        return False
    if a.const_value is not None and b.const_value is not None:
        return np.array_equal(a.const_value.numpy(), b.const_value.numpy())
    x, y = a.producer(), b.producer()
    if x is None or y is None or (x.op_type, x.domain, len(x.inputs)) != (y.op_type, y.domain, len(y.inputs)):
        return False
    attributes = {key: attribute.value for key, attribute in x.attributes.items()}
    if attributes != {key: attribute.value for key, attribute in y.attributes.items()} or a.index() != b.index():
        return False
    shapes = x.inputs[0].shape, y.inputs[0].shape
    if x.op_type == "Shape" and x.domain == "" and None not in shapes and len(shapes[0]) == len(shapes[1]):
        window = slice(attributes.get("start", 0), attributes.get("end"))
        if all(same_dim(p, q) for p, q in zip(shapes[0][window], shapes[1][window])):
            return True
    return all(_same_computation(p, q, depth - 1) for p, q in zip(x.inputs, y.inputs))


def _shared_rotation(query: ir.Value, key: ir.Value, head_size: int) -> tuple[_Rotation, _Rotation] | None:
    """The query's and the new key's rotations, when the same rotation (positions and caches)
    rotates both whole and GroupQueryAttention can rotate that head size (multiples of 16)."""
    first, second = _rotation(query), _rotation(key)
    if first is None or second is None or head_size % 16 or first.interleaved != second.interleaved:
        return None
    pairs = ((first.positions, second.positions), (first.cos, second.cos), (first.sin, second.sin))
    return (first, second) if all(_same_computation(a, b) for a, b in pairs) else None


def _computed_from(value: ir.Value | None, sources: tuple[ir.Value, ...]) -> bool:
    stack, seen = [value], set()
    while stack:
        current = stack.pop()
        if current is None or id(current) in seen:
            continue
        if any(current is source for source in sources):
            return True
        seen.add(id(current))
        if (node := current.producer()) is not None:
            stack.extend(node.inputs)
    return False


@dataclasses.dataclass
class _Plan:
    """What one GroupQueryAttention replaces: the attention, the cache appends it reads, and the
    query, key and value it is given (``[batch, heads, length, head_dim]``, before the rotation
    when it rotates them itself)."""

    attention: ir.Node
    key: _CacheAppend
    value: _CacheAppend
    query_states: ir.Value
    key_states: ir.Value
    bias: ir.Value | None
    rotation: _Rotation | None


def _plan(attention: ir.Node) -> _Plan | str:
    """The attention as a GroupQueryAttention, or why the kernel cannot take it."""
    if len(attention.inputs) != 6:
        return "not an attention with a bias and nothing else"
    query, key, value, projection_bias, padding_mask, bias = attention.inputs
    key_cache, value_cache, query_states = _cache_append(key), _cache_append(value), _split_heads(query)
    if projection_bias is not None or padding_mask is not None:
        return "it has projection biases or a padding mask"
    if key_cache is None or value_cache is None or query_states is None or query_states.shape is None:
        return "its key and value are not a KV cache appended to, with static heads"
    head_size = _static(key_cache.past, 3)
    if head_size % 8 or _static(value_cache.past, 3) != head_size:
        return f"head size {head_size} (the kernel takes multiples of 8, the same for keys and values)"
    if not same_dim(key_cache.new.shape[2], query_states.shape[2]):
        return "not self-attention: the new keys are not the query's tokens"
    if _computed_from(bias, (key_cache.present, value_cache.present)):
        return "its bias is computed from the updated cache (the fused attention's own output)"
    rotations = _shared_rotation(query_states, key_cache.new, head_size)
    if rotations is None:
        return _Plan(attention, key_cache, value_cache, query_states, key_cache.new, bias, None)
    query_rotation, key_rotation = rotations
    return _Plan(attention, key_cache, value_cache, query_rotation.states, key_rotation.states, bias, query_rotation)


def _merged_heads(tape: ir.tape.Tape, states: ir.Value) -> ir.Value:
    """``states`` (``[batch, heads, length, head_dim]``) as ``[batch, length, heads * head_dim]``:
    the projection they were split from when that is what they are."""
    transpose = producer(states, "Transpose")
    if transpose is None or _perm(transpose) != _HEADS_SWAP:
        states = tape.op("Transpose", [states], attributes={"perm": _HEADS_SWAP})
        return tape.op("Reshape", [states, _constant(tape, [0, 0, -1])])
    heads = transpose.inputs[0]
    reshape = producer(heads, "Reshape")
    flat = reshape.inputs[0] if reshape is not None else None
    if flat is not None and flat.shape is not None and len(flat.shape) == 3 and heads.shape is not None:
        size, head = _static(flat, 2), (_static(heads, 2) or 0) * (_static(heads, 3) or 0)
        if size == head and all(same_dim(p, q) for p, q in zip(flat.shape[:2], heads.shape[:2])):
            return flat
    return tape.op("Reshape", [heads, _constant(tape, [0, 0, -1])])


def _constant(tape: ir.tape.Tape, values, dtype=np.int64) -> ir.Value:
    return tape.op("Constant", [], attributes={"value": ir.tensor(np.array(values, dtype=dtype))})


def _lengths(tape: ir.tape.Tape, plan: _Plan) -> tuple[ir.Value, ir.Value, ir.Value]:
    """``(total, seqlens_k, total_sequence_length)``: the length after this step (int64 ``[1]``),
    and GroupQueryAttention's int32 forms of it (each sequence's last key, and the total)."""
    batch = tape.op("Shape", [plan.query_states], attributes={"start": 0, "end": 1})
    new = tape.op("Shape", [plan.query_states], attributes={"start": 2, "end": 3})
    total = tape.op("Add", [tape.op("Shape", [plan.key.past], attributes={"start": 2, "end": 3}), new])
    written = tape.op("Cast", [total], attributes={"to": ir.DataType.INT32})
    last = tape.op("Expand", [tape.op("Sub", [written, _constant(tape, [1], np.int32)]), batch])
    return total, last, tape.op("Squeeze", [written])


def _padded(tape: ir.tape.Tape, caches: tuple[ir.Value, ir.Value], total: ir.Value) -> list[ir.Value]:
    """The rotary caches with zero rows, never read, up to ``total`` rows: GroupQueryAttention takes
    caches at least as long as the sequence, and a cache of one row per token may be shorter."""
    rows = tape.op("Shape", [caches[0]], attributes={"start": 0, "end": 1})
    missing = tape.op("Max", [tape.op("Sub", [total, rows]), _constant(tape, [0])])
    size = tape.op("Concat", [missing, tape.op("Shape", [caches[0]], attributes={"start": 1})], attributes={"axis": 0})
    zeros = tape.op("Expand", [_constant(tape, 0, caches[0].dtype.numpy()), size])
    return [tape.op("Concat", [cache, zeros], attributes={"axis": 0}) for cache in caches]


def _take_over(graph: ir.Graph, old: ir.Value, new: ir.Value) -> None:
    """``new`` replaces ``old`` as a graph output, under its name. ``old`` keeps its readers (the
    attention replaced, about to go; anything else goes on reading the cache append)."""
    new.dtype, new.shape = old.dtype, old.shape
    if old.is_graph_output():
        name = old.name
        graph.outputs[graph.outputs.index(old)] = new
        old.name, new.name = f"{name}_unfused", name


class SoftCapNotFusedError(UnsupportedModelError):
    """A soft-capped attention was fused into a kernel without its cap (MultiHeadAttention): the
    graph is wrong; fuse again without lifting the caps (``fuse_decoder_graph(soft_caps=False)``)."""


@dataclasses.dataclass
class SoftCap:
    """``tanh(scores / cap) * cap`` taken out of an attention's scaled scores: ``scores`` now stand
    for the capped scores their ``readers`` (node, input index) read."""

    cap: float
    scores: ir.Value
    readers: list[tuple[ir.Node, int]]


def _scalar(value: ir.Value | None) -> float | None:
    tensor = value.const_value if value is not None else None
    if tensor is None or tensor.size != 1 or not tensor.dtype.is_floating_point():
        return None
    return float(tensor.numpy().reshape(-1)[0])


def _unscaled(value: ir.Value | None) -> ir.Value | None:
    """What ``value`` is a ``Mul`` or ``Div`` of by a constant, or ``value``."""
    node = value.producer() if value is not None else None
    if node is None or node.op_type not in ("Mul", "Div") or node.domain != "" or _scalar(node.inputs[1]) is None:
        return value
    return node.inputs[0]


def _scores_cache(scores: ir.Value) -> ir.Value | None:
    """The key cache append (``present``) that ``scores`` are the scaled dot products with:
    ``MatMul(query, Transpose(keys, [0, 1, 3, 2]))``, the product or the transposed keys scaled
    (``Mul`` or ``Div`` by a constant) or not, the keys the cache's heads (repeated for their groups
    or not)."""
    matmul = producer(_unscaled(scores), "MatMul")
    transpose = producer(_unscaled(matmul.inputs[1]), "Transpose") if matmul is not None else None
    if transpose is None or _perm(transpose) != [0, 1, 3, 2]:
        return None
    concat = producer(_unrepeated(transpose.inputs[0]), "Concat")
    if concat is None or concat.attributes.get_int("axis") not in (2, -2) or len(concat.inputs) != 2:
        return None
    return concat.outputs[0]


def _read_by_softmax(value: ir.Value) -> bool:
    """``value`` is read by a Softmax only, directly or through the Add of a mask."""
    readers = [user for user, _ in value.uses()]
    if not readers or value.is_graph_output():
        return False
    for user in readers:
        if user.op_type == "Add" and user.domain == "" and not user.outputs[0].is_graph_output():
            if any(after.op_type != "Softmax" or after.domain != "" for after, _ in user.outputs[0].uses()):
                return False
        elif user.op_type != "Softmax" or user.domain != "":
            return False
    return True


def _soft_cap(tanh: ir.Node) -> tuple[float, ir.Value, ir.Value] | None:
    """``(cap, scores, capped)`` if ``tanh`` computes ``capped = Mul(Tanh(Div(scores, cap)), cap)``,
    or ``capped = Tanh(scores)``, a cap of 1 (the exporter drops a division and a product by 1)."""
    divide = producer(tanh.inputs[0], "Div")
    users = list(tanh.outputs[0].uses())
    multiply, index = users[0] if len(users) == 1 else (None, 0)
    if multiply is not None and (multiply.op_type != "Mul" or multiply.domain != ""):
        multiply = None
    if divide is None and multiply is None:
        return 1.0, tanh.inputs[0], tanh.outputs[0]
    cap = _scalar(divide.inputs[1]) if divide is not None else None
    if multiply is None or cap is None or cap <= 0 or _scalar(multiply.inputs[1 - index]) != cap:
        return None
    return cap, divide.inputs[0], multiply.outputs[0]


def lift_soft_caps(model: ir.Model) -> dict[ir.Value, SoftCap]:
    """Each attention's logit soft-cap, ``Mul(Tanh(Div(scores, cap)), cap)`` between its scaled
    scores and its mask, taken out (its readers read the uncapped scores), keyed by the key
    cache append of its attention: a graph onnxscript's attention fusion matches, wrong until
    ``fuse_group_query_attention`` caps again, or ``restore_soft_caps`` writes the caps back."""
    caps: dict[ir.Value, SoftCap] = {}
    for tanh in [node for node in model.graph if node.op_type == "Tanh" and node.domain == ""]:
        found = _soft_cap(tanh)
        if found is None:
            continue
        cap, scores, capped = found
        present = _scores_cache(scores)
        if present is None or present in caps or not _read_by_softmax(capped):
            continue
        caps[present] = SoftCap(cap, scores, list(capped.uses()))
        capped.replace_all_uses_with(scores)
    return caps


def restore_soft_caps(model: ir.Model, caps: dict[ir.Value, SoftCap]) -> int:
    """The caps ``lift_soft_caps`` took out that no GroupQueryAttention took, written back before
    the readers of their scores; how many. Raises ``UnsupportedModelError`` when a cap's readers
    are gone (its attention fused into a kernel without the cap): ``SoftCapNotFusedError``."""
    graph = model.graph
    for soft_cap in caps.values():
        if any(reader.graph is not graph or reader.inputs[index] is not soft_cap.scores
               for reader, index in soft_cap.readers):
            raise SoftCapNotFusedError("a soft-capped attention fused into MultiHeadAttention, which has no cap, "
                                       "not into GroupQueryAttention")
        tape = ir.tape.Tape()
        cap = _constant(tape, soft_cap.cap, soft_cap.scores.dtype.numpy())
        capped = tape.op("Mul", [tape.op("Tanh", [tape.op("Div", [soft_cap.scores, cap])]), cap])
        capped.dtype, capped.shape = soft_cap.scores.dtype, soft_cap.scores.shape
        order = {id(node): position for position, node in enumerate(graph)}
        graph.insert_before(min((reader for reader, _ in soft_cap.readers), key=lambda node: order[id(node)]),
                            tape.nodes)
        for reader, index in soft_cap.readers:
            reader.replace_input_with(index, capped)
    restored = len(caps)
    caps.clear()
    return restored


def _replace(graph: ir.Graph, plan: _Plan, caps: dict[ir.Value, SoftCap]) -> None:
    attention, tape = plan.attention, ir.tape.Tape()
    total, seqlens_k, total_length = _lengths(tape, plan)
    rotary: list[ir.Value | None] = [None, None, None]
    attributes = {"num_heads": attention.attributes.get_int("num_heads"), "kv_num_heads": _static(plan.key.past, 1)}
    if plan.rotation is not None:
        rotary = [*_padded(tape, (plan.rotation.cos, plan.rotation.sin), total), plan.rotation.positions]
        attributes.update(do_rotary=1, rotary_interleaved=plan.rotation.interleaved)
    if "scale" in attention.attributes:
        attributes["scale"] = attention.attributes.get_float("scale")
    if (soft_cap := caps.pop(plan.key.present, None)) is not None:
        attributes["softcap"] = soft_cap.cap  # onnxruntime caps the scaled scores, then adds the bias
    inputs = [_merged_heads(tape, plan.query_states), _merged_heads(tape, plan.key_states),
              _merged_heads(tape, plan.value.new), plan.key.past, plan.value.past, seqlens_k, total_length,
              *rotary, plan.bias]
    output, present_key, present_value = tape.op_multi_out("GroupQueryAttention", inputs, attributes=attributes,
                                                           domain=MICROSOFT, num_outputs=3)
    graph.insert_before(attention, tape.nodes)
    output.dtype, output.shape = plan.query_states.dtype, attention.outputs[0].shape
    attention.outputs[0].replace_all_uses_with(output, replace_graph_outputs=True)
    _take_over(graph, plan.key.present, present_key)
    _take_over(graph, plan.value.present, present_value)


def fuse_group_query_attention(model: ir.Model, caps: dict[ir.Value, SoftCap] | None = None) -> int:
    """Each MultiHeadAttention over an appended KV cache → GroupQueryAttention, in place; the
    number fused (the others are logged, with the reason). ``caps`` (``lift_soft_caps``): the
    soft-cap of the attention over each cache, taken out of ``caps`` by the one that applies it."""
    caps = {} if caps is None else caps
    graph, fused = model.graph, 0
    for attention in [node for node in graph if node.op_type == "MultiHeadAttention" and node.domain == MICROSOFT]:
        plan = _plan(attention)
        if isinstance(plan, str):
            logger.debug("%s left MultiHeadAttention: %s", attention.name, plan)
            continue
        _replace(graph, plan, caps)
        fused += 1
    if fused:
        ir_common.RemoveUnusedNodesPass()(model)
    return fused


def pack_attention_inputs(model: ir.Model) -> int:
    """Each GroupQueryAttention whose query, key and value are the parts of one packed projection
    (``decoder_fusions.pack_sibling_matmuls``) reads that projection instead: QKV packed."""
    packed = 0
    for node in model.graph:
        if node.op_type != "GroupQueryAttention" or node.domain != MICROSOFT or None in node.inputs[:3]:
            continue
        split = producer(node.inputs[0], "Split")
        if split is None or list(split.outputs) != list(node.inputs[:3]):
            continue
        if split.attributes.get_int("axis") not in (-1, 2):
            continue
        node.replace_input_with(0, split.inputs[0])
        node.replace_input_with(1, None)
        node.replace_input_with(2, None)
        packed += 1
    if packed:
        ir_common.RemoveUnusedNodesPass()(model)
    return packed
