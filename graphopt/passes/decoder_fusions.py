"""The rewrites behind ``fuse-decoder``: what ``torch.onnx.export(dynamo=True)`` writes for a
decoder with a KV cache, turned into onnxruntime's CPU kernels. Every rewrite computes exactly
what it replaces; ``fuse_decoder_graph`` runs them in order, each preparing the next:

1. key transposes (``key_transpose_rules``): torchlib writes ``key.transpose(-2, -1)`` of a key
   with dynamic shape through a 3D reshape; onnxscript's attention fusion looks for a 4D Transpose.
2. rotary embeddings: onnxscript's rotate-half match (``x·cos + rotate_half(x)·sin``), then
   ``rotary_from_angles_rules`` turns each into onnxruntime's RotaryEmbedding when cos and sin
   are computed from the rotation angles (``positions × inv_freq``), as the exporter writes them.
3. onnxscript's onnxruntime fusions (``optimize_for_ort``, its public entry): RMS and skip
   norms, scaled dot-product attention → MultiHeadAttention, GELU, transposed MatMuls. An
   attention's logit soft-cap (Gemma 2) is taken out of its scores first, for the match.
4. GroupQueryAttention over the appended KV cache (``decoder_attention``), the rotation folded in
   and the soft-cap put back (``softcap``); a cap no GroupQueryAttention took is written back.
5. ``pack_sibling_matmuls``: the MatMuls reading one input with constant weights (query, key and
   value projections; gate and up) become one; a GroupQueryAttention reads its packed QKV.
6. ``merge_equal_computations``: what every layer computes alike (its mask's parts, its rotary
   cache) computed once.

onnxscript has a GroupQueryAttention fusion of its own inside step 3. It reads the sequence
lengths off the rotation's position ids and drops the attention mask, which holds for
onnxruntime-genai's own exports only; here each rotation's positions index a cache of its own
tokens (step 2), computed from the shape of what it rotates, so a query's and its key's are never
one value and that pattern, which wants one, does not match. Should it ever match, the graph is
refused (``UnsupportedModelError``) rather than fused on its assumptions.
"""

from __future__ import annotations

import logging

import numpy as np
import onnx_ir as ir
import onnx_ir.passes.common as ir_common

from graphopt.errors import UnsupportedModelError
from graphopt.passes.decoder_attention import (MICROSOFT, fuse_group_query_attention, lift_soft_caps,
                                               pack_attention_inputs, producer, restore_soft_caps, same_dim)
from graphopt.passes.naming import unique_value_name

logger = logging.getLogger(__name__)

_FUSION_DOMAIN = "ai.onnxruntime._fusion"  # onnxscript's intermediate ops


def fuse_decoder_graph(model: ir.Model, *, group_query_attention: bool = True,
                       soft_caps: bool = True) -> dict[str, int]:
    """Every fusion, in order, in place; how many times each step rewrote the graph.
    ``group_query_attention=False`` leaves attention as onnxscript fuses it (MultiHeadAttention);
    ``soft_caps=False`` (or ``group_query_attention=False``) leaves soft-capped attention unfused.
    Raises ``SoftCapNotFusedError`` (the graph then wrong) when a soft-capped attention fuses
    into MultiHeadAttention but not into GroupQueryAttention."""
    from onnxscript.rewriter.ort_fusions import optimize_for_ort
    from onnxscript.rewriter.ort_fusions.rotary_embedding import fuse_rotary_embedding

    counts = {"key transposes": key_transpose_rules().apply_to_model(model),
              "rotations matched": fuse_rotary_embedding(model)}
    counts["rotary embeddings"] = rotary_from_angles_rules().apply_to_model(model)
    attentions = _count(model, "GroupQueryAttention")
    # only GroupQueryAttention has a soft-cap: without it, a soft-capped attention stays unfused
    caps = lift_soft_caps(model) if group_query_attention and soft_caps else {}
    counts["soft-capped attentions"] = len(caps)
    optimize_for_ort(model)
    if _count(model, "GroupQueryAttention") != attentions:
        raise UnsupportedModelError("onnxscript's own GroupQueryAttention fusion matched (it drops the attention "
                                    "mask and reads the lengths off the rotary positions)")
    counts["group query attentions"] = fuse_group_query_attention(model, caps) if group_query_attention else 0
    counts["soft-caps restored"] = restore_soft_caps(model, caps)
    counts["packed matmuls"] = pack_sibling_matmuls(model)
    counts["packed attention inputs"] = pack_attention_inputs(model)
    merge_equal_computations(model)
    logger.debug("fuse-decoder: %s", counts)
    return counts


def _count(model: ir.Model, op_type: str) -> int:
    return sum(node.op_type == op_type and node.domain == MICROSOFT for node in model.graph)


# -- 1. key transposes ------------------------------------------------------------------------------


def _constant_ints(value: ir.Value | None) -> list[int] | None:
    tensor = value.const_value if value is not None else None
    if tensor is None or tensor.dtype != ir.DataType.INT64:
        return None
    return [int(item) for item in tensor.numpy().reshape(-1)]


