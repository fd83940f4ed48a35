"""Recipes: TOML files naming an ordered list of passes with typed options.

```toml
description = "what it is for"
never_larger = true      # refuse a result larger than the input
fallback = "int8"        # never worse than this lower recipe: the smaller verified result is written
max_abs = 1e-4           # default parity budget (max abs difference) when writing
min_cosine = 0.999       # default parity budget of embeddings and maps (cosine per sample)
min_top1 = 0.99          # default parity budget of class scores (argmax agreement; decoded sequences too)
min_detections = 0.97    # default parity budget of detector outputs (share of detections kept)
max_ppl_ratio = 1.03     # decoder LLMs: default text budget (perplexity ratio on prose)
min_token_agree = 0.95   # decoder LLMs: teacher-forced next-token agreement

[[steps]]
pass = "simplify"
check_n = 2
```
Built-in recipes live in ``graphopt/recipes/``; a path to a ``.toml`` file works too.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from pathlib import Path
from typing import Any

from graphopt.errors import RecipeError
from graphopt.passes import GraphoptPass, get_pass
from graphopt.presets import builtin_presets, read_preset

_TOP_LEVEL_KEYS = {"description", "steps", "fallback", "never_larger", "max_abs", "min_cosine", "min_top1", "min_detections",
                   "max_ppl_ratio", "min_token_agree"}


@dataclasses.dataclass(frozen=True)
class Recipe:
    name: str
    description: str
    passes: tuple[GraphoptPass, ...]
    never_larger: bool = False
    fallback: str | None = None  # a lower recipe this one is never worse than (small: int8)
    max_abs: float | None = None
    min_cosine: float | None = None  # default budget of embeddings, maps, boxes (verify.kinds)
    min_top1: float | None = None  # default budget of class scores and recognisers (and their decoded sequences)
    min_detections: float | None = None  # default budget of detector outputs (share of detections kept)
    max_ppl_ratio: float | None = None  # decoder LLMs, judged on prose: replaces the parity budget
    min_token_agree: float | None = None

    @property
    def text_budget(self) -> bool:
        return self.max_ppl_ratio is not None or self.min_token_agree is not None


def builtin_recipes() -> list[str]:
    return builtin_presets("graphopt.recipes")


def load_recipe(name_or_path: str | Path) -> Recipe:
    """A built-in recipe by name, or a TOML file by path."""
    data, name = read_preset(str(name_or_path), package="graphopt.recipes", kind="recipe", error=RecipeError)
    return parse_recipe(data, name)


def parse_recipe(data: dict[str, Any], name: str) -> Recipe:
    unknown = sorted(set(data) - _TOP_LEVEL_KEYS)
    if unknown:
        raise RecipeError(
            f"recipe '{name}': unknown key {', '.join(unknown)}; valid keys: {', '.join(sorted(_TOP_LEVEL_KEYS))}"
        )
    steps = data.get("steps")
    if not isinstance(steps, list) or not steps:
        raise RecipeError(f"recipe '{name}': needs at least one [[steps]] table")
    passes = tuple(_build_step(step, index, name) for index, step in enumerate(steps, start=1))
    return Recipe(
        name=name,
        description=_typed(data, "description", str, name, ""),
        passes=passes,
        never_larger=_typed(data, "never_larger", bool, name, False),
        fallback=_typed(data, "fallback", str, name, None),
        max_abs=_typed(data, "max_abs", float, name, None),
        min_cosine=_typed(data, "min_cosine", float, name, None),
        min_top1=_typed(data, "min_top1", float, name, None),
        min_detections=_typed(data, "min_detections", float, name, None),
        max_ppl_ratio=_typed(data, "max_ppl_ratio", float, name, None),
        min_token_agree=_typed(data, "min_token_agree", float, name, None),
    )


def _typed(data: dict[str, Any], key: str, kind: type, name: str, default: Any) -> Any:
    if key not in data:
        return default
    value = data[key]
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if not isinstance(value, kind) or (kind is not bool and isinstance(value, bool)):
        raise RecipeError(f"recipe '{name}': '{key}' must be {kind.__name__}, got {value!r}")
    return value


def _build_step(step: Any, index: int, recipe: str) -> GraphoptPass:
    where = f"recipe '{recipe}', step {index}"
    if not isinstance(step, dict) or "pass" not in step:
        raise RecipeError(f"{where}: each [[steps]] table needs a 'pass' key")
    try:
        pass_cls = get_pass(step["pass"])
    except RecipeError as exc:  # the registry knows the pass names, not which recipe asked
        raise RecipeError(f"{where}: {exc}") from None
    options = {k: v for k, v in step.items() if k != "pass"}
    fields = {f.name: f for f in dataclasses.fields(pass_cls.Options)}
    unknown = sorted(set(options) - set(fields))
    if unknown:
        raise RecipeError(
            f"{where} ({pass_cls.name}): unknown key {', '.join(unknown)}; "
            f"valid keys: {', '.join(['pass', *sorted(fields)])}"
        )
    hints = typing.get_type_hints(pass_cls.Options)
    checked = {key: _check_option(value, hints[key], f"{where} ({pass_cls.name}), '{key}'") for key, value in options.items()}
    return pass_cls(**checked)


def _check_option(value: Any, hint: Any, where: str) -> Any:
    """Check a TOML value against a dataclass field's annotation."""
    origin = typing.get_origin(hint)
    if origin is typing.Literal:
        if value not in typing.get_args(hint):
            choices = ", ".join(repr(a) for a in typing.get_args(hint))
            raise RecipeError(f"{where} must be one of {choices}, got {value!r}")
        return value
    if origin in (typing.Union, types.UnionType):
        errors = []
        for arm in typing.get_args(hint):
            if arm is type(None):
                continue
            try:
                return _check_option(value, arm, where)
            except RecipeError as exc:
                errors.append(str(exc))
        raise RecipeError(errors[0] if errors else f"{where}: invalid value {value!r}")
    if origin in (tuple, list):
        if not isinstance(value, list):
            raise RecipeError(f"{where} must be a list, got {value!r}")
        (item,) = typing.get_args(hint)[:1] or (Any,)
        return tuple(_check_option(v, item, where) for v in value)
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if hint is Any:
        return value
    if isinstance(hint, type) and (not isinstance(value, hint) or (hint is not bool and isinstance(value, bool))):
        raise RecipeError(f"{where} must be {hint.__name__}, got {value!r}")
    return value
