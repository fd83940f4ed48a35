"""What every graphopt pass is: an onnx-ir pass with a registry name, typed options and counts."""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

import onnx_ir as ir


@dataclasses.dataclass
class PassResult(ir.passes.PassResult):
    """onnx-ir's result plus what the pass counted and anything the user should know."""

    changes: dict[str, int] = dataclasses.field(default_factory=dict)
    notes: list[str] = dataclasses.field(default_factory=list)
    details: dict[str, Any] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass(frozen=True)
class PassContext:
    """What a run gives every pass besides the model: calibration feeds (``--calib``), the
    thread count for any measurement, and a folder for per-machine caches."""

    calibration: Any = None  # graphopt.verify.feeds.FeedSet
    threads: int | None = None
    cache_dir: str | None = None
    budget: Any = None  # graphopt.verify.judge.Budget the result must meet
    retreat: int = 0  # the final check missed the budget this many times: searching passes step further down
    exclude: tuple[str, ...] = ()  # glob patterns (node names, op types, weight names) no lossy pass may touch
    activation_stats: Any = None  # name -> TensorStats measured on the float model, reused by trials
    analyze: bool = False  # passes may spend extra time to explain their choices (layer reports)


@dataclasses.dataclass(frozen=True, kw_only=True)
class NoOptions:
    """For passes that take no options."""


class GraphoptPass(ir.passes.PassBase):
    """Base of graphopt passes.

    Subclasses set ``name`` (the registry and recipe name, verb-noun), ``summary``, an
    ``Options`` dataclass (keyword-only, typed, with defaults) and ``in_place``. A pass is
    constructed from keyword options: ``SimplifyPass(check_n=2)``; an unknown keyword is
    a TypeError naming the valid ones.
    """

    name: ClassVar[str]
    summary: ClassVar[str]
    Options: ClassVar[type] = NoOptions
    in_place: ClassVar[bool] = True  # type: ignore[misc]

    def __init__(self, **options: Any) -> None:
        valid = {f.name for f in dataclasses.fields(self.Options)}
        unknown = sorted(set(options) - valid)
        if unknown:
            raise TypeError(
                f"pass '{self.name}' has no option {', '.join(unknown)}; "
                f"valid options: {', '.join(sorted(valid)) or '(none)'}"
            )
        self.options = self.Options(**options)
        self.context = PassContext()

    def activation_stats(self, model: Any, names: list[str]) -> dict[str, Any]:
        """Calibration statistics of ``names``: from the run's cache (statistics of the float
        model, shared by the automatic mode's trials) or measured now."""
        from graphopt.passes.quantize.calibrate import collect

        cached = self.context.activation_stats or {}
        if all(name in cached for name in names):
            return {name: cached[name] for name in names}
        return collect(model, names, self.calibration_feeds().feeds, threads=self.context.threads)

    def calibration_feeds(self) -> Any:
        """The calibration FeedSet; a DataError naming this pass when the run has none."""
        from graphopt.errors import DataError

        if self.context.calibration is None:
            raise DataError(f"pass '{self.name}' needs calibration data: give --calib DATA")
        return self.context.calibration

    def __call__(self, model: Any) -> PassResult:  # type: ignore[override]
        """Run on an ``onnx_ir.Model``, or on what ``graphopt.load_model`` returned. A failed
        precondition (the pass placed where it cannot run) is the recipe's mistake: RecipeError."""
        from graphopt.errors import RecipeError
        from graphopt.io import LoadedModel

        try:
            return super().__call__(model.model if isinstance(model, LoadedModel) else model)
        except ir.passes.PreconditionError as exc:
            raise RecipeError(f"pass '{self.name}': {exc}") from exc

    def require_opset(self, model: ir.Model, minimum: int) -> None:
        """The precondition of passes that emit operators of opset ``minimum``."""
        opset = model.opset_imports.get("")
        if opset is None or opset < minimum:
            raise ir.passes.PreconditionError(
                f"{self.name} needs default-domain opset >= {minimum}, the model has {opset}: "
                f"put an 'upgrade-opset' step (target = {minimum}) before it")

    def needs_calibration(self) -> bool:
        """Whether this pass, as configured, cannot run without calibration data: a run
        without ``--calib`` is refused before any pass starts."""
        return False

    def searches(self) -> bool:
        """Whether this pass, as configured, searches under the run's budget (and so can step
        further down when the final verification misses it: ``PassContext.retreat``)."""
        return False

    @property
    def changes_input(self) -> bool:  # type: ignore[override]
        return self.in_place

    def options_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self.options)

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.options_dict().items())
        return f"{type(self).__name__}({args})"


def check_fractions(pass_name: str, **fractions: float) -> None:
    """Options that are shares of something must lie in [0, 1): refused when the pass is built,
    before any work starts."""
    from graphopt.errors import RecipeError

    for key, value in fractions.items():
        if not 0 <= value < 1:
            raise RecipeError(f"pass '{pass_name}': '{key}' must be a fraction in [0, 1), got {value}")


def option_docs(options: type) -> dict[str, str]:
    """The docstring written under each field of an ``Options`` dataclass, by field name."""
    import ast
    import inspect
    import textwrap

    try:
        tree = ast.parse(textwrap.dedent(inspect.getsource(options)))
    except (OSError, TypeError, SyntaxError):
        return {}
    docs, previous = {}, None
    for node in tree.body[0].body if tree.body else []:
        if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            previous = node.target.id
        elif previous and isinstance(node, ast.Expr) and isinstance(getattr(node, "value", None), ast.Constant) \
                and isinstance(node.value.value, str):
            docs[previous] = node.value.value
            previous = None
        else:
            previous = None
    return docs