def shape_axes(value: ir.Value, source: ir.Value) -> list[int | str] | None:
    """What a reshape target ``value`` is made of, when it is ``Concat`` of constants and slices of
    ``Shape(source)``: each slice's axes of ``source`` (ints), each constant as ``"=N"``."""
    concat = producer(value, "Concat")
    if concat is None:
        return None
    rank = len(source.shape) if source.shape is not None else None
    parts: list[int | str] = []
    for piece in concat.inputs:
        constant = _constant_ints(piece)
        if constant is not None:
            parts.extend(f"={item}" for item in constant)
            continue
        sliced = producer(piece, "Slice")
        shape = producer(sliced.inputs[0], "Shape") if sliced is not None else None
        bounds = [_constant_ints(bound) for bound in sliced.inputs[1:3]] if sliced is not None else [None]
        if shape is None or shape.inputs[0] is not source or rank is None or len(sliced.inputs) > 3:
            return None
        whole = shape.attributes.get_int("start", 0) == 0 and "end" not in shape.attributes
        if not whole or None in bounds or any(len(bound) != 1 for bound in bounds):
            return None
        (start,), (end,) = bounds
        parts.extend(range(rank)[start:end])
    return parts


def _flattened_transpose(op, key, flat_shape, shape):
    return op.Reshape(op.Transpose(op.Reshape(key, flat_shape), perm=[0, 2, 1]), shape)


def _is_key_transpose(context, key, flat_shape, shape, **_):
    """Both reshape targets are the key's own sizes: ``[-1, length, head_dim]``, then the sizes
    with the last two swapped."""
    from onnxscript.rewriter import pattern

    check = pattern.MatchResult()
    if key.shape is None or len(key.shape) != 4:
        return check.fail("the key is not 4D", key)
    if shape_axes(flat_shape, key) != ["=-1", 2, 3]:
        return check.fail("the first reshape is not [-1, length, head_dim] of the key", flat_shape)
    if shape_axes(shape, key) != [0, 1, 3, 2]:
        return check.fail("the second reshape is not the key's sizes with the last two swapped", shape)
    return check


def _key_transpose(op, key, flat_shape, shape):
    return op.Transpose(key, perm=[0, 1, 3, 2])


def key_transpose_rules():
    """``Reshape(Transpose(Reshape(key, [-1, s, d]), [0, 2, 1]), [b, h, d, s])`` → ``Transpose(key)``."""
    from onnxscript.rewriter import pattern

    return pattern.RewriteRuleSet([pattern.RewriteRule(_flattened_transpose, _key_transpose, _is_key_transpose,
                                                       name="KeyTranspose")])


# -- 2. rotary embeddings ---------------------------------------------------------------------------


def rotation_angles(cos: ir.Value, sin: ir.Value) -> ir.Value | None:
    """``angles`` if ``cos`` and ``sin`` are ``Unsqueeze(Cos|Sin(Concat(angles, angles)), [1])``:
    the rotation angles ``[batch, length, head_dim / 2]``, broadcast over the heads."""
    found = []
    for value, function in ((cos, "Cos"), (sin, "Sin")):
        unsqueeze = producer(value, "Unsqueeze")
        if unsqueeze is None or len(unsqueeze.inputs) != 2 or _constant_ints(unsqueeze.inputs[1]) != [1]:
            return None
        trig = producer(unsqueeze.inputs[0], function)
        concat = producer(trig.inputs[0], "Concat") if trig is not None else None
        if concat is None or len(concat.inputs) != 2 or concat.inputs[0] is not concat.inputs[1]:
            return None
        found.append(concat.inputs[0])
    return found[0] if found[0] is found[1] else None


def _fused_rotation(op, x, cos, sin):
    return op.RotaryEmbedding(x, cos, sin, _domain=_FUSION_DOMAIN, _allow_other_attributes=True,
                              _outputs=["rotated"])


def _rotates_by_angles(context, x, cos, sin, rotated, **_):
    from onnxscript.rewriter import pattern

    check = pattern.MatchResult()
    angles = rotation_angles(cos, sin)
    if angles is None:
        return check.fail("cos and sin are not computed from one set of angles", [cos, sin])
    if x.shape is None or len(x.shape) != 4 or angles.shape is None or len(angles.shape) != 3:
        return check.fail("the states are not [batch, heads, length, head_dim]", x)
    if not isinstance(x.shape[3], int) or angles.shape[2] != x.shape[3] // 2 or x.shape[3] % 2:
        return check.fail("the angles do not cover half the head", angles)
    # Each token's angles become a row of the cache: the angles must be the states' own tokens.
    if not same_dim(angles.shape[0], x.shape[0]) or not same_dim(angles.shape[1], x.shape[2]):
        return check.fail("the angles' batch and length are not the states'", [angles, x])
    return check


