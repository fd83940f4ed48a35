"""What every graphopt pass is: an onnx-ir pass with a registry name, typed options and counts."""

from __future__ import annotations

import dataclasses
import typing
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, ClassVar

import onnx_ir as ir

if TYPE_CHECKING:
    from graphopt.passes.quantize.calibrate import TensorStats
    from graphopt.verify.feeds import FeedSet
    from graphopt.verify.judge import Budget
    from graphopt.verify.text import TextCalibration


@dataclasses.dataclass
class PassResult(ir.passes.PassResult):
    """onnx-ir's result plus what the pass counted and anything the user should know."""

    changes: dict[str, int] = dataclasses.field(default_factory=dict)
    notes: list[str] = dataclasses.field(default_factory=list)
    details: dict[str, Any] = dataclasses.field(default_factory=dict)
    searched: bool = True
    """A searching pass (``searches()``) that had nothing to search this time says False: a
    failed verification then has no ladder of this pass to send further down."""
    exhausted: str | None = None
    """A search that reached the end of its ladder without meeting its target: why, and the
    best it reached. The final verification decides; no retreat can help."""


@dataclasses.dataclass(frozen=True)
class PassContext:
    """What a run hands every pass call besides the model. Immutable: a pass that needs a
    variant for the passes it runs itself makes one with ``dataclasses.replace``."""

    calibration: FeedSet | None = None
    """Calibration feeds (``--calib``)."""
    threads: int | None = None
    """Thread count for any measurement."""
    cache_dir: str | None = None
    """Folder for per-machine caches (the int8 speed profile)."""
    budget: Budget | None = None
    """What the result must meet (``verify.judge``); a searching pass searches under it."""
    retreat: int = 0
    """The final check missed the budget this many times: searching passes step further down."""
    exclude: tuple[str, ...] = ()
    """Glob patterns (node names, op types, weight names) no lossy pass may touch."""
    activation_stats: Mapping[str, TensorStats] | None = None
    """Statistics measured on the float model, reused by the trials of a search."""
    analyze: bool = False
    """Passes may spend extra time to explain their choices (layer reports)."""
    text: TextCalibration | None = None
    """Decoder LLMs: calibration text and the text budget (``verify.text``)."""
    target_cpu: str | None = None
    """The CPU the model is made for (``graphopt.cpu``: 'avx2', 'vnni'); None: this one."""

    def calibration_feeds(self, pass_name: str) -> FeedSet:
        """The calibration feeds; a DataError naming the pass when the run has none."""
        from graphopt.errors import DataError

        if self.calibration is None:
            raise DataError(f"pass '{pass_name}' needs calibration data: give --calib DATA")
        return self.calibration

    def statistics(self, pass_name: str, model: ir.Model, names: list[str]) -> dict[str, TensorStats]:
        """Calibration statistics of ``names``: from ``activation_stats`` when it has them all,
        else measured now on the calibration feeds."""
        from graphopt.passes.quantize.calibrate import collect

        cached = self.activation_stats or {}
        if all(name in cached for name in names):
            return {name: cached[name] for name in names}
        return collect(model, names, self.calibration_feeds(pass_name).feeds, threads=self.threads)


@dataclasses.dataclass(frozen=True, kw_only=True)
class NoOptions:
    """For passes that take no options."""


class GraphoptPass(ir.passes.PassBase):
    """Base of graphopt passes.

    Subclasses give ``name`` (the registry and recipe name, verb-noun) and ``summary`` as class
    keywords, a nested ``Options`` class (typed fields with defaults; made a frozen keyword-only
    dataclass) and ``in_place``. A pass is constructed from keyword options:
    ``SimplifyPass(check_n=2)``; an unknown keyword is a TypeError naming the valid ones.
    """

    name: ClassVar[str]
    summary: ClassVar[str]
    Options: ClassVar[type] = NoOptions
    in_place: ClassVar[bool] = True  # type: ignore[misc]
    role: ClassVar[str] = "rewrite"
    """"rewrite" (exact cleanups), "enable" (a step only later steps profit from, undone when
    none of them changed anything: upgrade-opset), "compress" (lossy: quantize, prune, factorize)."""

    def __init_subclass__(cls, *, name: str | None = None, summary: str | None = None, **kwargs: Any) -> None:
        """``class XPass(GraphoptPass, name="verb-noun", summary="…")``; a nested ``class Options``
        becomes a frozen, keyword-only dataclass (its fields typed, with defaults)."""
        super().__init_subclass__(**kwargs)
        if name is not None:
            cls.name = name
        if summary is not None:
            cls.summary = summary
        options = cls.__dict__.get("Options")
        if options is not None and not dataclasses.is_dataclass(options):
            cls.Options = dataclasses.dataclass(frozen=True, kw_only=True)(options)

    def __init__(self, **options: Any) -> None:
        valid = {f.name for f in dataclasses.fields(self.Options)}
        unknown = sorted(set(options) - valid)
        if unknown:
            raise TypeError(
                f"pass '{self.name}' has no option {', '.join(unknown)}; "
                f"valid options: {', '.join(sorted(valid)) or '(none)'}"
            )
        self.options = self.Options(**options)
        self._check_choices()

    def _check_choices(self) -> None:
        """Every option typed as a ``Literal`` holds one of its choices (RecipeError: a mistake is
        refused before any work, whether the pass came from a recipe or from Python)."""
        from graphopt.errors import RecipeError

        hints = typing.get_type_hints(self.Options)
        for field in dataclasses.fields(self.Options):
            hint = hints.get(field.name)
            if typing.get_origin(hint) is not typing.Literal:
                continue
            value, choices = getattr(self.options, field.name), typing.get_args(hint)
            if value not in choices or isinstance(value, bool) != isinstance(choices[0], bool):
                raise RecipeError(f"pass '{self.name}': '{field.name}' must be one of "
                                  f"{', '.join(repr(c) for c in choices)}, got {value!r}")

    def __call__(self, model: Any, /, context: PassContext | None = None) -> PassResult:  # type: ignore[override]
        """Run on an ``onnx_ir.Model`` (or what ``graphopt.load_model`` returned) with the run's
        ``context`` (none: an empty one). onnx-ir's checks apply: ``requires`` before, ``ensures``
        after, the declared in-place behaviour. A failed precondition (the pass placed where it
        cannot run) is the recipe's mistake: RecipeError."""
        from graphopt.errors import RecipeError
        from graphopt.io import LoadedModel

        if isinstance(model, LoadedModel):
            model = model.model
        elif isinstance(model, ir.passes.PassResult):
            model = model.model
        try:
            self.requires(model)
        except Exception as exc:  # onnx-ir's rule: whatever stops ``requires`` is a failed precondition
            raise RecipeError(f"pass '{self.name}': {exc}") from exc
        result = self.apply(model, context or PassContext())
        if not isinstance(result, ir.passes.PassResult):
            raise TypeError(f"pass '{self.name}' returned {type(result).__name__}, not a PassResult")
        try:
            self.ensures(result.model)
        except Exception as exc:
            raise ir.passes.PostconditionError(f"post-condition of pass '{self.name}' failed: {exc}") from exc
        if self.in_place and result.model is not model:
            raise ir.passes.PassError(f"pass '{self.name}' is declared in place but returned another model")
        return result

    def call(self, model: ir.Model) -> PassResult:
        """onnx-ir's entry point (a pass manager's): the pass with an empty context."""
        return self.apply(model, PassContext())

    def apply(self, model: ir.Model, context: PassContext) -> PassResult:
        """The pass itself: rewrite ``model`` as ``self.options`` say, using ``context``."""
        raise NotImplementedError

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
