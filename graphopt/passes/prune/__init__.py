"""Pruning that shrinks the model: coupled channel groups (``dependency``), per-op cutters
(``cut``), and the passes ``prune-dead-channels`` (exact), ``prune-channels`` (by importance)
and ``prune-weights`` (unstructured)."""

from graphopt.passes.prune import channels, dead_channels, weights  # noqa: F401  (registration)
