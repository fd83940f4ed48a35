"""Checks on the hostile corpus itself, not on graphopt: each case must be hostile in the
one way it claims, or the loader tests built on it prove nothing."""

from __future__ import annotations

import math
import pathlib

import numpy as np
import onnx
import pytest
from google.protobuf.message import DecodeError
from onnx import numpy_helper

from .corpus import (
    CASE_NAMES,
    MODEL_FILE,
    PATH_DEPENDENT,
    HostileCase,
    build_corpus,
    outside_dir,
    valid_model,
)

UNSAFE = {
    "external-absolute",
    "external-dotdot",
    "external-symlink",
    "external-hardlink",
    "subgraph-external-dotdot",
}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> dict[str, HostileCase]:
    root = tmp_path_factory.mktemp("hostile") / "corpus"
    return {case.name: case for case in build_corpus(root)}


def _location(model: onnx.ModelProto) -> pathlib.Path:
    w = next(t for t in model.graph.initializer if t.name == "W")
    assert w.data_location == onnx.TensorProto.EXTERNAL and not w.raw_data
    return pathlib.Path(next(e.value for e in w.external_data if e.key == "location"))


def _load(case: HostileCase) -> onnx.ModelProto:
    return onnx.load(case.model, load_external_data=False)


def test_base_model_is_valid() -> None:
    # Each case breaks one thing, so the thing they all start from must be clean.
    onnx.checker.check_model(valid_model(), full_check=True)


def test_names_unique_and_folders_match(corpus: dict[str, HostileCase]) -> None:
    assert len(CASE_NAMES) == len(set(CASE_NAMES)) == len(corpus)
    for name, case in corpus.items():
        assert case.model.name == MODEL_FILE
        assert case.model.parent.name == name
        assert case.model.is_file() and not case.model.is_symlink()


def test_descriptions_and_expectations(corpus: dict[str, HostileCase]) -> None:
    for case in corpus.values():
        assert case.problem
        assert case.expect and all(s and s == s.lower() for s in case.expect)


def test_unsafe_flags(corpus: dict[str, HostileCase]) -> None:
    assert {c.name for c in corpus.values() if c.unsafe} == UNSAFE


def test_deterministic(tmp_path: pathlib.Path) -> None:
    first = build_corpus(tmp_path / "a")
    second = build_corpus(tmp_path / "b")
    assert [c.name for c in first] == [c.name for c in second]
    for a, b in zip(first, second):
        files_a = sorted(p.name for p in a.model.parent.iterdir())
        assert files_a == sorted(p.name for p in b.model.parent.iterdir())
        if a.name in PATH_DEPENDENT:
            continue
        for name in files_a:
            path_a, path_b = a.model.parent / name, b.model.parent / name
            if path_a.exists():  # reads through links: their targets must match too
                assert path_a.read_bytes() == path_b.read_bytes(), f"{a.name}/{name}"


def test_rebuild_in_place(corpus: dict[str, HostileCase]) -> None:
    # Rebuilding must replace links, not fail on them or write through them.
    root = corpus["random-bytes"].model.parent.parent
    again = build_corpus(root)
    assert [c.model for c in again] == [c.model for c in corpus.values()]


@pytest.mark.parametrize("name", ["random-bytes", "truncated", "text-file"])
def test_not_protobuf(corpus: dict[str, HostileCase], name: str) -> None:
    with pytest.raises(DecodeError):
        _load(corpus[name])


def test_empty_and_wrong_message_have_no_graph(corpus: dict[str, HostileCase]) -> None:
    assert corpus["empty-file"].model.stat().st_size == 0
    # Parses (unknown fields are kept), but as a ModelProto with nothing in it.
    model = _load(corpus["wrong-message"])
    assert not model.HasField("graph") and model.ir_version == 0


def test_non_finite_weights(corpus: dict[str, HostileCase]) -> None:
    for name, check in (("nan-weights", math.isnan), ("inf-weights", math.isinf)):
        w = numpy_helper.to_array(_load(corpus[name]).graph.initializer[0])
        assert sum(check(float(v)) for v in w.flat) == 1


def test_graph_defects(corpus: dict[str, HostileCase]) -> None:
    x = _load(corpus["absurd-dims"]).graph.input[0]
    assert x.type.tensor_type.shape.dim[0].dim_value == 2**40
    assert not _load(corpus["no-graph"]).graph.output
    assert not _load(corpus["missing-opset"]).opset_import
    outputs = [o for n in _load(corpus["duplicate-output-names"]).graph.node for o in n.output]
    assert outputs.count("twice_made") == 2


def test_unsafe_external_files_are_real(corpus: dict[str, HostileCase]) -> None:
    # A naive loader must be able to succeed, so every outside file exists and is 64 bytes.
    absolute = corpus["external-absolute"]
    location = _location(_load(absolute))
    root = absolute.model.parent.parent
    assert location.is_absolute() and location.parent == outside_dir(root)
    assert location.stat().st_size == 64

    dotdot = corpus["external-dotdot"]
    assert str(_location(_load(dotdot))) == "../secret.bin"
    assert (dotdot.model.parent / "../secret.bin").stat().st_size == 64

    symlink = corpus["external-symlink"].model.parent / "weights.bin"
    assert symlink.is_symlink()
    assert symlink.resolve().parent == outside_dir(root) and symlink.stat().st_size == 64

    hardlink = corpus["external-hardlink"].model.parent / "weights.bin"
    assert not hardlink.is_symlink() and hardlink.stat().st_nlink > 1

    sub = corpus["subgraph-external-dotdot"]
    assert (sub.model.parent / "../secret-subgraph.bin").stat().st_size == 16


def test_bad_external_files(corpus: dict[str, HostileCase]) -> None:
    def size(name: str) -> int:
        return (corpus[name].model.parent / "weights.bin").stat().st_size

    assert not (corpus["external-missing"].model.parent / "missing.bin").exists()
    assert size("external-short") < 64
    assert size("external-offset-beyond") < 4096
    assert size("external-no-length-short") < 64
    w = _load(corpus["external-no-length-short"]).graph.initializer[0]
    assert "length" not in {e.key for e in w.external_data}
    assert np.prod(w.dims) * 4 == 64
