"""int8 quantization passes: weight-only, dynamic, static QDQ, and the automatic choice."""

from graphopt.passes.quantize import auto, dynamic, static, weight_only  # noqa: F401  (registration)
