"""Fuse transformer attention into onnxruntime's ``com.microsoft.MultiHeadAttention`` kernel.

Exporters spell scaled dot-product attention as a dozen ops per layer: reshape/transpose of the
query, key and value to heads, two scaled MatMuls, the mask Add, Softmax and (torch's sdpa
export) a NaN guard ``Where(IsNaN(p), 0, p)`` for fully masked rows. onnxruntime's own graph
optimizer recognises the eager-attention spelling but not this one, and the unfused Softmax
plus guard cost more than the int8 linears around them (MiniLM: 4.6 of 10 ms).

The matching is onnxscript's rewriter (``onnxscript.rewriter.ort_fusions``: SDPA, then MHA);
this pass prepares the graph so that its patterns apply, and keeps the exporter's semantics:

* shapes: onnxruntime's symbolic shape inference names the head count and head size, which
  the patterns check (the TorchScript exporter computes reshape targets at run time);
* the NaN guard's ``0.0`` is a 1-element tensor where the pattern wants a scalar;
* a Reshape between the attention MatMul and the output transpose that restores the shape it
  was given (the exporter's, dead once proven) hides the output from the MHA pattern;
* fully masked rows: the fused kernel turns a row whose mask is all ``-inf`` into NaN where
  the guard wrote 0, so a guarded model gets ``Where(IsNaN(o), 0, o)`` on each fused output
  (a quarter of the elements the guard touched: rows × hidden instead of heads × rows × keys).

Query, key and value projections stay MatMuls, so quantize-int8 still finds them. The fused
model is checked against the original on calibration (or random) feeds with onnxruntime's
optimizations off; on any failure the pass leaves the model unchanged with a note.
"""

from __future__ import annotations

import logging

import numpy as np
import onnx_ir as ir
import onnx_ir.passes.common as ir_common

from graphopt.errors import reason
from graphopt.passes.naming import unique_value_name
from graphopt.passes.base import GraphoptPass, PassContext, PassResult
from graphopt.passes.cleanup import drop_value_info
from graphopt.passes.registry import register

logger = logging.getLogger(__name__)

_FUSION_DOMAIN = "ai.onnxruntime._fusion"  # onnxscript's intermediate ops; never left in a model


@register
class FuseAttentionPass(GraphoptPass, name="fuse-attention",
                        summary="scaled dot-product attention → com.microsoft.MultiHeadAttention (onnxruntime kernel)"):
    in_place = False

    class Options:
        check_n: int = 4
        """Feeds (calibration data when the run has it, else random) on which the fused model
        must match the original within ``tolerance`` (max abs); 0 skips the check."""
        tolerance: float = 1e-4

    def apply(self, model: ir.Model, context: PassContext) -> PassResult:
        if not any(node.op_type == "Softmax" for node in model.graph):
            return PassResult(model.clone(), modified=False)
        try:
            fused, counts = _fuse(model)
        except Exception as exc:  # the shape inference and the rewriter raise many types
            return PassResult(model.clone(), modified=False, notes=[f"attention fusion failed ({reason(exc, 200)}); skipped"])
        if not counts["attention fused"]:
            return PassResult(model.clone(), modified=False)
        leftover = sorted({n.op_type for n in fused.graph if n.domain == _FUSION_DOMAIN})
        if leftover:
            return PassResult(model.clone(), modified=False,
                              notes=[f"attention matched but not lowered to an onnxruntime kernel ({', '.join(leftover)}); skipped"])
        mismatch = self._outputs_differ(model, fused, context)
        if mismatch:
            return PassResult(model.clone(), modified=False, notes=[f"fused attention changed the outputs ({mismatch}); skipped"])
        logger.debug("fuse-attention: %s", counts)
        return PassResult(fused, modified=True, changes=counts)

    def _outputs_differ(self, before: ir.Model, after: ir.Model, context: PassContext) -> str | None:
        if self.options.check_n <= 0:
            return None
        from graphopt.errors import GraphoptError
        from graphopt.verify.feeds import input_specs, random_feeds
        from graphopt.verify.parity import rewrite_mismatch

        n = self.options.check_n
        if context.calibration is not None:
            feeds, source = context.calibration.feeds[:n], "calibration"
        else:
            try:
                feeds, source = random_feeds(input_specs(before), shapes={}, seed=0, count=n).feeds, "random"
            except GraphoptError as exc:  # inputs random data cannot fill
                return str(exc)
        mismatch = rewrite_mismatch(_bytes(before), _bytes(after), feeds, tolerance=self.options.tolerance,
                                    threads=context.threads)
        return f"{mismatch} on {len(feeds)} {source} feeds" if mismatch else None


def _bytes(model: ir.Model) -> bytes:
    return ir.serde.serialize_model(model).SerializeToString()


def _fuse(model: ir.Model) -> tuple[ir.Model, dict[str, int]]:
    """A fused copy of ``model`` and what was changed; ``model`` itself is not touched."""
    from onnxscript.rewriter.ort_fusions.mha import fuse_mha1, fuse_mha2
    from onnxscript.rewriter.ort_fusions.sdpa import fuse_sdpa
    from onnxscript.rewriter.ort_fusions.sdpa_via_mha import replace_sdpa_by_mha

    work = _with_symbolic_shapes(model)
    ir_common.LiftConstantsToInitializersPass(lift_all_constants=False, size_limit=0)(work)
    guarded = _scalarize_nan_guards(work)
    reshapes = _drop_identity_reshapes(work)
    ir_common.RemoveUnusedNodesPass()(work)
    sdpa = fuse_sdpa(work, apply_shape_inference=True)
    if not sdpa:
        return work, {"attention fused": 0}
    fused = fuse_mha1(work) + fuse_mha2(work) + replace_sdpa_by_mha(work)
    guards = _guard_masked_rows(work) if guarded else 0
    ir_common.RemoveUnusedNodesPass()(work)
    ir_common.RemoveUnusedOpsetsPass()(work)
    # The inferred shapes go again: with every shape known, onnxruntime fuses each residual Add +
    # LayerNormalization into SkipLayerNormalization, measured 3-4x slower than the pair here.
    drop_value_info(work)
    return work, {"attention fused": fused, "identity reshapes removed": reshapes, "masked-row guards": guards}


