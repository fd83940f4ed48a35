"""graphopt: compress, verify and package ONNX models.

Pipeline: load (graphopt.io) → passes (graphopt.passes, chosen by a recipe) → verify in
onnxruntime (graphopt.verify) → write atomically. ``import graphopt`` loads neither torch
nor onnxruntime; they are imported where they are used.
"""

__version__ = "0.1.0"

from graphopt.errors import (  # noqa: E402
    DataError,
    GateFailed,
    GraphoptError,
    InputError,
    InvalidModelError,
    PassFailed,
    RecipeError,
    TargetError,
    UnsafeModelError,
    UnsupportedByTarget,
    UnsupportedModelError,
    UsageError,
)


# Imported on first use: onnx, onnx-ir and numpy load only then, so that the command line starts
# without them and handles Ctrl-C during start-up (exit 130, one line).
_LAZY_MODULES = ("api", "passes", "verify", "recipe")


def __getattr__(name: str):  # noqa: ANN202
    """``graphopt.api`` (the typed Python API), ``graphopt.passes``, ``graphopt.verify``,
    ``graphopt.recipe``; ``load_model`` and ``save_model`` from ``graphopt.io``."""
    import importlib

    if name in _LAZY_MODULES:
        return importlib.import_module(f"graphopt.{name}")
    if name in ("load_model", "save_model"):
        from graphopt import io

        return getattr(io, name)
    raise AttributeError(f"module 'graphopt' has no attribute '{name}'")

__all__ = [
    "DataError",
    "GateFailed",
    "GraphoptError",
    "InputError",
    "InvalidModelError",
    "PassFailed",
    "RecipeError",
    "TargetError",
    "UnsafeModelError",
    "UnsupportedByTarget",
    "UnsupportedModelError",
    "UsageError",
    "__version__",
    "api",
    "load_model",
    "save_model",
]
