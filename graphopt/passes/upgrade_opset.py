"""Upgrade the default-domain opset with onnx's version converter.

Quantization needs opset >= 13 (per-channel QuantizeLinear/DequantizeLinear ``axis``).
"""

from __future__ import annotations


import onnx
import onnx_ir as ir

from graphopt.errors import UnsupportedModelError, reason
from graphopt.passes.base import GraphoptPass, PassContext, PassResult
from graphopt.passes.registry import register


@register
class UpgradeOpsetPass(GraphoptPass, name="upgrade-opset",
                       summary="raise the default-domain opset with onnx's version converter (never lowers it)"):
    in_place = False
    role = "enable"

    class Options:
        target: int = 13
        """Opset to reach; models already at or above it are left alone."""

    def apply(self, model: ir.Model, context: PassContext) -> PassResult:
        current = model.opset_imports.get("", 1)
        if current >= self.options.target:
            return PassResult(model.clone(), modified=False)
        proto = ir.serde.serialize_model(model)
        try:
            converted = onnx.version_converter.convert_version(proto, self.options.target)
        except Exception as exc:  # the converter raises bare RuntimeErrors naming the op
            raise UnsupportedModelError(
                f"onnx's version converter cannot upgrade this model from opset {current} to "
                f"{self.options.target}: {reason(exc)}"
            ) from exc
        # The converter keeps the IR version; the new opset may need a newer one (opset 13: IR 7).
        # Other domains (com.microsoft, in every model onnxruntime optimized or quantized) have no
        # entry in onnx's table: the default domain decides.
        converted.ir_version = max(converted.ir_version,
                                   onnx.helper.find_min_ir_version_for(converted.opset_import, ignore_unknown=True))
        return PassResult(
            ir.serde.deserialize_model(converted),
            modified=True,
            changes={"opset from": current, "opset to": self.options.target},
        )
