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
    UnsafeModelError,
    UnsupportedModelError,
    UsageError,
)


def __getattr__(name: str):  # noqa: ANN202
    """``load_model`` and ``save_model`` import onnx on first use: the command line starts
    without it, so that Ctrl-C during start-up is already handled (exit 130, one line)."""
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
    "UnsafeModelError",
    "UnsupportedModelError",
    "UsageError",
    "__version__",
    "load_model",
    "save_model",
]
