"""Per-machine speed profile of int8 layer forms, cached so that choices are reproducible.

For each layer *signature* (op kind, weight shape, input shape, attributes) a one-node model
is timed in its float form and its int8 compute form (dynamic for MatMul/Gemm,
DynamicQuantizeLSTM for LSTM, QDQ for Conv/ConvTranspose) in interleaved blocks. Results are
stored in a JSON cache keyed by CPU, onnxruntime version and thread count: the first run on a
machine measures, every later run reads the same numbers and so writes the same bytes. The one-node int8 form pays its
conversions on both sides, which a chain of quantized layers would share: the profile errs
towards float, never towards a slower model.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Any

import numpy as np
import onnx_ir as ir

from graphopt.passes.weights import WeightUse

logger = logging.getLogger(__name__)

PROFILE_VERSION = 1


def default_cache_dir() -> Path:
    return Path(os.environ.get("GRAPHOPT_CACHE_DIR") or Path.home() / ".cache" / "graphopt")


def machine_key(threads: int) -> str:
    """The CPU (name and int8 features: one model name covers AVX2-only and VNNI parts),
    onnxruntime's version and the thread count."""
    import onnxruntime

    from graphopt.cpu import native_cpu

    return f"{native_cpu().describe()} | onnxruntime {onnxruntime.__version__} | {threads} threads | v{PROFILE_VERSION}"


def signature(use: WeightUse, input_shape: tuple[int, ...], mode: str) -> str:
    attrs = {k: (list(v.value) if isinstance(v.value, (list, tuple)) else v.value)
             for k, v in sorted(use.node.attributes.items())}
    text = json.dumps([use.kind, mode, list(use.weight.const_value.shape.numpy()), list(input_shape), attrs],
                      sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:20]


class _ProfileFile:
    """The JSON cache shared by the speed profiles: one section per machine key."""

    def __init__(self, cache_dir: Path, threads: int, weight_form: str = "s8") -> None:
        self.path = cache_dir / "speed-profile.json"
        self.threads = threads
        self.weight_form = weight_form
        self.key = machine_key(threads)
        self.measured = 0
        self.reused = 0
        self._data = self._read()

    def _read(self) -> dict[str, Any]:
        try:
            data = json.loads(self.path.read_text())
        except (OSError, ValueError):
            return {}
        return data if isinstance(data, dict) else {}

    def save(self) -> None:
        if not self.measured:
            return
        from graphopt.io import to_json, write_text

        self.path.parent.mkdir(parents=True, exist_ok=True)
        write_text(self.path, to_json(self._data))

    def _entry(self, sig: str, measure: Any) -> dict[str, float]:
        entries = self._data.setdefault(self.key, {})
        if sig not in entries:
            entries[sig] = measure()
            self.measured += 1
        else:
            self.reused += 1
        return entries[sig]


class SpeedProfile(_ProfileFile):
    """``speedup(use, shape, mode)``: float time / int8 time for that layer signature."""

    def timings(self, use: WeightUse, input_shape: tuple[int, ...], mode: str) -> dict[str, float]:
        form = f"{mode}|{self.weight_form}" if self.weight_form != "s8" else mode
        return self._entry(signature(use, input_shape, form),
                           lambda: _measure(use, input_shape, mode, self.threads, self.weight_form))


class BlockwiseProfile(_ProfileFile):
    """``fastest_level(k, n, bits, block_size)``: MatMulNBits' accuracy_level 0 (the kernel's
    default compute) or 4 (int8 activations), whichever is faster on this CPU for a [K, N] weight,
    judged on one row (a decode step) and on 128 rows (a prefill) by the product of the two ratios
    (their geometric mean: a 2× gain on one and a 2× loss on the other cancel, which a sum of
    ratios would count as a loss; measured: 2.2× faster decode and 1.7× slower prefill chose the
    float kernel by the sum, and the whole SmolLM2 int4 model decoded 1.3× faster and prefilled
    1.1× faster on int8 activations)."""

    def fastest_level(self, k: int, n: int, *, bits: int, block_size: int) -> int:
        times = self._entry(f"MatMulNBits|{k}x{n}|{bits}b|{block_size}",
                            lambda: _measure_levels(k, n, bits, block_size, self.threads))
        ratio = (times["level4_rows1_ms"] / times["level0_rows1_ms"]) * (times["level4_rows128_ms"]
                                                                          / times["level0_rows128_ms"])
        return 4 if ratio < 1.0 else 0


