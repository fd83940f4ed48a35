"""Simplify the graph with onnxsim: constant folding, shape inference, fusions.

onnxsim is a large C++ optimizer and occasionally fails or miscompiles a model. Such a
failure is not the user's problem: the step is skipped with a note in the report and the
pipeline goes on with the untouched model.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import sys
import tempfile

import onnx
import onnx_ir as ir

from graphopt.io import EXTERNAL_DATA_THRESHOLD_BYTES, weights_nbytes
from graphopt.errors import reason
from graphopt.passes.base import GraphoptPass, PassContext, PassResult
from graphopt.passes.registry import register

logger = logging.getLogger(__name__)


@register
class SimplifyPass(GraphoptPass, name="simplify",
                   summary="onnxsim: fold constants, infer shapes, fuse ops (skipped with a note if it fails)"):
    in_place = False

    class Options:
        check_n: int = 2
        """Random feeds on which the simplified model must match the original (max abs below
        ``tolerance``, both run in onnxruntime with optimizations off); 0 skips the check."""
        tolerance: float = 1e-4
        max_growth: float = 1.0
        """Skip the step when folding makes the model larger than this factor (models that
        build weights at run time with ConstantOfShape would otherwise balloon)."""
        fuse_bn: bool = True
        """Fold BatchNormalization into the preceding Conv."""

    def apply(self, model: ir.Model, context: PassContext) -> PassResult:
        if weights_nbytes(model) > EXTERNAL_DATA_THRESHOLD_BYTES:
            return self._skipped(model, "model is too large for onnxsim (protobuf limit of 2 GB)")
        import onnxsim

        proto = ir.serde.serialize_model(model)
        before = proto.SerializeToString(deterministic=True)
        # From IR 4 on, an initializer that is also a graph input is a default the caller may
        # override (keep-logits' logits_to_keep): onnxsim must see it as an input, not fold it.
        defaults = {t.name: t for t in proto.graph.initializer} if (model.ir_version or 0) >= 4 else {}
        defaults = {value.name: defaults[value.name] for value in proto.graph.input if value.name in defaults}
        kept = [t for t in proto.graph.initializer if t.name not in defaults]
        del proto.graph.initializer[:]
        proto.graph.initializer.extend(kept)
        try:
            with _quiet():
                simplified, _ = onnxsim.simplify(
                    proto,
                    check_n=0,  # onnxsim's own check cannot feed dynamic shapes; ours below can
                    skip_fuse_bn=not self.options.fuse_bn,
                    initializers_as_constants=True,  # weights are foldable, not runtime inputs
                )
        except Exception as exc:  # onnxsim raises many types, all mean "could not simplify"
            return self._skipped(model, f"onnxsim failed ({reason(exc, 200)}); step skipped")
        proto.graph.initializer.extend(defaults.values())
        simplified.graph.initializer.extend(
            tensor for name, tensor in defaults.items() if any(value.name == name for value in simplified.graph.input))
        _drop_onnxsim_metadata(simplified)
        old_bytes, new_bytes = _without_value_info(proto), _without_value_info(simplified)
        if new_bytes == old_bytes:
            return PassResult(model.clone(), modified=False)
        if len(new_bytes) > self.options.max_growth * len(old_bytes):
            return self._skipped(
                model, f"onnxsim would grow the model from {len(old_bytes):,} to {len(new_bytes):,} bytes "
                f"(constant folding materializes tensors); step skipped",
            )
        new_model = ir.serde.deserialize_model(simplified)
        mismatch = self._outputs_differ(model, before, simplified)
        if mismatch:
            return self._skipped(model, f"onnxsim changed the outputs ({mismatch}); step skipped")
        folded = len(model.graph) - len(new_model.graph)
        return PassResult(new_model, modified=True, changes={"nodes removed": folded})

    def _outputs_differ(self, model: ir.Model, before: bytes, after: onnx.ModelProto) -> str | None:
        """A reason when the simplified model's outputs differ on random feeds, else None."""
        if self.options.check_n <= 0:
            return None
        from graphopt.errors import GraphoptError
        from graphopt.verify.feeds import input_specs, random_feeds
        from graphopt.verify.parity import rewrite_mismatch

        try:
            feeds = random_feeds(input_specs(model), shapes={}, seed=0, count=self.options.check_n).feeds
        except GraphoptError as exc:  # inputs random data cannot fill
            return str(exc)
        mismatch = rewrite_mismatch(before, after.SerializeToString(), feeds, tolerance=self.options.tolerance,
                                    threads=1)
        return f"{mismatch} on random feeds" if mismatch else None

    def _skipped(self, model: ir.Model, note: str) -> PassResult:
        return PassResult(model.clone(), modified=False, notes=[note])


def _drop_onnxsim_metadata(proto: onnx.ModelProto) -> None:
    """onnxsim stamps kilobytes of audit metadata; graphopt's report records the changes."""
    kept = [p for p in proto.metadata_props if not p.key.startswith("onnxsim.")]
    del proto.metadata_props[:]
    proto.metadata_props.extend(kept)


def _without_value_info(proto: onnx.ModelProto) -> bytes:
    """The model's bytes minus inferred shapes, which onnxsim adds even when it changes nothing."""
    copy = onnx.ModelProto()
    copy.CopyFrom(proto)
    del copy.graph.value_info[:]
    return copy.SerializeToString(deterministic=True)


@contextlib.contextmanager
def _quiet():
    """onnxsim prints progress to stdout, and its C++ core warnings to the process's stderr
    (file descriptor 2, beyond Python's sys.stderr); the library must not print. Both are
    captured at the descriptor level and passed to the log at debug level."""
    with tempfile.TemporaryFile(mode="w+b") as sink, contextlib.redirect_stdout(io.StringIO()) as text:
        sys.stdout.flush()
        sys.stderr.flush()
        saved = [os.dup(1), os.dup(2)]
        try:
            os.dup2(sink.fileno(), 1)
            os.dup2(sink.fileno(), 2)
            yield
        finally:
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            for fd in saved:
                os.close(fd)
            sink.seek(0)
            for line in (text.getvalue() + sink.read().decode(errors="replace")).splitlines():
                if line.strip():
                    logger.debug("onnxsim: %s", line.strip())
