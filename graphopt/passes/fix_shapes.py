"""`fix-input-shapes`: give dynamic inputs the static shapes a deployment uses.

Edge runtimes and some execution providers want static shapes, and with them onnxsim and
onnxruntime fold more of the graph. Each ``NAME=D1,D2,…`` must keep the input's rank and
every dimension the model already fixes; the run then verifies the result on feeds of
exactly those shapes.
"""

from __future__ import annotations


import onnx_ir as ir

from graphopt.errors import RecipeError
from graphopt.passes.base import GraphoptPass, PassContext, PassResult
from graphopt.passes.registry import register


@register
class FixInputShapesPass(GraphoptPass, name="fix-input-shapes",
                         summary="dynamic input dimensions become the given static sizes (--fix-shape NAME=D1,D2,...)"):
    class Options:
        shapes: tuple[str, ...] = ()
        """``NAME=D1,D2,...`` per input to fix."""

    def __init__(self, **options: object) -> None:
        super().__init__(**options)
        from graphopt.verify.feeds import parse_shape_overrides

        self.fixed = parse_shape_overrides(self.options.shapes, flag="--fix-shape")
        small = sorted(name for name, shape in self.fixed.items() if any(d < 1 for d in shape))
        if small:
            raise RecipeError(f"--fix-shape {', '.join(small)}: every size must be at least 1")

    def validate(self, model: ir.Model) -> dict[str, ir.Value]:
        """The inputs to fix, once each given shape is known to fit (RecipeError otherwise)."""
        inputs = {value.name: value for value in model.graph.inputs if value.name not in model.graph.initializers}
        unknown = sorted(set(self.fixed) - set(inputs))
        if unknown:
            raise RecipeError(f"--fix-shape names unknown input {', '.join(unknown)}; inputs: {', '.join(inputs)}")
        for name, shape in self.fixed.items():
            declared = tuple(inputs[name].shape.dims) if inputs[name].shape is not None else None
            if declared is not None and len(declared) != len(shape):
                raise RecipeError(f"--fix-shape {name}: {len(shape)} sizes given, the input has rank {len(declared)}")
            for axis, (want, have) in enumerate(zip(shape, declared or shape)):
                if isinstance(have, int) and have > 0 and have != want:
                    raise RecipeError(f"--fix-shape {name}: axis {axis} is fixed at {have} in the model, not {want}")
        return inputs

    def apply(self, model: ir.Model, context: PassContext) -> PassResult:
        inputs = self.validate(model)
        changed = 0
        for name, shape in self.fixed.items():
            if inputs[name].shape is None or tuple(inputs[name].shape.dims) != shape:
                inputs[name].shape = ir.Shape(shape)
                changed += 1
        return PassResult(model, modified=bool(changed), changes={"inputs fixed": changed})
