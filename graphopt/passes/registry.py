"""The registry of passes: the single source of the names recipes and the CLI accept."""

from __future__ import annotations

from typing import TypeVar

from graphopt.errors import RecipeError
from graphopt.passes.base import GraphoptPass

_PASSES: dict[str, type[GraphoptPass]] = {}

P = TypeVar("P", bound=type[GraphoptPass])


def register(cls: P) -> P:
    if cls.name in _PASSES:
        raise ValueError(f"pass name '{cls.name}' registered twice")
    _PASSES[cls.name] = cls
    return cls


def get_pass(name: str) -> type[GraphoptPass]:
    try:
        return _PASSES[name]
    except KeyError:
        raise RecipeError(f"unknown pass '{name}'; available: {', '.join(available_passes())}") from None


def available_passes() -> list[str]:
    return sorted(_PASSES)
