"""Sanity of the cases added for issue #11: each is hostile in the one way it claims."""

from __future__ import annotations

import onnx
import pytest

from .corpus import HUGE_DIM, UNKNOWN_DOMAIN, HostileCase, build_corpus


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> dict[str, HostileCase]:
    return {case.name: case for case in build_corpus(tmp_path_factory.mktemp("hostile") / "corpus")}


def _w(case: HostileCase) -> onnx.TensorProto:
    model = onnx.load(case.model, load_external_data=False)
    return next(t for t in model.graph.initializer if t.name == "W")


def _location(case: HostileCase) -> str:
    return next(e.value for e in _w(case).external_data if e.key == "location")


def test_huge_declared_dims_hold_64_bytes(corpus):
    w = _w(corpus["huge-declared-dims"])
    assert list(w.dims) == [HUGE_DIM, HUGE_DIM] and len(w.raw_data) == 64


def test_external_huge_dims_has_no_length_and_a_64_byte_file(corpus):
    case = corpus["external-huge-dims"]
    w = _w(case)
    assert list(w.dims) == [HUGE_DIM, HUGE_DIM]
    assert "length" not in {e.key for e in w.external_data}
    assert (case.model.parent / "weights.bin").stat().st_size == 64


def test_external_names(corpus):
    assert "\x00" in _location(corpus["external-nul-name"])
    # the part before the NUL is a real file: a C loader stopping at the NUL would read it
    assert (corpus["external-nul-name"].model.parent / "weights.bin").is_file()
    assert len(_location(corpus["external-long-name"])) > 4096


def test_unknown_operator_is_legal_onnx_that_onnxruntime_refuses(corpus):
    import onnxruntime as ort
    from onnxruntime.capi.onnxruntime_pybind11_state import Fail

    case = corpus["unknown-operator"]
    onnx.checker.check_model(str(case.model))  # custom domains are not checked: legal
    model = onnx.load(case.model)
    assert {(n.domain, n.op_type) for n in model.graph.node} >= {(UNKNOWN_DOMAIN, "Frobnicate")}
    with pytest.raises(Fail, match="Frobnicate"):
        ort.InferenceSession(str(case.model), providers=["CPUExecutionProvider"])


def test_loads_flag(corpus):
    assert {name for name, case in corpus.items() if case.loads} == {"absurd-dims", "unknown-operator"}
