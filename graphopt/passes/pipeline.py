"""Run passes in order, check the model after each one, and record what each changed."""

from __future__ import annotations

import dataclasses
import logging
import time
from collections import Counter
from collections.abc import Callable, Sequence
from typing import Any

import onnx_ir as ir

from graphopt.errors import GraphoptError, PassFailed
from graphopt.passes.base import GraphoptPass, PassContext, PassResult

logger = logging.getLogger(__name__)

ModelCheck = Callable[[ir.Model], None]


@dataclasses.dataclass
class StepRecord:
    """What one pass did, as it goes into the JSON report."""

    name: str
    options: dict[str, Any]
    modified: bool
    seconds: float
    nodes_before: int
    nodes_after: int
    weight_bytes_before: int
    weight_bytes_after: int
    changes: dict[str, int]
    op_delta: dict[str, int]
    notes: list[str]
    details: dict[str, Any]
    rolled_back: bool = False  # the step's result failed the check and was undone
    searched: bool = True  # PassResult.searched
    exhausted: str | None = None  # PassResult.exhausted

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclasses.dataclass
class PipelineResult:
    model: ir.Model
    steps: list[StepRecord]
    keep_input: bool = False  # the run decided the input's own bytes are the result

    @property
    def modified(self) -> bool:
        return any(step.modified for step in self.steps)


def op_histogram(model: ir.Model) -> Counter[str]:
    return Counter(node.op_type for node in ir.traversal.RecursiveGraphIterator(model.graph))


def weight_bytes(model: ir.Model) -> int:
    """Bytes of initializers plus Constant-node tensors (where many exporters keep weights)."""
    total = sum(v.const_value.nbytes for v in model.graph.initializers.values() if v.const_value is not None)
    for node in ir.traversal.RecursiveGraphIterator(model.graph):
        if node.op_type == "Constant":
            attr = node.attributes.get("value")
            if attr is not None and isinstance(attr.value, ir.TensorProtocol):
                total += attr.value.nbytes
    return total


class Pipeline:
    """An ordered list of passes, each called with the run's ``context``; ``check`` runs after
    every pass that modified the model (a failing step is undone). A pass that composes others
    (int8's automatic mode) runs them through a pipeline of its own."""

    def __init__(
        self, passes: Sequence[GraphoptPass], *, check: ModelCheck | None = None, context: PassContext | None = None
    ) -> None:
        self.passes = list(passes)
        self.check = check
        self.context = context or PassContext()

    def run(self, model: ir.Model, *, announce: bool = True) -> PipelineResult:
        """Run every pass in order; ``announce`` logs each step (off for a search's trials)."""
        steps = []
        enabled: list[tuple[int, ir.Model]] = []  # enabling steps that changed the model, and its state before
        for index, pass_ in enumerate(self.passes, start=1):
            if announce:
                logger.info("[%d/%d] %s …", index, len(self.passes), pass_.name)
            previous = model
            model, record = self._run_one(pass_, model)
            steps.append(record)
            if pass_.role == "enable" and record.modified and model is not previous:
                enabled.append((len(steps) - 1, previous))
            if not announce:
                continue
            summary = ", ".join(f"{k} {v}" for k, v in record.changes.items() if v) or "no change"
            logger.info("[%d/%d] %s: %s (%.2fs)", index, len(self.passes), pass_.name, summary, record.seconds)
            for note in record.notes:
                logger.warning("%s: %s", pass_.name, note)
        for index, before in reversed(enabled):
            if not any(step.modified for step in steps[index + 1:]):
                model = before  # it enabled nothing: a step that only enables must not be kept
                step = steps[index]
                step.modified, step.rolled_back = False, True
                step.notes.append("undone: no later step changed the model, so it enabled nothing")
                if announce:
                    logger.info("%s undone: no later step changed the model", step.name)
        return PipelineResult(model, steps)

    def _run_one(self, pass_: GraphoptPass, model: ir.Model) -> tuple[ir.Model, StepRecord]:
        ops_before, bytes_before = op_histogram(model), weight_bytes(model)
        start = time.perf_counter()
        # Passes rewrite in place; a copy (sharing the tensors) lets a step be undone.
        before = model.clone() if self.check is not None else None
        try:
            result = pass_(model, self.context)
        except GraphoptError:
            raise
        except ir.passes.InvariantError as exc:
            raise PassFailed(f"pass '{pass_.name}': {_cause(exc)}") from exc
        except Exception as exc:  # a bug or an unsupported model: name the pass, keep the cause
            raise PassFailed(f"pass '{pass_.name}' failed: {type(exc).__name__}: {_cause(exc)}") from exc
        notes = list(result.notes) if isinstance(result, PassResult) else []
        rolled_back = False
        changes = dict(getattr(result, "changes", {}))
        if result.modified and _allow_initializers_outside_inputs(result.model):
            changes["IR version 3 -> 4"] = 1
        if result.modified and self.check is not None:
            try:
                self.check(result.model)
            except GraphoptError as exc:
                # A pass that mishandles some construct must not cost the whole run: the step is
                # undone and the run goes on, with the reason in the report.
                notes = [f"step rolled back: it produced a model that fails the check ({exc})"]
                result, changes, rolled_back = PassResult(before, modified=False), {}, True
        seconds = time.perf_counter() - start
        ops_after = op_histogram(result.model)
        delta = {op: ops_after[op] - ops_before[op] for op in sorted(ops_before | ops_after)}
        record = StepRecord(
            name=pass_.name,
            options=pass_.options_dict(),
            modified=result.modified,
            seconds=round(seconds, 4),
            nodes_before=sum(ops_before.values()),
            nodes_after=sum(ops_after.values()),
            weight_bytes_before=bytes_before,
            weight_bytes_after=weight_bytes(result.model),
            changes=changes,
            op_delta={op: d for op, d in delta.items() if d},
            notes=notes,
            details=dict(getattr(result, "details", {})),
            rolled_back=rolled_back,
            searched=getattr(result, "searched", True),
            exhausted=getattr(result, "exhausted", None),
        )
        return result.model, record


def _allow_initializers_outside_inputs(model: ir.Model) -> bool:
    """IR 3 (old model-zoo files) requires every initializer to be a graph input as well; a pass
    that adds one (a lifted constant, a converted attribute) makes such a model invalid. IR 4
    drops that rule and changes nothing else, so the model moves to IR 4. True when it did."""
    if model.ir_version is None or model.ir_version >= 4:
        return False
    inputs = {value.name for value in model.graph.inputs}
    if all(name in inputs for name in model.graph.initializers):
        return False
    model.ir_version = 4
    return True


def _cause(exc: BaseException) -> str:
    while exc.__cause__ is not None and not str(exc):
        exc = exc.__cause__
    text = str(exc) or type(exc).__name__
    return text.strip().splitlines()[0]


__all__ = ["Pipeline", "PipelineResult", "StepRecord", "PassResult", "op_histogram", "weight_bytes"]
