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
    UsageError,
)
from graphopt.io import load_model, save_model  # noqa: E402

__all__ = [
    "DataError",
    "GateFailed",
    "GraphoptError",
    "InputError",
    "InvalidModelError",
    "PassFailed",
    "RecipeError",
    "UnsafeModelError",
    "UsageError",
    "__version__",
    "load_model",
    "save_model",
]
