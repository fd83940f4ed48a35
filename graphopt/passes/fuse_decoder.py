"""`fuse-decoder`: a decoder LLM's attention, rotary embeddings and RMS norms become
onnxruntime's CPU kernels (GroupQueryAttention, SimplifiedLayerNormalization,
SkipSimplifiedLayerNormalization; the rotary embedding folds into GroupQueryAttention).

The pattern work is transformers' own onnxscript fusion pipeline
(``transformers.exporters.onnxruntime_fusions``, what its exporter runs for ``ort_fusions="cpu"``),
run on the graph ``torch.onnx.export(dynamo=True)`` writes. One rule is relaxed: that pipeline
fuses GroupQueryAttention only when the batch is statically 1 wherever the graph may see a past
and several new tokens at once, because onnxruntime's CPU kernel serves that case for batch 1
only. A decoder driven as onnxruntime-genai drives it never asks for it (batch > 1 only for a
prefill with an empty past, or one token at a time), so the symbolic ``batch`` counts as 1 while
that one step runs. The contract holds for the runner in ``verify/decoder.py``; onnxruntime
refuses the unsupported case loudly ("batch_size must be 1 …"), never silently wrong.

Every fusion is verified: the fused graph must give the same logits and cache as the graph
before, on a prefill of 16 tokens and one cached decode step (max abs ≤ ``max_abs`` relative
to the logits' range); otherwise the model is left as it was and the note says why.
"""

from __future__ import annotations

import contextlib
import tempfile
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import onnx_ir as ir

from graphopt.errors import GraphoptError, require_extra
from graphopt.verify.layout import is_past
from graphopt.passes.base import GraphoptPass, PassContext, PassResult
from graphopt.passes.registry import register
from graphopt.passes.weights import weights_on_disk

FUSED_OPS = ("GroupQueryAttention", "RotaryEmbedding", "SimplifiedLayerNormalization",
             "SkipSimplifiedLayerNormalization", "MultiHeadAttention")


@contextlib.contextmanager
def _batch_counts_as_one(fusions: Any) -> Iterator[None]:
    """While the GroupQueryAttention step runs, the symbolic dimension named ``batch`` (axis 0)
    is reported as static 1 (see the module docstring for why that is sound here)."""
    static_dim = fusions._static_dim

    def batch_is_one(value: ir.Value, axis: int) -> int | None:
        shape = value.shape
        if axis == 0 and shape is not None and len(shape) > 0 and getattr(shape[0], "value", None) == "batch":
            return 1
        return static_dim(value, axis)

    fusions._static_dim = batch_is_one
    try:
        yield
    finally:
        fusions._static_dim = static_dim


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


def fuse_for_cpu(model: ir.Model, *, group_query_attention: bool = True) -> None:
    """transformers' CPU fusion steps, in its order, in place."""
    fusions = require_extra("transformers.exporters.onnxruntime_fusions", extra="llm",
                            purpose="fuse-decoder (transformers' onnxruntime fusions)")
    for step, providers in fusions._STEPS:
        if providers is not None and "cpu" not in providers:
            continue
        target = getattr(step, "func", step)
        if target is fusions._fuse_group_query_attention:
            if not group_query_attention:
                continue
            with _batch_counts_as_one(fusions):
                step(model)
        else:
            step(model)


def fused_counts(model: ir.Model) -> dict[str, int]:
    counts = Counter(node.op_type for node in model.graph.all_nodes() if node.domain == "com.microsoft")
    return {op: counts[op] for op in FUSED_OPS if counts[op]}


@register
class FuseDecoderPass(GraphoptPass, name="fuse-decoder",
                      summary="decoder LLMs: attention with its KV cache, rotary embeddings and RMS norms → onnxruntime's "
               "GroupQueryAttention and (Skip)SimplifiedLayerNormalization (verified)"):
    class Options:
        group_query_attention: bool = True
        """Fuse attention into GroupQueryAttention (the rotary embedding folds into it)."""
        max_abs: float = 1e-4
        """Largest logit or cache difference the fused graph may show, relative to the logits' range."""

    in_place = False  # fuses a copy (tensors shared): the original stays as it was when verification fails

    def apply(self, model: ir.Model, context: PassContext) -> PassResult:
        if not any(is_past(value.name) for value in model.graph.inputs):
            return PassResult(model.clone(), modified=False, notes=["not a decoder with a KV cache: nothing to fuse"])
        if weights_on_disk(model.graph):
            # transformers' fusion steps read every weight: a model too large to load stays as it is
            return PassResult(model, modified=False, notes=["weights too large to load (left in external data): "
                                                            "not fused (graphopt export fuses while exporting)"])
        fused = model.clone()
        fuse_for_cpu(fused, group_query_attention=self.options.group_query_attention)
        counts = fused_counts(fused)
        if not counts:
            return PassResult(model.clone(), modified=False, notes=["no attention, rotary or norm pattern matched"])
        try:
            worst = _fusion_error(model, fused, context.threads)
        except GraphoptError as exc:  # a fusion step wrote a graph onnxruntime cannot load or run (GPT-2's Gemm)
            return PassResult(model.clone(), modified=False, notes=[f"the fused graph does not run ({exc}): left "
                                                                    "unfused"])
        if worst > self.options.max_abs:
            return PassResult(model.clone(), modified=False, notes=[
                f"fusion changed the outputs (max abs {worst:.2e} of the output's range > {self.options.max_abs}): "
                "left unfused"])
        changes = {f"{op} nodes": n for op, n in counts.items()}
        return PassResult(fused, modified=True, changes=changes, details={"fused": counts, "relative_max_abs": worst})
