"""Per-layer channel counts for the pruning passes' reports."""

from __future__ import annotations

from typing import Any

from graphopt.passes.prune.cut import Removed
from graphopt.passes.prune.dependency import WEIGHT_OPS, Dependency


def layer_report(dependency: Dependency, removed: Removed) -> list[dict[str, Any]]:
    """One entry per weight op whose output channels are removed (call before cutting)."""
    layers = []
    for key, drop in removed.items():
        tensor = dependency.tensors[key]
        producer = tensor.value.producer()
        if producer is None or producer.op_type not in WEIGHT_OPS:
            continue
        layers.append({"node": producer.name or tensor.value.name, "op": producer.op_type,
                       "channels_before": tensor.size, "channels_after": tensor.size - len(drop)})
    return sorted(layers, key=lambda layer: layer["node"])
