"""Weight quantization passes: int8 weight-only, dynamic, static QDQ and the automatic choice
per layer; non-uniform codebooks; blockwise 4/8-bit MatMulNBits."""

from graphopt.passes.quantize import auto, blockwise, codebook, dynamic, static, weight_only  # noqa: F401  (registration)