def _with_symbolic_shapes(model: ir.Model) -> ir.Model:
    """A copy of ``model`` with shapes on every value: onnxruntime's symbolic shape inference,
    or, where it gives up (it fails on some dynamo exports, which carry shapes already), onnx's."""
    from onnxruntime.tools.symbolic_shape_infer import SymbolicShapeInference

    proto = ir.serde.serialize_model(model)
    try:
        inferred = SymbolicShapeInference.infer_shapes(proto, auto_merge=True, guess_output_rank=False)
    except Exception as exc:  # its inference functions raise anything on shapes they cannot follow
        logger.debug("symbolic shape inference failed (%s); using onnx's", exc)
        inferred = None
    if inferred is None:
        copy = ir.serde.deserialize_model(proto)
        ir_common.ShapeInferencePass()(copy)
        return copy
    return ir.serde.deserialize_model(inferred)


def _scalarize_nan_guards(model: ir.Model) -> int:
    """``Where(IsNaN(p), c, p)`` with a 1-element ``c`` gets a scalar ``c`` (same result: ``p``
    has rank ≥ 1). Returns how many guards follow a Softmax."""
    count = 0
    scalars: dict[int, ir.Value] = {}  # one scalar per 1-element constant, however many guards share it
    for node in list(model.graph):
        if node.op_type != "Where" or node.domain not in ("", "ai.onnx") or len(node.inputs) != 3:
            continue
        cond, fill, value = node.inputs
        producer = cond.producer() if cond is not None else None
        if producer is None or producer.op_type != "IsNaN" or producer.inputs[0] is not value:
            continue
        source = value.producer()
        if source is None or source.op_type != "Softmax":
            continue
        count += 1
        tensor = fill.const_value if fill is not None else None
        if tensor is None or tensor.size != 1 or fill.shape is None or fill.shape.rank() == 0:
            continue
        if id(fill) not in scalars:
            scalars[id(fill)] = ir.Value(name=unique_value_name(model.graph, f"{fill.name}_scalar"), type=fill.type,
                                         shape=ir.Shape([]), const_value=ir.tensor(tensor.numpy().reshape(())))
            model.graph.register_initializer(scalars[id(fill)])
        node.replace_input_with(1, scalars[id(fill)])
    return count


def _known(shape: ir.Shape | None) -> bool:
    return shape is not None and all(
        isinstance(d, int) or (isinstance(d, ir.SymbolicDim) and d.value is not None) for d in shape
    )


def _drop_identity_reshapes(model: ir.Model) -> int:
    """Bypass Reshapes whose output shape is, symbolically, their input's."""
    removed = 0
    for node in list(model.graph):
        if node.op_type != "Reshape" or node.domain not in ("", "ai.onnx"):
            continue
        source, result = node.inputs[0], node.outputs[0]
        if result.is_graph_output() or not (_known(source.shape) and _known(result.shape)):
            continue
        if [_dim_key(d) for d in source.shape] != [_dim_key(d) for d in result.shape]:
            continue
        result.replace_all_uses_with(source)
        model.graph.remove(node, safe=True)
        removed += 1
    return removed


def _dim_key(dim: object) -> object:
    return dim if isinstance(dim, int) else str(dim)


def _guard_masked_rows(model: ir.Model) -> int:
    """``Where(IsNaN(o), 0, o)`` after each fused attention that takes a mask: the exporter's
    guard wrote 0 for fully masked rows, where the kernel gives NaN."""
    count = 0
    for node in list(model.graph):
        if node.op_type != "MultiHeadAttention" or node.domain != "com.microsoft":
            continue
        if len(node.inputs) < 6 or node.inputs[5] is None:
            continue  # no attention bias: no row can be fully masked
        out = node.outputs[0]
        consumers = list(out.uses())
        zero = ir.Value(name=unique_value_name(model.graph, f"{node.name or 'mha'}_masked_row_fill"),
                        type=out.type, shape=ir.Shape([]),
                        const_value=ir.tensor(np.zeros((), dtype=out.dtype.numpy() if out.dtype else np.float32)))
        model.graph.register_initializer(zero)
        is_nan = ir.node("IsNaN", [out], name=f"{node.name}_masked_rows")
        guard = ir.node("Where", [is_nan.outputs[0], zero, out], name=f"{node.name}_masked_rows_fill")
        guarded = guard.outputs[0]
        out.name, guarded.name = unique_value_name(model.graph, f"{out.name}_unguarded"), out.name
        guarded.type, guarded.shape = out.type, out.shape
        for user, index in consumers:
            user.replace_input_with(index, guarded)
        model.graph.insert_after(node, [is_nan, guard])
        if out.is_graph_output():
            outputs = model.graph.outputs
            outputs[outputs.index(out)] = guarded
        count += 1
    return count