def _rotate_from_token_cache(op, x, cos, sin, rotated):
    """onnxruntime's RotaryEmbedding reading a cache of one row per token, ``[batch * length,
    head_dim / 2]``, at position ``b * length + s``: exact at any position, prefill or decode."""
    angles = rotation_angles(cos, sin)
    row_per_token = op.Constant(value_ints=[-1, x.shape[3] // 2])
    batch, length = op.Shape(x, start=0, end=1), op.Shape(x, start=2, end=3)
    tokens = op.Range(op.Constant(value_int=0), op.Squeeze(op.Mul(batch, length)), op.Constant(value_int=1))
    positions = op.Reshape(tokens, op.Concat(batch, length, axis=0))
    interleaved = rotated.producer().attributes.get_int("interleaved", 0)
    return op.RotaryEmbedding(x, positions, op.Reshape(op.Cos(angles), row_per_token),
                              op.Reshape(op.Sin(angles), row_per_token),
                              interleaved=interleaved, _domain=MICROSOFT)


def rotary_from_angles_rules():
    """onnxscript's matched rotation (``ai.onnxruntime._fusion``) → ``com.microsoft.RotaryEmbedding``."""
    from onnxscript.rewriter import pattern

    return pattern.RewriteRuleSet([pattern.RewriteRule(_fused_rotation, _rotate_from_token_cache,
                                                       _rotates_by_angles, name="RotaryFromAngles")])


# -- 5. and 6. packing and merging -----------------------------------------------------------------------


def _constant_weight(node: ir.Node, index: int) -> np.ndarray | None:
    """The 2D constant weight of a standard MatMul reading its input at ``index`` 0."""
    if node.op_type != "MatMul" or node.domain != "" or index != 0 or node.inputs[1] is None:
        return None
    tensor = node.inputs[1].const_value
    return tensor.numpy() if tensor is not None and len(tensor.shape) == 2 else None


def pack_sibling_matmuls(model: ir.Model) -> int:
    """Each group of MatMuls reading one input with constant ``[in, out]`` weights (an attention's
    query, key and value; an MLP's gate and up) → one MatMul, its weights side by side, and a
    Split back: one kernel call for several. Groups are packed in graph order."""
    graph, packed = model.graph, 0
    for value in [*graph.inputs, *(output for node in list(graph) for output in node.outputs)]:
        siblings = [(user, weight) for user, index in value.uses()
                    if (weight := _constant_weight(user, index)) is not None and user.graph is graph]
        if len(siblings) < 2 or len({(w.shape[0], w.dtype) for _, w in siblings}) != 1:
            continue
        users = [user for user, _ in siblings]
        weights = np.concatenate([weight for _, weight in siblings], axis=1)
        name = unique_value_name(graph, f"{value.name}_packed_weight")
        weight = ir.Value(name=name, const_value=ir.tensor(weights, name=name))
        weight.dtype, weight.shape = ir.DataType.from_numpy(weights.dtype), ir.Shape(weights.shape)
        graph.register_initializer(weight)
        sizes = ir.node("Constant", [], attributes={"value": ir.tensor(np.array([w.shape[1] for _, w in siblings]))})
        matmul = ir.node("MatMul", [value, weight])
        split = ir.node("Split", [matmul.outputs[0], sizes.outputs[0]], attributes={"axis": -1},
                        num_outputs=len(users))
        matmul.outputs[0].dtype = users[0].outputs[0].dtype
        if value.shape is not None:
            matmul.outputs[0].shape = ir.Shape([*value.shape[:-1], weights.shape[1]])
        order = {id(node): position for position, node in enumerate(graph)}
        graph.insert_before(min(users, key=lambda user: order[id(user)]), [sizes, matmul, split])
        for user, output in zip(users, split.outputs):
            output.dtype, output.shape = user.outputs[0].dtype, user.outputs[0].shape
            user.outputs[0].replace_all_uses_with(output, replace_graph_outputs=True)
        packed += 1
    ir_common.RemoveUnusedNodesPass()(model)
    return packed


def merge_equal_computations(model: ir.Model) -> None:
    """Compute once what is computed alike. The Shape nodes reading the same sizes (known, or
    the same named symbol) off different values read them off the first, so that the nodes
    reading them compare equal; then equal initializers and equal nodes merge."""
    first: dict[tuple, ir.Value] = {}
    for node in model.graph:
        shape = node.inputs[0].shape if node.op_type == "Shape" and node.domain == "" else None
        if shape is None:
            continue
        dims = shape[node.attributes.get_int("start", 0):node.attributes.get_int("end", len(shape))]
        if not all(isinstance(dim, int) or dim.value is not None for dim in dims):
            continue
        key = tuple(dim if isinstance(dim, int) else dim.value for dim in dims)
        if key in first:
            node.outputs[0].replace_all_uses_with(first[key])
        else:
            first[key] = node.outputs[0]
    ir_common.DeduplicateInitializersPass()(model)
    ir_common.CommonSubexpressionEliminationPass()(model)
    ir_common.RemoveUnusedNodesPass()(model)
