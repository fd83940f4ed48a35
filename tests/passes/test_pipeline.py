"""Pipeline: per-pass records, validity check after each pass, failures named by pass."""

from __future__ import annotations

import dataclasses

import onnx_ir as ir
import pytest

from graphopt.errors import InvalidModelError, PassFailed, RecipeError
from graphopt.passes import GraphoptPass, PassResult, Pipeline, get_pass
from graphopt.passes.base import PassContext
from graphopt.verify.runtime import check_loadable
from tests.conftest import linear_model


class BreakGraphPass(GraphoptPass):
    """Deletes the first node's producer link: a deliberately broken rewrite."""

    name = "break-graph"
    summary = "test only"

    def apply(self, model: ir.Model, context: PassContext) -> PassResult:
        node = next(iter(model.graph))
        model.graph.remove(node, safe=False)
        return PassResult(model, modified=True)


class CrashPass(GraphoptPass):
    name = "crash"
    summary = "test only"

    @dataclasses.dataclass(frozen=True, kw_only=True)
    class Options:
        message: str = "boom"

    def apply(self, model: ir.Model, context: PassContext) -> PassResult:
        raise ZeroDivisionError(self.options.message)


def test_records_each_step(rng):
    model = ir.serde.deserialize_model(linear_model(rng))
    steps = [get_pass("lift-constants")(), get_pass("cleanup")()]
    result = Pipeline(steps, check=check_loadable).run(model)
    assert [s.name for s in result.steps] == ["lift-constants", "cleanup"]
    record = result.steps[0]
    assert record.nodes_before == record.nodes_after == 3
    assert record.weight_bytes_before == record.weight_bytes_after == (8 * 4 + 4) * 4
    assert record.seconds >= 0 and record.op_delta == {}


def test_a_pass_that_breaks_the_model_is_rolled_back_with_a_warning_and_the_run_goes_on(rng, caplog):
    proto = linear_model(rng)
    model = ir.serde.deserialize_model(proto)
    expected = ir.serde.deserialize_model(proto)
    get_pass("cleanup")()(expected)

    with caplog.at_level("WARNING"):
        result = Pipeline([BreakGraphPass(), get_pass("cleanup")()], check=check_loadable).run(model)

    broken, cleaned = result.steps
    assert broken.rolled_back and not broken.modified
    assert broken.notes and broken.notes[0].startswith("step rolled back: it produced a model that fails the check")
    assert "ONNX checker" in broken.notes[0]
    assert "break-graph: step rolled back" in caplog.text
    assert not cleaned.rolled_back
    # The run went on from the model as it was before the broken step.
    assert [n.op_type for n in result.model.graph] == [n.op_type for n in expected.graph]
    check_loadable(result.model)


def test_a_pass_placed_where_it_cannot_run_is_a_recipe_error(rng):
    model = ir.serde.deserialize_model(linear_model(rng))
    model.opset_imports[""] = 11
    with pytest.raises(RecipeError, match="pass .quantize-int8.: quantize-int8 needs default-domain opset >= 13, the model has 11"):
        Pipeline([get_pass("quantize-int8")()]).run(model)


def test_an_unexpected_exception_is_named_by_pass(rng):
    model = ir.serde.deserialize_model(linear_model(rng))
    with pytest.raises(PassFailed, match=r"pass 'crash' failed: ZeroDivisionError: kaput"):
        Pipeline([CrashPass(message="kaput")]).run(model)


def test_check_loadable_refuses_a_dangling_graph(rng):
    model = ir.serde.deserialize_model(linear_model(rng))
    model.graph.remove(next(iter(model.graph)), safe=False)
    with pytest.raises(InvalidModelError):
        check_loadable(model)


def test_an_ir3_model_moves_to_ir4_when_a_pass_adds_initializers():
    """IR 3 wants every initializer listed as a graph input too; lifting a Constant would break
    that, so the model moves to IR 4 (which only drops that rule) instead of being refused."""
    import numpy as np
    from onnx import helper, numpy_helper

    from tests.conftest import make_model, tensor

    value = numpy_helper.from_array(np.array([1.0, 2.0], np.float32), "c")
    proto = make_model([helper.make_node("Constant", [], ["c"], value=value),
                        helper.make_node("Add", ["X", "c"], ["Y"])], [tensor("X", [2])], [tensor("Y", [2])], opset=9)
    proto.ir_version = 3
    model = ir.serde.deserialize_model(proto)

    (step,) = Pipeline([get_pass("lift-constants")()], check=check_loadable).run(model).steps

    assert not step.rolled_back and step.changes == {"constants lifted": 1, "IR version 3 -> 4": 1}
    assert model.ir_version == 4


class SeeContextPass(GraphoptPass):
    name = "see-context"
    summary = "test only"
    seen: list = []

    def apply(self, model: ir.Model, context: PassContext) -> PassResult:
        self.seen.append(context)
        return PassResult(model, modified=False)


def test_each_call_gets_the_runs_context_and_the_pass_keeps_no_run_state(rng):
    """The context is handed to the call (immutable), not stored on the pass: one pass object
    can serve two runs with different contexts, and onnx-ir's own entry point gets an empty one."""
    model = ir.serde.deserialize_model(linear_model(rng))
    pass_ = SeeContextPass()
    first, second = PassContext(threads=1, exclude=("a",)), PassContext(retreat=2)
    Pipeline([pass_], context=first).run(model)
    Pipeline([pass_], context=second).run(model)
    pass_.call(model)
    assert pass_.seen == [first, second, PassContext()]
    assert not hasattr(pass_, "context")
    with pytest.raises(dataclasses.FrozenInstanceError):
        first.retreat = 1  # type: ignore[misc]


def test_a_context_without_calibration_names_the_pass_that_needs_it():
    from graphopt.errors import DataError

    with pytest.raises(DataError, match="pass 'quantize-static' needs calibration data: give --calib DATA"):
        PassContext().calibration_feeds("quantize-static")
