"""`fuse-decoder`: a decoder LLM's attention, rotary embeddings and RMS norms become
onnxruntime's CPU kernels (GroupQueryAttention, SimplifiedLayerNormalization,
SkipSimplifiedLayerNormalization; the rotary embedding folds into GroupQueryAttention).

The rewrites are graphopt's own (``decoder_fusions``, ``decoder_attention``: onnxscript's public
rewriter and onnxruntime fusions, plus rules for what ``torch.onnx.export(dynamo=True)`` writes
that those do not cover), run on a copy of the model. What GroupQueryAttention assumes of the
decoder (causal attention; a past and several new tokens at once for one sequence only) is in
``decoder_attention``.

Every fusion is verified: the fused graph must give the same logits and cache as the graph
before, on a prefill of 16 tokens and one cached decode step (max abs ≤ ``max_abs`` relative
to the logits' range); otherwise the model is left as it was and the note says why.
"""

from __future__ import annotations

import tempfile
from collections import Counter
from pathlib import Path

import numpy as np
import onnx_ir as ir

from graphopt.errors import GraphoptError, UnsupportedModelError
from graphopt.verify.layout import is_past
from graphopt.passes.base import GraphoptPass, PassContext, PassResult
from graphopt.passes.decoder_attention import SoftCapNotFusedError
from graphopt.passes.decoder_fusions import fuse_decoder_graph
from graphopt.passes.registry import register
from graphopt.passes.weights import weights_on_disk

FUSED_OPS = ("GroupQueryAttention", "RotaryEmbedding", "SimplifiedLayerNormalization",
             "SkipSimplifiedLayerNormalization", "MultiHeadAttention")


def _fusion_error(model: ir.Model, fused: ir.Model, threads: int | None) -> float:
    """Largest output difference of ``fused`` from ``model``, relative to each output's range, on a
    prefill and a cached one-token step (the two ways a decoder is driven)."""
    from graphopt.verify.feeds import input_specs, random_feeds
    from graphopt.verify.parity import run_outputs
    from graphopt.verify.runtime import make_session

    worst = 0.0
    with tempfile.TemporaryDirectory(prefix="graphopt-fuse-") as folder:
        sessions = []
        for label, candidate in (("before", model), ("fused", fused)):
            # Through files: a decoder's weights are external data, and may exceed protobuf's 2 GB.
            path = Path(folder) / f"{label}.onnx"
            ir.save(candidate, path, external_data=f"{label}.onnx.data")
            sessions.append(make_session(path, optimize=False, threads=threads))
        feeds = random_feeds(input_specs(model), shapes={}, seed=0, count=2).feeds
        for before, after in zip(*(run_outputs(session, feeds) for session in sessions)):
            for name, expected in before.items():
                scale = max(float(np.ptp(expected)), 1e-6)
                worst = max(worst, float(np.abs(np.asarray(after[name]) - expected).max()) / scale)
    return worst


def fused_counts(model: ir.Model) -> dict[str, int]:
    counts = Counter(node.op_type for node in model.graph.all_nodes() if node.domain == "com.microsoft")
    return {op: counts[op] for op in FUSED_OPS if counts[op]}


@register
class FuseDecoderPass(GraphoptPass, name="fuse-decoder",
                      summary="decoder LLMs: attention with its KV cache, rotary embeddings and RMS norms → onnxruntime's "
               "GroupQueryAttention and (Skip)SimplifiedLayerNormalization (verified)"):
    class Options:
        group_query_attention: bool = True
        """Fuse attention into GroupQueryAttention (the rotary embedding folds into it); False leaves
        it onnxruntime's MultiHeadAttention (any batch with any past, the cache appended apart), and
        soft-capped attention (Gemma 2; only GroupQueryAttention caps) unfused."""
        max_abs: float = 1e-4
        """Largest logit or cache difference the fused graph may show, relative to the logits' range."""

    in_place = False  # fuses a copy (tensors shared); every result is a new model, the input is never changed

    def apply(self, model: ir.Model, context: PassContext) -> PassResult:
        if not any(is_past(value.name) for value in model.graph.inputs):
            return PassResult(model.clone(), modified=False, notes=["not a decoder with a KV cache: nothing to fuse"])
        if weights_on_disk(model.graph):
            # packing the projections reads every weight: a model too large to load stays as it is
            return PassResult(model.clone(), modified=False, notes=["weights too large to load (left in external "
                                                                    "data): not fused (graphopt export fuses while "
                                                                    "exporting)"])
        fused, notes = model.clone(), []
        try:
            try:
                fuse_decoder_graph(fused, group_query_attention=self.options.group_query_attention)
            except SoftCapNotFusedError as exc:  # that copy is wrong: fuse again, the caps left as they are
                fused, notes = model.clone(), [f"soft-capped attention left unfused ({exc})"]
                fuse_decoder_graph(fused, group_query_attention=self.options.group_query_attention, soft_caps=False)
        except UnsupportedModelError as exc:
            return PassResult(model.clone(), modified=False, notes=[f"not fused: {exc}"])
        present = fused_counts(model)
        counts = {op: n - present.get(op, 0) for op, n in fused_counts(fused).items() if n > present.get(op, 0)}
        if not counts:
            # an exported decoder comes fused: say what it has, not that nothing matched
            return PassResult(model.clone(), modified=False, changes={f"{op} nodes (already fused)": n
                                                                      for op, n in present.items()},
                              notes=notes + ([] if present else ["no attention, rotary or norm pattern matched"]))
        try:
            worst = _fusion_error(model, fused, context.threads)
        except GraphoptError as exc:  # a fusion wrote a graph onnxruntime cannot load or run (GPT-2's Gemm)
            return PassResult(model.clone(), modified=False, notes=[f"the fused graph does not run ({exc}): left "
                                                                    "unfused"])
        if worst > self.options.max_abs:
            return PassResult(model.clone(), modified=False, notes=[
                f"fusion changed the outputs (max abs {worst:.2e} of the output's range > {self.options.max_abs}): "
                "left unfused"])
        changes = {f"{op} nodes": n for op, n in counts.items()}
        return PassResult(fused, modified=True, changes=changes, notes=notes,
                          details={"fused": counts, "relative_max_abs": worst})
