"""prune-weights: unstructured magnitude pruning (lossy) — the smallest weights become 0.

Say it plainly: a dense ONNX file stores every zero, so this makes the ``.onnx`` neither
smaller nor faster. What it buys is a smaller *compressed* file (zip, gzip, an app store's
download): the report gives the deflated size before and after. For a smaller or faster
model, remove whole channels (``prune-channels``) or quantize.
"""

from __future__ import annotations

import logging
import zlib
from typing import Any, Literal

import numpy as np
import onnx_ir as ir

from graphopt.passes.base import GraphoptPass, PassContext, PassResult, check_fractions
from graphopt.passes.prune.cut import replace_constant
from graphopt.passes.weights import weight_uses
from graphopt.passes.registry import register

logger = logging.getLogger(__name__)


def deflated_bytes(model: ir.Model) -> int:
    """Size of the serialized model after zlib (deflate) level 6: what a zip of it weighs."""
    return len(zlib.compress(ir.serde.serialize_model(model).SerializeToString(), 6))


@register
class PruneWeightsPass(GraphoptPass, name="prune-weights",
                       summary="unstructured magnitude pruning: zeroes the smallest weights (smaller zip, same .onnx size)"):
    role = "compress"

    class Options:
        amount: float = 0.5
        """Fraction of the weights set to 0."""
        scope: Literal["layer", "global"] = "layer"
        """'layer': ``amount`` of each weight; 'global': the smallest |w| over all of them."""
        ops: tuple[str, ...] = ("Conv", "ConvTranspose", "Gemm", "MatMul")
        min_elements: int = 1024
        """Smaller weights are left alone (biases, tiny layers)."""

    def __init__(self, **options: Any) -> None:
        super().__init__(**options)
        check_fractions(self.name, amount=self.options.amount)

    def apply(self, model: ir.Model, context: PassContext) -> PassResult:
        uses, _ = weight_uses(model.graph, self.options.ops, self.options.min_elements, context.exclude)
        uses = list({id(u.weight): u for u in uses}.values())
        if not uses:
            return PassResult(model, modified=False, changes={"weights zeroed": 0})
        deflated_before = deflated_bytes(model)
        arrays = [u.weight.const_value.numpy() for u in uses]
        threshold = None
        if self.options.scope == "global":
            magnitudes = np.concatenate([np.abs(a).ravel() for a in arrays])
            threshold = np.partition(magnitudes, int(self.options.amount * magnitudes.size))[
                int(self.options.amount * magnitudes.size)] if self.options.amount else 0.0
        layers, zeroed, total = [], 0, 0
        for use, array in zip(uses, arrays):
            pruned = _prune(array, self.options.amount, threshold)
            if not np.array_equal(pruned, array):
                replace_constant(model.graph, use.node, use.input_index, pruned)
            zeros = int(np.count_nonzero(pruned == 0))
            zeroed += zeros - int(np.count_nonzero(array == 0))
            total += pruned.size
            layers.append({"node": use.name, "weight": use.weight.name, "sparsity": zeros / pruned.size})
        deflated_after = deflated_bytes(model)
        logger.info("zeroed %d weights; deflated size %d -> %d bytes", zeroed, deflated_before, deflated_after)
        return PassResult(
            model,
            modified=zeroed > 0,
            changes={"weights zeroed": zeroed},
            details={
                "layers": layers,
                "sparsity": sum(layer["sparsity"] * a.size for layer, a in zip(layers, arrays)) / total,
                "deflated_bytes_before": deflated_before,
                "deflated_bytes_after": deflated_after,
                "note": "dense ONNX stores zeros: the .onnx size and latency do not change; "
                        "only the compressed (zip/deflate) size shrinks",
            },
        )


def _prune(array: np.ndarray, amount: float, threshold: float | None) -> np.ndarray:
    """Zero |w| below the global ``threshold``, or the ``amount`` smallest of this array."""
    magnitudes = np.abs(array)
    if threshold is None:
        count = int(amount * array.size)
        if count == 0:
            return array
        order = np.argsort(magnitudes, axis=None, kind="stable")[:count]
        pruned = array.copy().ravel()
        pruned[order] = 0
        return pruned.reshape(array.shape)
    return np.where(magnitudes < threshold, np.float32(0), array).astype(array.dtype)
