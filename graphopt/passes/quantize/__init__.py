"""Weight quantization passes: int8 weight-only, dynamic, static QDQ and the automatic choice
per layer; non-uniform codebooks."""

from graphopt.passes.quantize import auto, codebook, dynamic, static, weight_only  # noqa: F401  (registration)
