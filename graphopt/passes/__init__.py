"""Graph passes. Importing this package registers every built-in pass."""

from graphopt.passes import cleanup, lift_constants, quantize, simplify, upgrade_opset  # noqa: F401  (registration)
from graphopt.passes import fuse_attention, fuse_decoder  # noqa: F401  (registration)
from graphopt.passes import lowrank  # noqa: F401  (registration)
from graphopt.passes import prune  # noqa: F401  (registration)
from graphopt.passes import fix_shapes  # noqa: F401  (registration)
from graphopt.passes import keep_logits, remove_no_ops  # noqa: F401  (registration)
from graphopt.passes.base import GraphoptPass, PassResult
from graphopt.passes.pipeline import Pipeline, PipelineResult, StepRecord
from graphopt.passes.registry import available_passes, get_pass, register

__all__ = [
    "GraphoptPass",
    "PassResult",
    "Pipeline",
    "PipelineResult",
    "StepRecord",
    "available_passes",
    "get_pass",
    "register",
]
