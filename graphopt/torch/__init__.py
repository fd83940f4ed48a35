"""The torch side of graphopt: export with parity, student construction, distillation.

The only package of graphopt that imports torch (install with ``pip install -e ".[torch]"``);
``import graphopt`` never loads it.
"""

from graphopt.torch.compress import compress, parameter_count
from graphopt.torch.distill import DistillOptions, DistillResult, distill, validation_metrics
from graphopt.torch.export import export
from graphopt.torch.layers import drop_layers
from graphopt.torch.lowrank import FrequencySplitEmbedding, LowRankEmbedding, LowRankLinear, factorize
from graphopt.torch.prune import find_chains, prune_channels
from graphopt.torch.teacher_cache import CachedBatches, TeacherTargets, cache_teacher, length_buckets

__all__ = [
    "CachedBatches",
    "DistillOptions",
    "DistillResult",
    "FrequencySplitEmbedding",
    "LowRankEmbedding",
    "LowRankLinear",
    "TeacherTargets",
    "cache_teacher",
    "compress",
    "distill",
    "drop_layers",
    "validation_metrics",
    "export",
    "factorize",
    "find_chains",
    "length_buckets",
    "parameter_count",
    "prune_channels",
]
