"""`keep-logits`: an optional decoder input ``logits_to_keep`` that limits the LM head to the last
positions.

A generation loop reads the logits of a prefill's last position only, yet an exported decoder
computes the head for every position: for a 135M model with a 49k vocabulary that is ~17% of a
128-token prefill, and its [batch, sequence, vocab] output is the largest tensor the step
returns. This pass slices the hidden states the head reads to their last ``logits_to_keep``
positions (transformers' meaning; 0: every position) before the head. The input is an int64
scalar initializer (default 0) the caller may override, so every runner that does not know it —
onnxruntime-genai, perplexity over a window — gets the model's outputs as before; graphopt's
prefill in generation, greedy checks and latency feeds 1.

The head is ``passes.weights.lm_head``'s; the ``logits`` output must be declared [batch,
sequence, vocab].
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from graphopt.passes.base import GraphoptPass, PassContext, PassResult
from graphopt.passes.registry import register
from graphopt.passes.weights import lm_head
from graphopt.verify.layout import LOGITS, LOGITS_TO_KEEP

_INT64_MAX = np.iinfo(np.int64).max


@register
class KeepLogitsPass(GraphoptPass, name="keep-logits",
                     summary="decoders: an optional input logits_to_keep (default 0: all positions) that limits the "
                             "LM head to the last positions; a generation prefill computes one row of logits"):

    def apply(self, model: ir.Model, context: PassContext) -> PassResult:
        graph = model.graph
        if any(value.name == LOGITS_TO_KEEP for value in graph.inputs):
            return PassResult(model, modified=False, notes=[f"the model has {LOGITS_TO_KEEP} already"])
        head = lm_head(graph)
        if head is None:
            return PassResult(model, modified=False, notes=[f"no LM head found before output '{LOGITS}'"])
        hidden = head.inputs[0]
        logits = next(value for value in graph.outputs if value.name == LOGITS)
        if hidden is None or logits.shape is None or len(logits.shape) != 3 or model.opset_imports.get("", 1) < 10:
            return PassResult(model, modified=False, notes=[
                f"LM head {head.name}: '{LOGITS}' is not declared [batch, sequence, vocab] (or opset < 10)"])
        keep = ir.Value(name=LOGITS_TO_KEEP, shape=ir.Shape([]), type=ir.TensorType(ir.DataType.INT64),
                        const_value=ir.tensor(np.array(0, np.int64), name=LOGITS_TO_KEEP))
        graph.inputs.append(keep)
        graph.register_initializer(keep)

        def constant(name: str, values: list[int]) -> ir.Value:
            value = ir.Value(name=f"{LOGITS_TO_KEEP}_{name}", const_value=ir.tensor(np.array(values, np.int64),
                                                                                  name=f"{LOGITS_TO_KEEP}_{name}"))
            graph.register_initializer(value)
            return value

        negated = ir.node("Neg", [keep], name=f"{LOGITS_TO_KEEP}_negated")
        starts = ir.node("Reshape", [negated.outputs[0], constant("one", [1])], name=f"{LOGITS_TO_KEEP}_starts")
        sliced = ir.node("Slice", [hidden, starts.outputs[0], constant("end", [_INT64_MAX]),
                                   constant("axis", [1])], name=f"{LOGITS_TO_KEEP}_slice")
        sliced.outputs[0].name = f"{hidden.name or 'hidden'}_kept"
        if hidden.dtype is not None:
            sliced.outputs[0].dtype = hidden.dtype
        if hidden.shape is not None and len(hidden.shape) == 3:
            sliced.outputs[0].shape = ir.Shape([hidden.shape[0], "logits_length", hidden.shape[2]])
        for new in (negated, starts, sliced):
            graph.insert_before(head, new)
        head.replace_input_with(0, sliced.outputs[0])
        logits.shape = ir.Shape([logits.shape[0], "logits_length", logits.shape[2]])
        return PassResult(model, modified=True, changes={"LM heads limited": 1}, details={"head": head.name})
