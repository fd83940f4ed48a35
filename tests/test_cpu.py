"""`graphopt.cpu`: which int8 weight form is exact on which CPU, and the passes writing it."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import pytest

from graphopt.cpu import native_cpu, target_cpu
from graphopt.passes import get_pass
from graphopt.passes.base import PassContext
from tests.conftest import linear_model, run
from tests.passes.quantize.models import cosine


def test_targets() -> None:
    assert target_cpu("avx2").int8_saturates and target_cpu("avx2").int8_weight_form == "u8"
    assert not target_cpu("vnni").int8_saturates and target_cpu("vnni").int8_weight_form == "s8"
    assert target_cpu("native") == native_cpu()
    with pytest.raises(ValueError, match="unknown target CPU"):
        target_cpu("z80")


def test_the_environment_names_the_target(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GRAPHOPT_CPU", "avx2")
    assert target_cpu().int8_weight_form == "u8"
    assert target_cpu("vnni").int8_weight_form == "s8"  # an explicit target wins


def _weights(model: ir.Model) -> dict[str, np.ndarray]:
    return {name: value.const_value.numpy() for name, value in model.graph.initializers.items()}


@pytest.mark.parametrize("target, dtype, zero", [("avx2", np.uint8, 128), ("vnni", np.int8, 0)])
def test_dynamic_int8_writes_the_form_exact_on_the_target(rng, target: str, dtype: type, zero: int) -> None:
    proto = linear_model(rng, k=64, n=32)
    model = ir.serde.deserialize_model(proto)
    result = get_pass("quantize-dynamic")()(model, PassContext(target_cpu=target))
    weights = _weights(model)
    codes = next(v for k, v in weights.items() if k.endswith("_int8"))
    zeros = next(v for k, v in weights.items() if k.endswith("_zero_point") and v.ndim == 1)
    assert codes.dtype == dtype and np.all(zeros == zero)
    assert result.details["layers"][0]["weight_form"] == ("u8" if target == "avx2" else "s8")
    # The same 8-bit grid either way: onnxruntime's U8U8 kernels are exact on every CPU.
    x = rng.standard_normal((16, 64)).astype(np.float32)
    assert cosine(run(proto, {"X": x})[0], run(model, {"X": x})[0]) > 0.999


def test_seven_bit_weights_stay_within_reduce_range(rng) -> None:
    model = ir.serde.deserialize_model(linear_model(rng, k=64, n=32))
    get_pass("quantize-dynamic")(weight_form="s7")(model)
    codes = next(v for k, v in _weights(model).items() if k.endswith("_int8"))
    assert codes.dtype == np.int8 and np.abs(codes).max() == 63  # 2 · 255 · 63 < 2**15


def test_static_int8_writes_the_form_exact_on_the_target(rng) -> None:
    from graphopt.verify.feeds import FeedSet

    proto = linear_model(rng, k=64, n=32)
    feeds = [{"X": rng.standard_normal((4, 64)).astype(np.float32)} for _ in range(4)]
    model = ir.serde.deserialize_model(proto)
    get_pass("quantize-static")()(model, PassContext(calibration=FeedSet(feeds, "t", False), target_cpu="avx2"))
    codes = next(v for k, v in _weights(model).items() if k.endswith("_int8"))
    assert codes.dtype == np.uint8
    x = feeds[0]["X"]
    assert cosine(run(proto, {"X": x})[0], run(model, {"X": x})[0]) > 0.99
