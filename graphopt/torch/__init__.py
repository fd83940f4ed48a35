"""The torch side of graphopt: export with parity, student construction, distillation.

The only package of graphopt that imports torch (install with ``pip install -e ".[torch]"``);
``import graphopt`` never loads it.
"""

from graphopt.torch.compress import compress, parameter_count
from graphopt.torch.distill import DistillOptions, DistillResult, distill, evaluate
from graphopt.torch.export import export
from graphopt.torch.layers import drop_layers
from graphopt.torch.lowrank import LowRankEmbedding, LowRankLinear, factorize
from graphopt.torch.prune import find_chains, prune_channels

__all__ = [
    "DistillOptions",
    "DistillResult",
    "LowRankEmbedding",
    "LowRankLinear",
    "compress",
    "distill",
    "drop_layers",
    "evaluate",
    "export",
    "factorize",
    "find_chains",
    "parameter_count",
    "prune_channels",
]