def _one_node_models(use: WeightUse, input_shape: tuple[int, ...], mode: str, form: str) -> tuple[bytes, bytes]:
    """The layer alone, float and int8, with its real weight and bias."""
    from graphopt.passes.quantize.dynamic import encode_dynamic_alone
    from graphopt.passes.quantize.static import (
        ActivationParams,
        _QdqInserter,
        encode_static,
    )
    from graphopt.passes.weights import weight_use

    def build() -> tuple[ir.Model, WeightUse]:
        x = ir.Value(name="x", type=ir.TensorType(ir.DataType.FLOAT), shape=ir.Shape(input_shape))
        inputs: list[ir.Value | None] = [x]
        graph = ir.Graph([x], [], nodes=[], opset_imports={"": 17}, name="layer")
        for index, value in enumerate(use.node.inputs[1:], start=1):
            if value is None or value.const_value is None:
                inputs.append(None)
                continue
            copy = ir.Value(name=f"c{index}", const_value=ir.tensor(value.const_value.numpy(), name=f"c{index}"))
            graph.register_initializer(copy)
            inputs.append(copy)
        attrs = {k: v for k, v in use.node.attributes.items()}
        node = ir.Node("", use.kind, inputs, attributes=list(attrs.values()), name="layer")
        graph.append(node)
        node.outputs[0].name = "y"
        node.outputs[0].dtype = ir.DataType.FLOAT
        graph.outputs.append(node.outputs[0])
        model = ir.Model(graph, ir_version=8)
        found, _ = weight_use(node, graph)
        return model, found

    float_model, _ = build()
    int8_model, layer = build()
    if mode == "dynamic":
        encode_dynamic_alone(int8_model.graph, layer, form=form)
    else:
        params = ActivationParams(scale=0.02, zero_point=128)
        encode_static(int8_model.graph, layer, _QdqInserter(int8_model.graph), params, params, form=form)
    return (ir.serde.serialize_model(float_model).SerializeToString(),
            ir.serde.serialize_model(int8_model).SerializeToString())


def _measure(use: WeightUse, input_shape: tuple[int, ...], mode: str, threads: int, form: str) -> dict[str, float]:
    from graphopt.verify.latency import compare_interleaved
    from graphopt.verify.runtime import make_session

    float_bytes, int8_bytes = _one_node_models(use, input_shape, mode, form)
    rng = np.random.default_rng(0)
    feeds = [{"x": rng.standard_normal(input_shape).astype(np.float32)} for _ in range(4)]
    ab = compare_interleaved(make_session(float_bytes, threads=threads), make_session(int8_bytes, threads=threads),
                             feeds, threads=threads, rounds=30, max_seconds=3.0)
    logger.debug("profiled %s %s %s: %.3f ms float, %.3f ms int8", use.kind, mode, input_shape,
                 ab.a.median_ms, ab.b.median_ms)
    return {"float_ms": round(ab.a.median_ms, 5), "int8_ms": round(ab.b.median_ms, 5)}


def _measure_levels(k: int, n: int, bits: int, block_size: int, threads: int) -> dict[str, float]:
    from onnx import TensorProto, helper, numpy_helper

    from graphopt.verify.latency import compare_interleaved
    from graphopt.verify.runtime import make_session

    rng = np.random.default_rng(0)
    blocks = -(-k // block_size)
    codes = rng.integers(0, 256, (n, blocks, block_size * bits // 8), dtype=np.uint8)
    scales = rng.uniform(0.001, 0.01, (n, blocks)).astype(np.float32)

    def model(level: int) -> bytes:
        node = helper.make_node("MatMulNBits", ["x", "B", "scales"], ["y"], domain="com.microsoft", K=k, N=n,
                                bits=bits, block_size=block_size, accuracy_level=level)
        graph = helper.make_graph([node], "one", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["rows", k])],
                                  [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["rows", n])],
                                  [numpy_helper.from_array(codes, "B"), numpy_helper.from_array(scales, "scales")])
        return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21),
                                                       helper.make_opsetid("com.microsoft", 1)]).SerializeToString()

    sessions = [make_session(model(level), threads=threads) for level in (0, 4)]
    times: dict[str, float] = {}
    for rows in (1, 128):
        feeds = [{"x": rng.standard_normal((rows, k)).astype(np.float32)} for _ in range(2)]
        ab = compare_interleaved(*sessions, feeds, threads=threads, rounds=20, max_seconds=2.0)
        times[f"level0_rows{rows}_ms"] = round(ab.a.median_ms, 5)
        times[f"level4_rows{rows}_ms"] = round(ab.b.median_ms, 5)
    logger.debug("MatMulNBits %dx%d %d bits: %s", k, n, bits, times)
    return times
